// pocketrlhf web page: chat with any served model id, compare 2-4 side by side and vote.
// Chat goes through the OpenAI route /v1/chat/completions (streamed); compare through
// /feedback/compare (the answers come from one batch) and votes to /feedback/vote.
"use strict";
(function () {
  const $ = function (id) { return document.getElementById(id); };
  const KEY = "pocketrlhf-api-key";          // sessionStorage: this tab only
  const WHO = "pocketrlhf-annotator";        // localStorage: one id per browser
  let models = [];
  let chat = [];                             // [{role, content}]
  let chatAbort = null;
  let comparison = null;                     // {id, slots, done}

  function annotator() {
    let id = localStorage.getItem(WHO);
    if (!id) {
      const bytes = new Uint8Array(8);
      crypto.getRandomValues(bytes);
      id = "web-" + Array.from(bytes, function (b) { return b.toString(16).padStart(2, "0"); }).join("");
      localStorage.setItem(WHO, id);
    }
    return id;
  }

  function showError(message) {
    const e = $("error");
    e.textContent = message || "";
    e.hidden = !message;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // fetch that asks for the API key once when the server wants one, then tries again.
  async function call(path, options) {
    options = Object.assign({ headers: headers() }, options || {});
    const r = await fetch(path, options);
    if (r.status === 401) {
      $("keybar").hidden = false;
      $("key").focus();
      throw new Error("this server needs its API key: enter it above");
    }
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    return r;
  }

  // Server-sent events of a fetch response, as parsed JSON objects.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function settings() {
    const num = function (id) { const v = $(id).value; return v === "" ? null : Number(v); };
    const s = { temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"),
                max_tokens: num("max_tokens"), repetition_penalty: num("repetition_penalty") };
    const seed = num("seed");
    if (seed !== null) s.seed = Math.trunc(seed);
    for (const k of Object.keys(s)) if (s[k] === null) delete s[k];
    return s;
  }

  async function loadModels() {
    try {
      const r = await call("/v1/models");
      models = (await r.json()).data.map(function (m) { return m.id; });
    } catch (e) {
      showError(e.message);
      return;
    }
    showError("");
    const select = $("chat-model");
    select.innerHTML = "";
    models.forEach(function (m) { select.add(new Option(m, m)); });
    const box = $("cmp-models");
    box.innerHTML = "";
    models.forEach(function (m, i) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.value = m;
      input.className = "cmp-model";
      input.checked = i > 0 && i <= 2 || (models.length <= 2);
      label.append(input, " " + m);
      box.append(label);
    });
  }

  // -- chat -------------------------------------------------------------------------------------

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    if (role === "user") div.textContent = text;
    $("chat-log").append(div);
    return div;
  }

  async function send(event) {
    event.preventDefault();
    const text = $("chat-input").value;
    if (!text.trim() || chatAbort) return;
    $("chat-input").value = "";
    showError("");
    bubble("user", text);
    chat.push({ role: "user", content: text });
    const out = bubble("assistant", "");
    const body = document.createElement("div");
    body.className = "md";
    const meta = document.createElement("div");
    meta.className = "meta";
    out.append(body, meta);
    const system = $("system").value.trim();
    const messages = (system ? [{ role: "system", content: system }] : []).concat(chat);
    chatAbort = new AbortController();
    $("chat-send").disabled = true;
    $("chat-stop").hidden = false;
    let reply = "", reason = "";
    try {
      const r = await call("/v1/chat/completions", {
        method: "POST", signal: chatAbort.signal, headers: headers(),
        body: JSON.stringify(Object.assign({ model: $("chat-model").value, messages: messages, stream: true }, settings())),
      });
      for await (const ev of events(r)) {
        if (ev.error) throw new Error(ev.error.message);
        const choice = ev.choices && ev.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          body.innerHTML = window.renderMarkdown(reply);
          out.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) reason = choice.finish_reason;
      }
      chat.push({ role: "assistant", content: reply });
      meta.textContent = $("chat-model").value + (reason === "length" ? " · cut at max tokens" : "");
      out.dataset.done = "1";
    } catch (e) {
      if (e.name === "AbortError") {
        chat.push({ role: "assistant", content: reply });
        meta.textContent = "stopped";
        out.dataset.done = "1";
      } else {
        chat.pop();
        out.remove();
        showError(e.message);
      }
    } finally {
      chatAbort = null;
      $("chat-send").disabled = false;
      $("chat-stop").hidden = true;
    }
  }

  function reset() {
    if (chatAbort) chatAbort.abort();
    chat = [];
    $("chat-log").innerHTML = "";
    showError("");
  }

  // -- compare ----------------------------------------------------------------------------------

  async function compare(event) {
    event.preventDefault();
    const chosen = Array.from(document.querySelectorAll(".cmp-model:checked")).map(function (i) { return i.value; });
    const prompt = $("cmp-prompt").value;
    if (chosen.length < 2 || chosen.length > 4) { showError("pick 2 to 4 models to compare"); return; }
    if (!prompt.trim()) { showError("write a prompt first"); return; }
    showError("");
    $("cmp-votes").hidden = true;
    $("cmp-status").textContent = "";
    $("cmp-run").disabled = true;
    const answers = $("cmp-answers");
    answers.innerHTML = "";
    comparison = null;
    const texts = [];
    try {
      const body = Object.assign({ prompt: prompt, models: chosen, anonymous: $("cmp-anon").checked }, settings());
      const system = $("system").value.trim();
      if (system) body.system = system;
      const r = await call("/feedback/compare", { method: "POST", headers: headers(), body: JSON.stringify(body) });
      for await (const ev of events(r)) {
        if (ev.comparison) {
          comparison = { id: ev.comparison, slots: ev.slots, done: false };
          ev.slots.forEach(function (s) {
            const card = document.createElement("div");
            card.className = "answer";
            card.dataset.slot = s.slot;
            card.innerHTML = "<h3></h3><div class=\"md\"></div><div class=\"meta\"></div>";
            card.querySelector("h3").textContent = s.label + (s.model ? " · " + s.model : "");
            answers.append(card);
            texts.push("");
          });
        } else if (ev.error) {
          throw new Error(ev.error.message);
        } else if (ev.delta !== undefined) {
          texts[ev.slot] += ev.delta;
          answers.children[ev.slot].querySelector(".md").innerHTML = window.renderMarkdown(texts[ev.slot]);
        } else if (ev.finish_reason) {
          const card = answers.children[ev.slot];
          card.dataset.done = "1";
          card.querySelector(".meta").textContent = ev.finish_reason === "length" ? "cut at max tokens" : "";
        } else if (ev.done) {
          comparison.done = ev.complete;
        }
      }
      if (comparison && comparison.done) {
        const better = $("cmp-better");
        better.innerHTML = "";
        comparison.slots.forEach(function (s) {
          const b = document.createElement("button");
          b.className = "vote";
          b.dataset.vote = "better";
          b.dataset.slot = s.slot;
          b.id = "vote-" + s.label;
          b.textContent = s.label + " is better";
          better.append(b);
        });
        $("cmp-votes").hidden = false;
        $("cmp-status").textContent = "Vote to save this comparison as preference data.";
      }
    } catch (e) {
      showError(e.message);
    } finally {
      $("cmp-run").disabled = false;
    }
  }

  async function vote(button) {
    if (!comparison) return;
    const body = { comparison: comparison.id, vote: button.dataset.vote, annotator: annotator() };
    if (body.vote === "better") body.winner = Number(button.dataset.slot);
    document.querySelectorAll(".vote").forEach(function (b) { b.disabled = true; });
    try {
      const r = await call("/feedback/vote", { method: "POST", headers: headers(), body: JSON.stringify(body) });
      const result = await r.json();
      const cards = $("cmp-answers").children;
      comparison.slots.forEach(function (s) {
        cards[s.slot].querySelector("h3").textContent = s.label + " · " + result.models[s.slot];
      });
      if (body.vote === "better") cards[body.winner].classList.add("winner");
      $("cmp-status").textContent = "Saved (" + result.rows + " line" + (result.rows === 1 ? "" : "s") + "). Thank you!";
      $("cmp-status").dataset.voted = "1";
      comparison = null;
    } catch (e) {
      showError(e.message);
      document.querySelectorAll(".vote").forEach(function (b) { b.disabled = false; });
    }
  }

  // -- wiring -----------------------------------------------------------------------------------

  function show(view) {
    document.querySelectorAll(".tab[data-view]").forEach(function (t) { t.classList.toggle("active", t.dataset.view === view); });
    $("view-chat").hidden = view !== "chat";
    $("view-compare").hidden = view !== "compare";
  }

  document.querySelectorAll(".tab[data-view]").forEach(function (t) {
    t.addEventListener("click", function () { show(t.dataset.view); });
  });
  $("settings-toggle").addEventListener("click", function () {
    const s = $("settings");
    s.hidden = !s.hidden;
    this.setAttribute("aria-expanded", String(!s.hidden));
  });
  $("key-save").addEventListener("click", function () {
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("keybar").hidden = true;
    loadModels();
  });
  $("chat-form").addEventListener("submit", send);
  $("chat-input").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", function () { if (chatAbort) chatAbort.abort(); });
  $("chat-reset").addEventListener("click", reset);
  $("cmp-form").addEventListener("submit", compare);
  $("cmp-votes").addEventListener("click", function (e) {
    const b = e.target.closest(".vote");
    if (b) vote(b);
  });
  annotator();
  loadModels();
})();
