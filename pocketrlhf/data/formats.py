"""Detect a dataset's format from its columns and turn rows into prompt/completion text.

SFT: ``text`` | ``prompt`` + ``completion`` | ``messages`` | ``question`` + ``response_j`` (Stack Exchange).
Preference: ``prompt`` + ``chosen`` + ``rejected`` (explicit) | ``chosen`` + ``rejected`` (implicit
prompt: the common prefix) | ``question`` + ``response_j`` + ``response_k`` (``response_j`` better).
Prompt-only (PPO): ``prompt`` | ``question`` | ``messages``.

Rows with an empty or missing field are skipped and counted; a wrong type is an error. Votes of
``pocketrlhf serve``'s web page that prefer neither answer (``vote``: tie, both_bad) are kept in its
feedback file and skipped here with a count.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pocketrlhf.data.loading import DataError, require_string
from pocketrlhf.data.templates import completion_text, prompt_text, render

SFT_FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "stackexchange": ("question", "response_j"),
    "text": ("text",),
}
PREFERENCE_FORMATS = {
    "explicit": ("prompt", "chosen", "rejected"),
    "stackexchange": ("question", "response_j", "response_k"),
    "implicit": ("chosen", "rejected"),
}
PROMPT_FORMATS = {"prompt": ("prompt",), "stackexchange": ("question",), "messages": ("messages",)}


SHOWN_ROWS = 3
# Feedback-file votes that name no better answer: not a preference pair.
NO_PREFERENCE = {"tie": "tie votes", "both_bad": "both-bad votes"}


@dataclass
class Skipped:
    """Why rows were left out, how many, and the first few row numbers (1-based) of each reason,
    so that a user can find them; reported at the end of every data step."""

    counts: Counter = field(default_factory=Counter)
    rows: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, row: int | None = None) -> None:
        self.counts[reason] += 1
        if row is not None:
            seen = self.rows.setdefault(reason, [])
            if len(seen) < SHOWN_ROWS:
                seen.append(row)

    def merge(self, other: "Skipped", prefix: str = "") -> None:
        """Add ``other``'s counts and row numbers, its reasons prefixed (``eval ``, say)."""
        for reason, n in other.counts.items():
            self.counts[prefix + reason] += n
            seen = self.rows.setdefault(prefix + reason, [])
            seen.extend(other.rows.get(reason, [])[:SHOWN_ROWS - len(seen)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """e.g. ``3 rows with an empty prompt (rows 4, 9, 12)``."""
        parts = []
        for reason, n in self.counts.most_common():
            rows = self.rows.get(reason)
            where = ""
            if rows:
                more = ", ..." if n > len(rows) else ""
                where = f" ({'row' if len(rows) == 1 else 'rows'} {', '.join(map(str, rows))}{more})"
            parts.append(f"{n} {reason}{where}")
        return ", ".join(parts) or "none"


def detect(columns: list[str], formats: dict[str, tuple[str, ...]], source: str, kind: str) -> str:
    for name, needed in formats.items():
        if all(c in columns for c in needed):
            return name
    wanted = " | ".join("+".join(v) for v in formats.values())
    raise DataError(f"{source}: no usable columns for {kind} data: expected {wanted}; found {', '.join(columns) or 'none'}")


def effective_template(fmt: str, template: str) -> str:
    """The prompt format rows of format ``fmt`` are really rendered with under ``template``:
    chat messages use the tokenizer's chat template and Stack Exchange columns StackLLaMA's
    format unless another format is named. Recorded with adapters, so chat uses it too."""
    if template == "plain" and fmt == "messages":
        return "auto"
    if template == "plain" and fmt == "stackexchange":
        return "stackllama"
    return template


@dataclass
class TextPair:
    prompt: str  # already formatted (template applied), may be ""
    completion: str  # formatted; the EOS token is appended at tokenization


def _messages(value, source: str, row: int) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(f"{source}: row {row}: column 'messages' must be a list of {{role, content}} objects")
    for m in value:
        if not isinstance(m["content"], str):
            raise DataError(f"{source}: row {row}: column 'messages' has a non-string content ({type(m['content']).__name__})")
    return value or None


def _split_chat(messages: list[dict], fmt: str, tokenizer) -> TextPair | None:
    if messages[-1]["role"] != "assistant":
        return None
    head = render(messages[:-1], fmt, tokenizer, add_generation_prompt=True)
    full = render(messages, fmt, tokenizer)
    if not full.startswith(head):
        raise DataError("the chat template renders an answer that does not extend its prompt; pass --template chatml")
    answer = full[len(head):]
    # The template closes the turn itself; strip its trailing newline so EOS follows end-of-turn.
    return TextPair(head, answer.rstrip("\n"))


def sft_pairs(ds, source: str, template: str = "plain", tokenizer=None, fmt: str | None = None,
              placeholders: bool = False) -> tuple[list[TextPair], Skipped]:
    """Rows as (prompt, completion) texts with the template applied. With ``placeholders``, a
    skipped row gives None (still counted), so outputs line up with input rows."""
    fmt = fmt or detect(ds.column_names, SFT_FORMATS, source, "SFT")
    skipped = Skipped()
    out: list[TextPair] = []
    chat_fmt = effective_template(fmt, template)
    for i, row in enumerate(ds, start=1):
        if fmt == "messages":
            msgs = _messages(row["messages"], source, i)
            pair = _split_chat(msgs, chat_fmt, tokenizer) if msgs else None
            if pair is None:
                skipped.add("rows without a final assistant message" if msgs else "rows with empty messages", i)
                out.extend([None] * placeholders)
                continue
            out.append(pair)
            continue
        if fmt == "text":
            text = require_string(row["text"], source, i, "text")
            if text is None:
                skipped.add("rows with empty text", i)
                out.extend([None] * placeholders)
                continue
            out.append(TextPair("", text))
            continue
        p_col, c_col = SFT_FORMATS[fmt]
        prompt = require_string(row[p_col], source, i, p_col)
        completion = require_string(row[c_col], source, i, c_col)
        if prompt is None or completion is None:
            skipped.add(f"rows with an empty {p_col if prompt is None else c_col}", i)
            out.extend([None] * placeholders)
            continue
        tmpl = effective_template(fmt, template)
        out.append(TextPair(prompt_text(prompt, tmpl, tokenizer), completion_text(completion, tmpl, tokenizer)))
    if not any(out):
        raise DataError(f"{source}: no usable rows ({skipped.describe()} skipped)")
    return out, skipped


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def _common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


def preference_pairs(ds, source: str, template: str = "plain", tokenizer=None,
                     placeholders: bool = False) -> tuple[list[PreferencePair], Skipped]:
    """Rows as (prompt, chosen, rejected) texts with the template applied (``placeholders``: as
    in ``sft_pairs``)."""
    fmt = detect(ds.column_names, PREFERENCE_FORMATS, source, "preference")
    skipped = Skipped()
    out: list[PreferencePair] = []
    tmpl = effective_template(fmt, template)
    votes = "vote" in ds.column_names
    for i, row in enumerate(ds, start=1):
        if votes and row["vote"] in NO_PREFERENCE:
            skipped.add(NO_PREFERENCE[row["vote"]], i)
            out.extend([None] * placeholders)
            continue
        cols = PREFERENCE_FORMATS[fmt]
        values = [require_string(row[c], source, i, c) for c in cols]
        if any(v is None for v in values):
            missing = cols[[v is None for v in values].index(True)]
            skipped.add(f"rows with an empty {missing}", i)
            out.extend([None] * placeholders)
            continue
        if fmt == "implicit":
            chosen, rejected = values
            if chosen == rejected:
                skipped.add("pairs whose two answers are identical", i)
                out.extend([None] * placeholders)
                continue
            prompt = _common_prefix(chosen, rejected)
            # Split on a word boundary so both answers start with a whole token.
            cut = max(prompt.rfind(" "), prompt.rfind("\n"))
            prompt = prompt[: cut + 1] if cut >= 0 else ""
            out.append(PreferencePair(prompt, chosen[len(prompt):], rejected[len(prompt):]))
            continue
        prompt, chosen, rejected = values
        if chosen == rejected:
            skipped.add("pairs whose two answers are identical", i)
            out.extend([None] * placeholders)
            continue
        out.append(PreferencePair(prompt_text(prompt, tmpl, tokenizer), completion_text(chosen, tmpl, tokenizer),
                                  completion_text(rejected, tmpl, tokenizer)))
    if not any(out):
        raise DataError(f"{source}: no usable preference pairs ({skipped.describe()} skipped)")
    return out, skipped


def prompts(ds, source: str, template: str = "plain", tokenizer=None,
            placeholders: bool = False) -> tuple[list[str], Skipped]:
    """Prompt-only rows (PPO), formatted and opened for the answer (``placeholders``: as in
    ``sft_pairs``)."""
    fmt = detect(ds.column_names, PROMPT_FORMATS, source, "prompt")
    skipped = Skipped()
    out = []
    tmpl = effective_template(fmt, template)
    for i, row in enumerate(ds, start=1):
        if fmt == "messages":
            msgs = _messages(row["messages"], source, i)
            if not msgs:
                skipped.add("rows with empty messages", i)
                out.extend([None] * placeholders)
                continue
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            out.append(render(msgs, tmpl, tokenizer, add_generation_prompt=True))
            continue
        col = PROMPT_FORMATS[fmt][0]
        text = require_string(row[col], source, i, col)
        if text is None:
            skipped.add(f"rows with an empty {col}", i)
            out.extend([None] * placeholders)
            continue
        out.append(prompt_text(text, tmpl, tokenizer))
    if not any(out):
        raise DataError(f"{source}: no usable prompts ({skipped.describe()} skipped)")
    return out, skipped


PROMPT_COLUMNS = ("prompt", "question", "messages")


@dataclass
class PromptRow:
    """A formatted prompt and the row's other columns (an ``answer`` for exact-match rewards...)."""

    prompt: str
    columns: dict[str, Any]


def prompt_rows(ds, source: str, template: str = "plain", tokenizer=None,
                placeholders: bool = False) -> tuple[list[PromptRow | None], Skipped]:
    """``prompts`` with every non-prompt column kept beside its prompt (reward functions get them)."""
    texts, skipped = prompts(ds, source, template, tokenizer, placeholders=True)
    other = [c for c in ds.column_names if c not in PROMPT_COLUMNS]
    values = {c: ds[c] for c in other}
    rows = [PromptRow(t, {c: values[c][i] for c in other}) if t is not None else None for i, t in enumerate(texts)]
    return (rows if placeholders else [r for r in rows if r is not None]), skipped
