// A small Markdown renderer for model replies: code fences, inline code, headings, lists, bold,
// italics, links. Everything is HTML-escaped first, so a reply can never inject markup; an
// unclosed fence (a reply still streaming) renders as code up to the end.
"use strict";
(function () {
  function escape(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function inline(s) {
    const codes = [];
    s = s.replace(/`([^`\n]+)`/g, function (_, c) { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
    return s.replace(/\u0000(\d+)\u0000/g, function (_, i) { return "<code>" + codes[+i] + "</code>"; });
  }
  function blocks(text) {
    const out = [];
    let para = [], list = null;
    function flush() {
      if (para.length) { out.push("<p>" + inline(para.join("<br>")) + "</p>"); para = []; }
      if (list) { out.push("<" + list.tag + ">" + list.items.map(function (i) { return "<li>" + inline(i) + "</li>"; }).join("") + "</" + list.tag + ">"); list = null; }
    }
    text.split("\n").forEach(function (line) {
      let m;
      if (!line.trim()) { flush(); return; }
      if ((m = line.match(/^(#{1,6})\s+(.*)$/))) { flush(); const n = Math.min(m[1].length + 2, 6); out.push("<h" + n + ">" + inline(m[2]) + "</h" + n + ">"); return; }
      if ((m = line.match(/^\s*[-*+]\s+(.*)$/)) || (m = line.match(/^\s*\d+[.)]\s+(.*)$/))) {
        const tag = /^\s*\d/.test(line) ? "ol" : "ul";
        if (para.length || (list && list.tag !== tag)) flush();
        if (!list) list = { tag: tag, items: [] };
        list.items.push(m[1]);
        return;
      }
      if (list) flush();
      para.push(line);
    });
    flush();
    return out.join("");
  }
  function render(src) {
    const text = escape(src);
    const parts = text.split(/^```/m);
    let html = "";
    parts.forEach(function (part, i) {
      if (i % 2 === 0) { html += blocks(part); return; }
      const nl = part.indexOf("\n");
      const lang = nl >= 0 ? part.slice(0, nl).trim() : part.trim();
      let code = nl >= 0 ? part.slice(nl + 1) : "";
      code = code.replace(/\n$/, "");
      html += '<pre><code' + (lang ? ' data-lang="' + lang.replace(/[^\w+-]/g, "") + '"' : "") + ">" + code + "</code></pre>";
    });
    return html;
  }
  window.renderMarkdown = render;
})();
