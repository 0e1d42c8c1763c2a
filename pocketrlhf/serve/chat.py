"""``pocketrlhf chat MODEL_OR_ADAPTER_DIR``: a terminal chat that streams the reply as it is generated.

Two styles: ``simple`` (a person at a terminal: ``>>>`` prompt, ``/commands``, \"\"\" blocks for
multi-line input, Ctrl-C stops a reply, Ctrl-D leaves) and ``programmatic`` (a script: one JSON
object per line in, one per line out). The loop reads from and writes to any text streams, so the
tests drive it directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from pathlib import Path
from typing import Any, Literal, TextIO

from pocketrlhf.config import coerce, option
from pocketrlhf.errors import ConfigError
from pocketrlhf.serve.engine import SamplingParams, ServingOptions


@dataclasses.dataclass
class ChatConfig(ServingOptions):
    system: str = option("", "system message (default: the prompt format's own, if it has one)")
    temperature: float = option(0.7, "sampling temperature (0: greedy)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    top_k: int = option(0, "sample among the k most likely tokens (0: off)")
    repetition_penalty: float = option(1.0, "above 1 discourages repeating tokens")
    max_new_tokens: int = option(512, "longest reply, in tokens")
    seed: int = option(-1, "sampling seed, for reproducible replies (-1: random)")
    style: Literal["simple", "programmatic"] = option(
        "simple", "simple: for a person at a terminal; programmatic: JSON lines in and out, for scripts")
    verbose: bool = option(False, "after each reply, print its token count and speed (tokens/s)")


HELP = """commands:
  /clear               forget the conversation (also /reset)
  /regen               generate the last reply again
  /undo                remove the last exchange
  /system [TEXT]       set the system message (no text: back to the default)
  /set                 show the settings; /set temperature=0.2 top_p=0.9 max_new_tokens=256 ...
                       (also top_k, min_p, repetition_penalty, seed, verbose)
  /save FILE           write the conversation as JSON
  /load FILE           continue a saved conversation
  /help                this text
  /exit                leave (also /quit, /bye, or Ctrl-D)
Ctrl-C stops a reply. Start and end a message with \"\"\" to write several lines.
A message that starts with // is sent with a single /."""

COMMANDS = ("/clear", "/reset", "/regen", "/undo", "/system", "/set", "/save", "/load", "/help", "/exit", "/quit", "/bye")
SETTINGS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens", "repetition_penalty", "seed", "verbose")
_SETTING_TYPES = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_new_tokens": int,
                  "repetition_penalty": float, "seed": int, "verbose": bool}


class ChatSession:
    """One conversation with an engine's default model, over injectable text streams."""

    def __init__(self, engine, params: SamplingParams, system: str = "", style: str = "simple",
                 verbose: bool = False, inp: TextIO | None = None, out: TextIO | None = None):
        self.engine = engine
        self.params = params
        self.system = system
        self.style = style
        self.verbose = verbose
        self.inp = inp if inp is not None else sys.stdin
        self.out = out if out is not None else sys.stdout
        self.messages: list[dict] = []  # user/assistant turns; the system message is kept apart
        self.served = engine.served(None)

    # -- output ---------------------------------------------------------------------------------

    def _emit(self, obj: dict) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()

    def info(self, text: str) -> None:
        if self.style == "programmatic":
            self._emit({"type": "info", "message": text})
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def error(self, text: str) -> None:
        if self.style == "programmatic":
            self._emit({"type": "error", "message": text})
        else:
            self.out.write(f"error: {text}\n")
            self.out.flush()

    # -- input ----------------------------------------------------------------------------------

    def _readline(self, prompt: str) -> str | None:
        """One line without its newline, or None at end of input (Ctrl-D)."""
        if self.style == "simple" and self.inp is sys.stdin and sys.stdin.isatty():
            try:
                return input(prompt)  # line editing and history through readline
            except EOFError:
                return None
        if self.style == "simple":
            self.out.write(prompt)
            self.out.flush()
        line = self.inp.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    def read_message(self) -> str | None:
        """A message: one line, or a \"\"\"-delimited block of lines."""
        line = self._readline(">>> ")
        if line is None or not line.lstrip().startswith('"""'):
            return line
        text = line.lstrip()[3:]
        if text.rstrip().endswith('"""'):
            return text.rstrip()[:-3]
        lines = [text] if text else []
        while True:
            more = self._readline("... ")
            if more is None:
                break
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                break
            lines.append(more)
        return "\n".join(lines).strip("\n")

    def read_programmatic(self) -> tuple[str, str] | None:
        """``("user"|"system"|"command", text)`` from one JSON line; None at end of input."""
        while True:
            line = self._readline("")
            if line is None:
                return None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                self.error(f"not a JSON line ({e.msg} at column {e.colno}): {line[:80]}")
                continue
            if isinstance(obj, str):
                return "user", obj
            if not isinstance(obj, dict):
                self.error('expected {"content": "..."}, {"role": "system", "content": "..."} or {"command": "/..."}')
                continue
            if isinstance(obj.get("command"), str):
                return "command", obj["command"]
            content, role = obj.get("content"), obj.get("role", "user")
            if not isinstance(content, str) or role not in ("user", "system"):
                self.error('expected {"content": "..."}, {"role": "system", "content": "..."} or {"command": "/..."}')
                continue
            return role, content

    # -- the loop -------------------------------------------------------------------------------

    def banner(self) -> None:
        s = self.served
        ctx = self.engine.context_length
        if self.style == "programmatic":
            self._emit({"type": "ready", "model": s.name, "template": s.template, "context_length": ctx})
        else:
            self.out.write(f"chatting with {s.name} (prompt format: {s.template}"
                           f"{f', context {ctx} tokens' if ctx else ''}). /help for commands, Ctrl-D to leave.\n")
            self.out.flush()

    def run(self) -> None:
        self.banner()
        while True:
            try:
                if self.style == "programmatic":
                    item = self.read_programmatic()
                    if item is None:
                        return
                    kind, text = item
                else:
                    text = self.read_message()
                    if text is None:
                        self.out.write("\n")
                        return
                    kind = "command" if text.startswith("/") and not text.startswith("//") else "user"
                    text = text[1:] if text.startswith("//") else text
            except KeyboardInterrupt:
                self.out.write("\n")
                self.info("(use /exit or Ctrl-D to leave)")
                continue
            if kind == "system":
                self.command(f"/system {text}")
            elif kind == "command":
                if self.command(text) == "exit":
                    return
            elif text.strip():
                self.messages.append({"role": "user", "content": text})
                self.reply()

    # -- commands -------------------------------------------------------------------------------

    def command(self, line: str) -> str | None:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name == "/help":
            self.info(HELP)
        elif name in ("/clear", "/reset"):
            self.messages.clear()
            self.info("(conversation cleared)")
        elif name == "/undo":
            if not self.messages:
                self.info("(nothing to undo)")
                return None
            if self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
            self.info("(removed the last exchange)")
        elif name == "/regen":
            if not self.messages or self.messages[-1]["role"] != "assistant":
                self.info("(no reply to regenerate)")
                return None
            self.messages.pop()
            self.reply()
        elif name == "/system":
            self.system = arg
            self.info(f"(system message set: {arg})" if arg else "(system message back to the default)")
        elif name == "/set":
            self.set_options(arg)
        elif name == "/save":
            self.save(arg)
        elif name == "/load":
            self.load(arg)
        else:
            close = difflib.get_close_matches(name, COMMANDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.error(f"unknown command {name}{hint}; /help lists them (start a message with // to send a '/')")
        return None

    def settings(self) -> dict[str, Any]:
        p = self.params
        return {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
                "max_new_tokens": p.max_new_tokens, "repetition_penalty": p.repetition_penalty,
                "seed": -1 if p.seed is None else p.seed, "verbose": self.verbose}

    def set_options(self, arg: str) -> None:
        if not arg:
            self.info(" ".join(f"{k}={v}" for k, v in self.settings().items()))
            return
        updates: dict[str, Any] = {}
        for item in arg.replace(",", " ").split():
            key, eq, value = item.partition("=")
            key = key.replace("-", "_").lower()
            if not eq or not value:
                self.error(f"/set: expected key=value, got '{item}'")
                return
            if key not in SETTINGS:
                close = difflib.get_close_matches(key, SETTINGS, n=1)
                self.error(f"/set: unknown setting '{key}'{f' (did you mean {close[0]}?)' if close else ''}; "
                           f"one of {', '.join(SETTINGS)}")
                return
            try:
                updates[key] = coerce(_SETTING_TYPES[key], value, f"/set {key}")
            except ConfigError as e:
                self.error(str(e))
                return
        verbose = updates.pop("verbose", self.verbose)
        if "seed" in updates:
            updates["seed"] = None if updates["seed"] < 0 else updates["seed"]
        candidate = dataclasses.replace(self.params, **updates)
        try:
            candidate.check()
        except ConfigError as e:
            self.error(f"/set: {e}")
            return
        self.params, self.verbose = candidate, verbose
        self.info(" ".join(f"{k}={v}" for k, v in self.settings().items()))

    def save(self, arg: str) -> None:
        if not arg:
            self.error("/save needs a file name")
            return
        path = Path(arg).expanduser()
        if not path.suffix:
            path = path.with_suffix(".json")
        data = {"model": self.served.name, "template": self.served.template, "system": self.system,
                "messages": self.messages, "settings": self.settings()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            self.error(f"/save: cannot write {path}: {e.strerror or e}")
            return
        self.info(f"(saved {len(self.messages)} messages to {path})")

    def load(self, arg: str) -> None:
        if not arg:
            self.error("/load needs a file name")
            return
        path = Path(arg).expanduser()
        if not path.exists() and not path.suffix and path.with_suffix(".json").exists():
            path = path.with_suffix(".json")
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            self.error(f"/load: cannot read {path}: {e.strerror or e}")
            return
        except json.JSONDecodeError as e:
            self.error(f"/load: {path}:{e.lineno}:{e.colno}: not JSON ({e.msg})")
            return
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list):
            self.error(f"/load: {path}: expected a list of messages or an object with \"messages\"")
            return
        system = data.get("system", "") if isinstance(data, dict) else ""
        turns = []
        for i, m in enumerate(messages, start=1):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                self.error(f"/load: {path}: message {i} is not {{\"role\": system|user|assistant, \"content\": text}}")
                return
            if m["role"] == "system":
                system = m["content"]
            else:
                turns.append({"role": m["role"], "content": m["content"]})
        self.messages, self.system = turns, system if isinstance(system, str) else ""
        self.info(f"(loaded {len(turns)} messages from {path})")
        if self.style == "simple":
            for m in turns:
                self.out.write(f"{'>>> ' if m['role'] == 'user' else ''}{m['content']}\n")
            self.out.flush()

    # -- replies --------------------------------------------------------------------------------

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt_ids(self) -> list[int] | None:
        """The prompt, dropping the oldest exchanges while it leaves too little room for a reply."""
        ctx = self.engine.context_length
        dropped = 0
        while True:
            ids = self.engine.chat_prompt(None, self.conversation())
            room = self.engine.room(len(ids))
            if room is None or room >= min(self.params.max_new_tokens, ctx // 2):
                break
            if len(self.messages) <= 1:
                if room >= 1:
                    break
                self.messages.pop()
                self.error(f"the message is {len(ids)} tokens, and the model's context is {ctx} tokens; "
                           "send something shorter")
                return None
            del self.messages[:2]  # the oldest user message and its reply
            dropped += 1
        if dropped:
            self.info(f"(the conversation outgrew the {ctx}-token context: dropped the {dropped} oldest exchange(s))")
        return ids

    def reply(self) -> None:
        """Generate the assistant's turn for the conversation so far, streaming it out."""
        ids = self.prompt_ids()
        if ids is None:
            return
        stream = self.engine.submit(None, ids, self.params, self.engine.stop_strings(None))
        parts: list[str] = []
        try:
            for delta in stream:
                parts.append(delta)
                if self.style == "programmatic":
                    self._emit({"type": "delta", "content": delta})
                else:
                    self.out.write(delta)
                    self.out.flush()
        except KeyboardInterrupt:
            stream.cancel()
            stream.wait()
            self._drop_exchange()
            if self.style == "simple":
                self.out.write("\n")
            self.info("(stopped; that exchange was dropped)")
            return
        except Exception as e:  # noqa: BLE001 - a failed generation must not end the chat
            self._drop_exchange()
            self.error(f"generation failed: {type(e).__name__}: {e}")
            return
        text = "".join(parts)
        self.messages.append({"role": "assistant", "content": text})
        if self.style == "programmatic":
            self._emit({"type": "reply", "content": text, "finish_reason": stream.finish_reason,
                        "prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
                        "tokens_per_s": round(stream.tokens_per_s, 2)})
            return
        self.out.write("\n")
        if self.verbose:
            note = ", cut at max_new_tokens" if stream.finish_reason == "length" else ""
            self.out.write(f"[{stream.completion_tokens} tokens, {stream.tokens_per_s:.1f} tokens/s{note}]\n")
        self.out.flush()

    def _drop_exchange(self) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()


def sampling_params(cfg: ChatConfig) -> SamplingParams:
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty,
                            seed=None if cfg.seed < 0 else cfg.seed)
    params.check()
    return params


def run(cfg: ChatConfig) -> None:
    from pocketrlhf.logs import setup_logging
    from pocketrlhf.serve.engine import Engine

    setup_logging()
    params = sampling_params(cfg)
    engine = Engine.load(cfg)
    try:
        ChatSession(engine, params, cfg.system, cfg.style, cfg.verbose).run()
    finally:
        engine.close()
