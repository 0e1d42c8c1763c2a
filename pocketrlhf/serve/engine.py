"""One frozen base in memory, any number of adapters on it, and streamed text: shared by chat and serve.

A model id names either the base (adapters disabled) or one adapter. Generation runs on ONE worker
thread that takes jobs in arrival order and decodes up to ``max_batch`` of them together
(continuous batching, batching.py): a job joins the running batch at the next step and leaves it
when it ends, and jobs for different adapters share each forward pass. Each job is a ``Stream``:
the worker pushes text deltas into it and the caller (the chat loop, or an HTTP response)
iterates them; ``Stream.cancel()`` (Ctrl-C, a client that went away) stops the generation at the
next token.

Replies stop on EOS, on the prompt format's end-of-turn/stop strings and on the caller's stop
strings; a stop string is never part of the text handed out (text that could be the start of a
stop string is held back until it is known not to be one).

An encoder-decoder base (T5, BART: ``models.loading.is_seq2seq``) is batched the same way on its
decoder: a request's prompt goes through the encoder once when it joins (under its own adapter),
the decoder's tokens are streamed (its start token is not part of the reply), with the same stop
rules (batching.py says how the encoder states and the cross-attention cache are kept). Such a
base has no chat template: ``auto`` renders its input as plain text
(``data.templates.seq2seq_format``).

torch and transformers are imported inside functions, so ``pocketrlhf chat --help`` stays instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from pocketrlhf.config import option
from pocketrlhf.errors import ConfigError, ModelLoadError
from pocketrlhf.models.spec import BaseSpec
from pocketrlhf.paths import missing_local

log = logging.getLogger("pocketrlhf")

PromptFormat = Literal["default", "plain", "auto", "stackllama", "chatml", "vicuna", "llama-2"]


@dataclasses.dataclass
class ServingOptions:
    """What to load and where: shared by ``chat`` and ``serve``."""

    model: str = option("", "a base model directory, or an adapter directory (its base comes from adapter_config.json)")
    base: str = option("", "put the adapter on this base instead of the one recorded in adapter_config.json")
    load_8bit: bool = option(False, "load the base with LLM.int8 weights (about half the memory of 16-bit)")
    load_4bit: bool = option(False, "load the base with 4-bit weights (NF4 by default)")
    quant_type: Literal["nf4", "fp4"] = option("nf4", "4-bit data type")
    double_quant: bool = option(True, "4-bit: quantize the quantization constants too (QLoRA double quantization)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = option("bfloat16", "4-bit: dtype of the matmuls")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "dtype of the non-quantized weights (auto: bf16/fp16 on GPU, fp32 on CPU)")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "where to run")
    cpu_offloading: bool = option(False, "CUDA only: keep the layers that do not fit on the GPU in CPU memory")
    max_gpu_memory: str = option("", "CUDA only: cap on the GPU memory used for weights, e.g. 8GiB (the rest is offloaded with --cpu-offloading)")
    template: PromptFormat = option(
        "default", "prompt format; default: the one the adapter was trained with (pocketrlhf_adapter.json), "
        "else auto (the tokenizer's chat template, ChatML without one)")
    trust_remote_code: bool = option(False, "run Python code shipped with the model (off: safer)")

    def base_spec(self, path: str) -> BaseSpec:
        """The base as ``--load-4bit``/``--load-8bit`` and the other options describe it."""
        if self.load_8bit and self.load_4bit:
            raise ConfigError("--load-8bit and --load-4bit are exclusive: pick one")
        quantization = "8bit" if self.load_8bit else "4bit" if self.load_4bit else "none"
        return BaseSpec(path, quantization, self.quant_type, self.double_quant, self.compute_dtype, self.dtype,
                        self.device, self.trust_remote_code)


# ---------------------------------------------------------------------------------------------
# Resolving what to load (cheap: reads a few JSON files, loads no weights).


@dataclasses.dataclass
class ServedModel:
    """One model id the engine answers to."""

    name: str
    adapter: str | None  # peft adapter name on the shared base; None: the base, adapters disabled
    source: str  # directory it came from
    template: str  # prompt format (a templates.py name)
    tokenizer_dir: str  # where its tokenizer is read from
    tokenizer: Any = None


@dataclasses.dataclass
class LoadPlan:
    base: str
    models: dict[str, ServedModel]
    default: str  # the model id used when a request names none (chat always uses it)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
_HAS_TOKENIZER = ("tokenizer_config.json", "tokenizer.json")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _HAS_TOKENIZER)


def adapter_template(adapter_dir: Path) -> str:
    """The prompt format an adapter was trained with (``auto`` when it does not say)."""
    from pocketrlhf.data.templates import FORMAT_NAMES
    from pocketrlhf.models.adapters import read_adapter_info

    try:
        info = read_adapter_info(adapter_dir)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {adapter_dir / 'pocketrlhf_adapter.json'}: {e}") from None
    template = info.get("template") or "auto"
    if template not in FORMAT_NAMES:
        log.warning("%s: unknown template '%s' in pocketrlhf_adapter.json; using auto", adapter_dir, template)
        return "auto"
    return template


def _adapter_id(path: Path) -> str:
    # runs/sft/adapter -> "sft": the run directory names an adapter better than "adapter" does.
    name = path.name
    if name in ("adapter", "final", "") and path.parent.name:
        name = path.parent.name
    return name


def parse_adapters(spec: str) -> dict[str, str]:
    """``name=dir,name2=dir2`` as {name: dir}."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not eq or not name or not path:
            raise ConfigError(f"--adapters: expected name=dir, got '{item}'")
        if not _NAME.match(name):
            raise ConfigError(f"--adapters: '{name}' is not a usable model id (letters, digits, . _ : / -)")
        if name in out:
            raise ConfigError(f"--adapters: the name '{name}' is given twice")
        out[name] = path
    return out


def plan_models(opts: ServingOptions, adapters: dict[str, str] | None = None, name: str = "") -> LoadPlan:
    """Which base to load and which model ids to serve, checked before any weights are read."""
    if not opts.model:
        raise ConfigError("no model given: pass a base model directory or an adapter directory")
    from pocketrlhf.models.adapters import adapter_base, is_adapter_dir

    primary = Path(opts.model).expanduser()
    models: dict[str, ServedModel] = {}
    if is_adapter_dir(primary):
        base = adapter_base(primary, opts.base)
    else:
        if opts.base:
            raise ConfigError(f"--base only applies to an adapter directory, and {opts.model} has no adapter_config.json")
        if not primary.exists() and (missing_local(opts.model) or "/" not in opts.model):
            raise ModelLoadError(f"{opts.model} does not exist (expected a model or adapter directory)")
        base = opts.model
    base_path = Path(base).expanduser()
    base_dir = str(base_path.resolve()) if base_path.exists() else base
    base_id = base_path.name or base
    base_template = opts.template
    if base_template == "default":
        # A model written by `pocketrlhf merge` records the prompt format its adapter was trained with.
        merged = (base_path / "pocketrlhf_adapter.json").is_file()
        base_template = adapter_template(base_path) if merged else "auto"
    models[base_id] = ServedModel(base_id, None, base_dir, base_template, base_dir)
    default = base_id

    entries = []
    if is_adapter_dir(primary):
        entries.append((name or _adapter_id(primary.resolve()), primary))
    for adapter_name, path in (adapters or {}).items():
        p = Path(path).expanduser()
        if not is_adapter_dir(p):
            raise ModelLoadError(f"adapter '{adapter_name}': {path} is not an adapter directory (no adapter_config.json)")
        entries.append((adapter_name, p))
    for i, (adapter_name, path) in enumerate(entries):
        if adapter_name in models:
            adapter_name = f"{adapter_name}-adapter" if i == 0 and adapter_name == base_id else adapter_name
            if adapter_name in models:
                raise ConfigError(f"two served models would both be called '{adapter_name}'; rename one in --adapters")
        recorded = adapter_base(path, base_dir if (i == 0 and opts.base) else "")
        rec = Path(recorded).expanduser()
        if rec.exists() and base_path.exists() and rec.resolve() != base_path.resolve():
            log.warning("adapter '%s' was trained on %s but is served on %s", adapter_name, recorded, base_dir)
        template = adapter_template(path) if opts.template == "default" else opts.template
        tok_dir = str(path.resolve()) if _has_tokenizer(path) else base_dir
        models[adapter_name] = ServedModel(adapter_name, adapter_name, str(path.resolve()), template, tok_dir)
        if i == 0 and is_adapter_dir(primary):
            default = adapter_name
    check_seq2seq_formats(base_dir, models)
    return LoadPlan(base_dir, models, default)


def check_seq2seq_formats(base: str, models: dict[str, ServedModel]) -> None:
    """A one-line error, before loading, for a chat format on an encoder-decoder base, as in
    training (``data.templates.check_seq2seq_template``). ``auto`` (what a base model gets by
    default) becomes ``plain`` at load, said in the log."""
    from pocketrlhf.data.templates import check_seq2seq_template
    from pocketrlhf.models.loading import is_seq2seq

    if not is_seq2seq(base):
        return
    for served in models.values():
        if served.template != "auto":
            try:
                check_seq2seq_template(served.template)
            except ConfigError as e:
                raise ConfigError(f"{served.name}: {e}") from None


def seq2seq_templates(models) -> None:
    """Prompt formats on an encoder-decoder base, said in the log when they change: ``auto`` is
    the input text as it is (plain) unless the tokenizer has a chat template of its own."""
    from pocketrlhf.data.templates import seq2seq_format

    for served in models:
        fmt = seq2seq_format(served.template, served.tokenizer)
        if fmt != served.template:
            log.info("%s: an encoder-decoder base has no chat template; prompt format '%s' sends the text as it is "
                     "to the encoder (plain)", served.name, served.template)
            served.template = fmt


# ---------------------------------------------------------------------------------------------
# Device placement.

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB)\s*$", re.IGNORECASE)


def max_memory_map(device: str, cpu_offloading: bool, max_gpu_memory: str) -> dict | None:
    """accelerate's ``max_memory`` for ``device_map="auto"``, or None for "everything on ``device``".

    Offloading splits weights between a CUDA GPU and the CPU; on any other device it cannot do
    anything, so asking for it there is an error rather than a silent no-op.
    """
    if not (cpu_offloading or max_gpu_memory):
        return None
    asked = " and ".join(f for f, on in (("--cpu-offloading", cpu_offloading), ("--max-gpu-memory", max_gpu_memory)) if on)
    if not device.startswith("cuda"):
        raise ConfigError(f"{asked} split the weights between a CUDA GPU and the CPU; this run is on {device} "
                          "(no CUDA GPU), where they have no effect: leave them out")
    if max_gpu_memory and not _MEMORY.match(max_gpu_memory):
        raise ConfigError(f"--max-gpu-memory: expected a size such as 8GiB or 7500MiB, got '{max_gpu_memory}'")
    index = int(device.split(":")[1]) if ":" in device else 0
    limits: dict[Any, str] = {}
    if max_gpu_memory:
        number, unit = _MEMORY.match(max_gpu_memory).groups()
        limits[index] = f"{number}{unit}"
    else:
        import torch

        free, _ = torch.cuda.mem_get_info(index)
        limits[index] = f"{int(free * 0.9) // 2**20}MiB"
    if cpu_offloading:
        import psutil

        limits["cpu"] = f"{int(psutil.virtual_memory().available * 0.9) // 2**20}MiB"
    return limits


# ---------------------------------------------------------------------------------------------
# Sampling settings and the stream of one reply.


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise ConfigError naming the first out-of-range setting."""
        problems = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", 0 <= self.temperature <= 100, "between 0 and 100"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("min_p", 0 <= self.min_p <= 1, "between 0 and 1"),
            ("repetition_penalty", self.repetition_penalty > 0, "above 0"),
        ]
        for name, ok, want in problems:
            if not ok:
                raise ConfigError(f"{name} must be {want}, got {getattr(self, name)}")


_END = object()


class Stream:
    """Text deltas of one generation. Iterate it (``for`` or ``async for``) to get them as they come.

    After the end: ``finish_reason`` is "stop" (EOS or a stop string), "length" (token limit) or
    "cancelled"; ``completion_tokens`` counts the tokens the model generated.
    """

    def __init__(self, model: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None = None):
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.started: float | None = None  # first token
        self.ended: float | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def tokens_per_s(self) -> float:
        if self.started is None or self.ended is None or self.completion_tokens < 2:
            return 0.0
        # The first token also pays for the prompt; the rate is over the ones after it.
        return (self.completion_tokens - 1) / max(self.ended - self.started, 1e-9)

    def _put(self, item: Any) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self._cancel.set()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason = reason
        self.error = error
        self.ended = time.monotonic()
        self._done.set()
        self._put(_END)

    def __iter__(self) -> Iterator[str]:
        assert isinstance(self._queue, queue.Queue), "this stream was made for async iteration"
        while True:
            try:
                # A timeout keeps the wait interruptible by Ctrl-C on every platform.
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                break
            yield item
        if self.error is not None:
            raise self.error

    async def __aiter__(self):
        while True:
            item = await self._queue.get()
            if item is _END:
                break
            yield item
        if self.error is not None:
            raise self.error

    def text(self) -> str:
        """Consume the whole reply."""
        return "".join(self)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: an unfinished UTF-8 character, or the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return max(n, keep)


class _Decoder:
    """A stopping criterion that also turns each new token into text for the stream.

    generate() calls it once per step, right after appending the new token, so it sees every
    token exactly once and can stop generation on the same step a stop string completes.
    """

    def __init__(self, stream: Stream, tokenizer, tok_lock: threading.Lock, stop_ids: set[int],
                 stops: tuple[str, ...]):
        self.stream, self.tokenizer, self.tok_lock = stream, tokenizer, tok_lock
        self.stop_ids, self.stops = stop_ids, tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.seen = 0
        self.offset: int | None = None
        self.emitted = 0
        self.finished = False
        self.reason = ""

    def decode(self) -> str:
        with self.tok_lock:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _emit(self, text: str, upto: int) -> None:
        if upto > self.emitted:
            self.stream._put(text[self.emitted:upto])
            self.emitted = upto

    def feed(self, token: int) -> bool:
        """Take one generated token; True once the reply has ended (EOS or a stop string)."""
        self.seen += 1
        if self.finished:
            return True
        if self.stream.started is None:
            self.stream.started = time.monotonic()
        self.stream.completion_tokens += 1
        if token in self.stop_ids:
            # Text held back as a possible start of a stop string is the reply's end after all.
            if self.ids:
                text = self.decode()
                self._emit(text, len(text))
            self.finish("stop")
            return True
        self.ids.append(token)
        text = self.decode()
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._emit(text, min(hits))
            self.finish("stop")
            return True
        self._emit(text, len(text) - _held_back(text, self.stops))
        return False

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        if self.offset is None:
            self.offset = input_ids.shape[1] - 1
        for token in input_ids[0, self.offset + self.seen:].tolist():
            self.feed(token)
        stop = self.finished or self.stream.cancelled
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def finish(self, reason: str) -> None:
        self.finished = True
        self.reason = reason

    def close(self) -> str:
        """After generate(): flush held-back text and say why the reply ended."""
        if self.finished:
            return self.reason
        if self.stream.cancelled:
            return "cancelled"
        text = self.decode()
        self._emit(text, len(text))
        return "length"


# ---------------------------------------------------------------------------------------------
# The engine.


@dataclasses.dataclass
class _Job:
    stream: Stream
    served: ServedModel
    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[str, ...]


class Engine:
    """A loaded base (+ adapters), its tokenizers, and the one generation worker.

    ``max_batch`` > 1: the worker decodes up to that many requests together (continuous batching,
    adapters mixed in one pass; see batching.py). 1, or a model batching cannot handle: one
    request at a time through transformers' ``generate``.
    """

    def __init__(self, model, plan: LoadPlan, device: str, max_batch: int = 8):
        from pocketrlhf.models.loading import is_seq2seq
        from pocketrlhf.serve.batching import batchable

        self.model = model
        self.plan = plan
        self.models = plan.models
        self.default = plan.default
        self.device = device
        self.context_length = _context_length(model)
        self.seq2seq = is_seq2seq(model)
        # Token ids a prompt may use: a pad token added to the tokenizer can lie beyond the embeddings.
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        why = batchable(model) if max_batch > 1 else ""
        if why:
            log.info("serving one request at a time: batching cannot handle %s", why)
        self.max_batch = 1 if why else max(1, max_batch)
        self.tok_lock = threading.Lock()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0  # queued + running
        self._pending_lock = threading.Lock()
        self.busy = threading.Lock()  # held while a step runs (tests hold it to simulate a busy worker)
        self._closing = threading.Event()
        self._running: list[_Job] = []
        self.batch_sizes: list[int] = []  # rows of each decoding step (tests, benchmarks)
        self._accepted: set[str] | None = None  # the model's forward arguments
        self._mixed = None  # batching.MixedAdapters, made on the first batch that mixes adapters
        self._positions = None  # batching.DecoderPositions of an encoder-decoder, made on its first batch
        self._start_id = None
        if self.seq2seq:
            from pocketrlhf.models.forward import decoder_start_id, unwrap

            self._start_id = decoder_start_id(unwrap(model)[1])
        self._worker = threading.Thread(target=self._work, name="pocketrlhf-generate", daemon=True)
        self._worker.start()

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, opts: ServingOptions, adapters: dict[str, str] | None = None, name: str = "",
             plan: LoadPlan | None = None, max_batch: int = 8) -> "Engine":
        """Load the base once and every adapter onto it."""
        from pocketrlhf.models.adapters import load_adapter, spec_mismatch
        from pocketrlhf.models.forward import disable_dropout
        from pocketrlhf.models.generation import folder_generation_settings
        from pocketrlhf.models.loading import is_seq2seq, load_base, load_tokenizer, resolve_device

        spec = opts.base_spec("")
        plan = plan or plan_models(opts, adapters, name)
        spec = spec.replace(path=plan.base)
        device = resolve_device(opts.device)
        max_memory = max_memory_map(device, opts.cpu_offloading, opts.max_gpu_memory)
        log.info("loading %s%s on %s", plan.base, f" ({spec.describe()})" if spec.quantization != "none" else "", device)
        model = load_base(spec, training=False, max_memory=max_memory)
        disable_dropout(model)
        ignored = folder_generation_settings(model)
        if ignored:
            log.info("ignoring the model folder's generation settings (%s): replies use the request's or /set's "
                     "settings only", ", ".join(f"{k}={v}" for k, v in ignored.items()))
        tokenizers: dict[str, Any] = {}
        for served in plan.models.values():
            if served.tokenizer_dir not in tokenizers:
                tokenizers[served.tokenizer_dir] = load_tokenizer(served.tokenizer_dir, opts.trust_remote_code)
            served.tokenizer = tokenizers[served.tokenizer_dir]
        if is_seq2seq(model):
            seq2seq_templates(plan.models.values())
        kinds = {}
        for served in plan.models.values():
            if served.adapter is None:
                continue
            kind = json.loads((Path(served.source) / "adapter_config.json").read_text()).get("peft_type", "?")
            kinds.setdefault(kind, served.name)
            if len(kinds) > 1:
                first = next(iter(kinds))
                raise ModelLoadError(f"adapters of different kinds cannot share one base: '{kinds[first]}' is {first}, "
                                     f"'{served.name}' is {kind}; serve them separately")
            log.info("adapter %s <- %s", served.name, served.source)
            mismatch = spec_mismatch(served.source, spec)
            if mismatch:
                log.warning("%s (chat/serve: --load-4bit, --load-8bit, --quant-type, --double-quant)", mismatch)
            model = load_adapter(model, served.source, name=served.adapter)
        model.eval()
        return cls(model, plan, device, max_batch)

    # -- prompts --------------------------------------------------------------------------------

    def served(self, name: str | None) -> ServedModel:
        return self.models[name or self.default]

    def encode(self, name: str | None, text: str) -> list[int]:
        """Raw text as the model saw prompts in training (BOS added where the tokenizer adds one)."""
        from pocketrlhf.data.tokenize import encode

        with self.tok_lock:
            return encode(self.served(name).tokenizer, text, special=True)

    def chat_prompt(self, name: str | None, messages: list[dict], template: str | None = None) -> list[int]:
        """A conversation rendered in the model's prompt format, opened for the assistant's reply.

        ``plain`` adapters learned raw ``prompt completion EOS`` examples (packed back to back), so a
        conversation becomes exactly that: each past exchange tokenized as in training, then the
        new prompt. An encoder-decoder reads a ``plain`` conversation as one text, the turns on lines
        of their own (one prompt: exactly its training input).
        """
        from pocketrlhf.data.templates import render
        from pocketrlhf.data.tokenize import encode, tokenize_pair

        served = self.served(name)
        fmt = template or served.template
        tok = served.tokenizer
        with self.tok_lock:
            if fmt != "plain":
                return encode(tok, render(messages, fmt, tok, add_generation_prompt=True), special=True)
            if self.seq2seq:
                for m in messages:
                    if m["role"] not in ("system", "user", "assistant"):
                        raise ValueError(f"unknown role '{m['role']}' (system, user or assistant)")
                system = [m["content"] for m in messages if m["role"] == "system"][:1]
                turns = [m["content"] for m in messages if m["role"] != "system"]
                return encode(tok, "\n\n".join(system) + ("\n\n" if system and turns else "") + "\n".join(turns),
                              special=True)
            system = next((m["content"] for m in messages if m["role"] == "system"), "")
            turns = [m for m in messages if m["role"] != "system"]
            ids: list[int] = []
            pending_user: str | None = None
            for m in turns:
                content = m["content"]
                if pending_user is None and system:
                    content, system = f"{system}\n\n{content}", ""
                if m["role"] == "user":
                    if pending_user is not None:  # two user turns in a row: join them
                        pending_user += "\n" + content
                    else:
                        pending_user = content
                elif m["role"] == "assistant":
                    ids += tokenize_pair(tok, pending_user or "", m["content"], False).input_ids
                    pending_user = None
                else:
                    raise ValueError(f"unknown role '{m['role']}' (system, user or assistant)")
            if pending_user is not None:
                ids += encode(tok, pending_user, special=True)  # every packed example starts like this
            return ids

    def stop_strings(self, name: str | None, template: str | None = None) -> tuple[str, ...]:
        from pocketrlhf.data.templates import stop_strings

        served = self.served(name)
        fmt = template or served.template
        return () if fmt == "plain" else stop_strings(fmt, served.tokenizer)

    def room(self, prompt_tokens: int) -> int | None:
        """Reply tokens the model's positions leave after a prompt of this length (None: no limit;
        0 or less: the prompt alone does not fit). A causal LM's prompt and reply share its context;
        an encoder-decoder's prompt fills the encoder's positions and its reply the decoder's."""
        ctx = self.context_length
        if not ctx:
            return None
        if self.seq2seq:
            return ctx if prompt_tokens <= ctx else 0
        return ctx - prompt_tokens

    # -- generation -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, name: str | None, prompt_ids: list[int], params: SamplingParams,
               stops: tuple[str, ...] = (), loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue one generation; iterate the returned Stream for its text."""
        if self._closing.is_set():
            raise RuntimeError("the engine is closed")
        served = self.served(name)
        stream = Stream(served.name, len(prompt_ids), loop)
        with self._pending_lock:
            self._pending += 1
        self._jobs.put(_Job(stream, served, list(prompt_ids), params, tuple(dict.fromkeys((*stops, *params.stop)))))
        return stream

    def close(self, timeout: float = 60.0) -> None:
        """Cancel the running and queued jobs, stop the worker and wait for it: a thread still
        inside torch while the interpreter shuts down aborts the process ("terminate called
        without an active exception")."""
        self._closing.set()
        for job in list(self._running):
            job.stream.cancel()
        self._jobs.put(None)
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def _end(self, job: _Job, reason: str, error: BaseException | None = None) -> None:
        with self._pending_lock:
            self._pending -= 1
        # Only now does the caller see the end, so `pending` is already up to date for it.
        job.stream._finish(reason, error)

    def _take(self, block: bool, room: int) -> tuple[list[_Job], bool]:
        """Up to ``room`` queued jobs (waiting for one when ``block``), and whether close() was called."""
        jobs: list[_Job] = []
        while len(jobs) < room:
            try:
                job = self._jobs.get(block=block and not jobs)
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _work(self) -> None:
        from pocketrlhf.serve.batching import Batch

        batch = Batch()
        stopping = False
        while True:
            new, stop = self._take(block=not batch.rows, room=self.max_batch - len(batch))
            stopping = stopping or stop
            self._running = [r.job for r in batch.rows] + new
            with self.busy:
                if self._closing.is_set() or stopping:
                    for job in self._running:
                        job.stream.cancel()
                    for job in self._running:
                        self._end(job, "cancelled")
                    self._running = []
                    rest, _ = self._take(block=False, room=1 << 30)  # queued behind the sentinel
                    for job in rest:
                        job.stream.cancel()
                        self._end(job, "cancelled")
                    return
                if self.max_batch == 1:
                    for job in new:
                        self._run_alone(job)
                    continue
                try:
                    self._admit(batch, new)
                    if batch.rows:
                        self._decode(batch)
                except Exception as e:  # noqa: BLE001 - reported to each caller; the worker must survive
                    log.error("generation failed: %s: %s", type(e).__name__, e)
                    failed = {id(j): j for j in [r.job for r in batch.rows] + new}
                    batch = Batch()
                    for job in failed.values():
                        if not job.stream.done:
                            self._end(job, "error", e)
            self._running = []

    def _run_alone(self, job: _Job) -> None:
        """One request through transformers' generate (the engine without batching)."""
        error = None
        try:
            reason = "cancelled" if job.stream.cancelled else self._generate(job)
        except Exception as e:  # noqa: BLE001 - reported to the caller; the worker must survive
            log.error("generation failed: %s: %s", type(e).__name__, e)
            reason, error = "error", e
        self._end(job, reason, error)

    # -- batched decoding -------------------------------------------------------------------------

    def _input_device(self):
        import torch

        device = self.model.get_input_embeddings().weight.device
        if str(device) == "meta":  # offloaded embeddings: accelerate moves inputs itself
            device = torch.device(self.device)
        return device

    def _stop_ids(self, job: _Job) -> set[int]:
        tok = job.served.tokenizer
        stop_ids = {tok.eos_token_id}
        with self.tok_lock:
            for s in job.stops:
                ids = tok.encode(s, add_special_tokens=False)
                if len(ids) == 1:
                    stop_ids.add(ids[0])
        return stop_ids

    def _forward(self, ids, mask, positions, cache, adapters: list[str], encoder=None, encoder_mask=None):
        """Last-position logits [rows, vocab] of one pass over the rows (each with its adapter).
        An encoder-decoder takes the decoder's ids, mask and positions, and the rows' encoder
        states (``encoder``, ``encoder_mask``); its encoder does not run here."""
        import peft
        import torch

        from pocketrlhf.models.forward import unwrap
        from pocketrlhf.serve.batching import BASE_ADAPTER, DecoderPositions, MixedAdapters

        kwargs = {}
        switch = contextlib.nullcontext()
        if isinstance(self.model, peft.PeftModel):
            if len(set(adapters)) == 1:
                # One adapter for every row: switching the active adapter costs nothing per layer, while
                # peft's mixed-batch path pays hooks and row gathers in every LoRA layer.
                served = next((m for m in self.models.values() if (m.adapter or BASE_ADAPTER) == adapters[0]), None)
                switch = self._switch(served)
            else:
                if self._mixed is None:
                    self._mixed = MixedAdapters(self.model)
                switch = self._mixed.use(adapters)
        if self._accepted is None:
            self._accepted = set(inspect.signature(unwrap(self.model)[1].forward).parameters)
        accepted = self._accepted
        # transformers renamed past_key_values to cache (5.2x); pass the name this version reads.
        kwargs["cache" if "cache" in accepted else "past_key_values"] = cache
        if "logits_to_keep" in accepted:  # the vocabulary projection of the last position only
            kwargs["logits_to_keep"] = 1
        if encoder is None:
            with switch, torch.no_grad():
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
            return out.logits[:, -1, :]
        from transformers.modeling_outputs import BaseModelOutput

        if self._positions is None:
            self._positions = DecoderPositions(unwrap(self.model)[1])
        with switch, self._positions.use(positions), torch.no_grad():
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder), attention_mask=encoder_mask,
                             decoder_input_ids=ids, decoder_attention_mask=mask, use_cache=True, **kwargs)
        return out.logits[:, -1, :]

    def _encode(self, job: _Job):
        """The encoder's states [1, prompt tokens, d_model] for one job's prompt, under its adapter
        (alone: exactly what ``generate`` computes for it)."""
        import torch

        from pocketrlhf.models.forward import unwrap

        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self._input_device())
        with self._switch(job.served), torch.no_grad():
            return unwrap(self.model)[1].get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    def _admit(self, batch, jobs: list[_Job]) -> None:
        """Prefill the new jobs' prompts together, sample their first tokens, merge them into the batch."""
        import torch
        from transformers import DynamicCache

        from pocketrlhf.data.tokenize import left_pad
        from pocketrlhf.serve.batching import BASE_ADAPTER, Row

        rows = []
        for job in jobs:
            if job.stream.cancelled:
                self._end(job, "cancelled")
                continue
            p = job.params
            max_new = p.max_new_tokens
            if self.room(len(job.prompt_ids)) is not None:
                max_new = min(max_new, self.room(len(job.prompt_ids)))
            if max_new < 1:
                self._end(job, "length")
                continue
            generator = None
            if p.seed is not None and p.temperature > 0:
                generator = torch.Generator(device=self._input_device()).manual_seed(p.seed)
            # The repetition penalty covers the ids the model has been fed, as in generate: for an
            # encoder-decoder that is the decoder's (its start token), not the encoder's prompt.
            penalised = [self._start_id] if self.seq2seq else job.prompt_ids
            seen = torch.tensor(penalised, dtype=torch.long) if p.repetition_penalty != 1.0 else None
            decoder = _Decoder(job.stream, job.served.tokenizer, self.tok_lock, self._stop_ids(job), job.stops)
            rows.append(Row(job, decoder, job.served.adapter or BASE_ADAPTER, max_new, generator, seen))
        if not rows:
            return
        if self.seq2seq:
            self._admit_seq2seq(batch, rows)
            return
        from pocketrlhf.models.generation import safe_pad_id

        pad = safe_pad_id(self.model, rows[0].job.served.tokenizer)
        ids, mask = left_pad([r.job.prompt_ids for r in rows], pad)
        ids, mask = ids.to(self._input_device()), mask.to(self._input_device())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in rows])
        self._sample(rows, logits)
        batch.add(rows, cache, mask)
        self._retire(batch)

    def _admit_seq2seq(self, batch, rows) -> None:
        """Each new row's prompt through the encoder (one job at a time, its adapter on), then the
        decoder's start token for all of them in one pass, which fills their cross-attention
        cache; their first tokens are sampled and the rows merged into the batch."""
        import torch
        from transformers import DynamicCache, EncoderDecoderCache

        states = [self._encode(r.job)[0] for r in rows]
        lengths = torch.tensor([s.shape[0] for s in states], device=states[0].device)
        width = int(lengths.max())
        # Right-padded: the encoder states carry no position of their own in cross-attention.
        encoder = torch.stack([torch.cat([s, s.new_zeros(width - s.shape[0], s.shape[1])]) for s in states])
        encoder_mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()
        ids = torch.full((len(rows), 1), self._start_id, dtype=torch.long, device=self._input_device())
        mask = torch.ones_like(ids)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits = self._forward(ids, mask, torch.zeros_like(ids), cache, [r.adapter for r in rows], encoder, encoder_mask)
        self._sample(rows, logits)
        batch.add(rows, cache, mask, encoder, encoder_mask)
        self._retire(batch)

    def _decode(self, batch) -> None:
        """One token for every row of the batch."""
        import torch

        device = batch.mask.device
        ids = torch.tensor([[r.last] for r in batch.rows], dtype=torch.long, device=device)
        positions = batch.mask.sum(-1, keepdim=True)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        self.batch_sizes.append(len(batch))
        logits = self._forward(ids, batch.mask, positions, batch.cache, [r.adapter for r in batch.rows],
                               batch.encoder, batch.encoder_mask)
        self._sample(batch.rows, logits)
        self._retire(batch)

    def _sample(self, rows, logits) -> None:
        import torch

        from pocketrlhf.serve.batching import next_token

        for row, row_logits in zip(rows, logits):
            p = row.job.params
            token = next_token(row_logits, row.seen, p.temperature, p.top_k, p.top_p, p.min_p,
                               p.repetition_penalty, row.generator)
            row.last = token
            row.generated += 1
            if row.seen is not None:
                row.seen = torch.cat([row.seen, torch.tensor([token], dtype=torch.long)])
            row.decoder.feed(token)

    def _retire(self, batch) -> None:
        """Finish the rows that ended (stop, length, cancelled) and drop them from the batch."""
        alive = []
        for i, row in enumerate(batch.rows):
            if row.decoder.finished:
                self._end(row.job, row.decoder.reason)
            elif row.job.stream.cancelled:
                self._end(row.job, "cancelled")
            elif row.generated >= row.max_new:
                self._end(row.job, row.decoder.close())
            else:
                alive.append(i)
        batch.keep(alive)

    def _switch(self, served: ServedModel):
        import peft

        from pocketrlhf.models.adapters import AdapterSet

        if not isinstance(self.model, peft.PeftModel):
            return contextlib.nullcontext()
        return AdapterSet(self.model).use(served.adapter)

    def _generate(self, job: _Job) -> str:
        """Run one job; returns its finish reason."""
        import torch
        from transformers import StoppingCriteriaList

        from pocketrlhf.models.generation import generation_config, inference_mode

        tok, p = job.served.tokenizer, job.params
        stop_ids = self._stop_ids(job)
        max_new = p.max_new_tokens
        if self.room(len(job.prompt_ids)) is not None:
            max_new = min(max_new, self.room(len(job.prompt_ids)))
        if max_new < 1:
            return "length"
        cfg = generation_config(tok, self.model, max_new, p.temperature, p.top_p, p.top_k,
                                min_p=p.min_p or None, repetition_penalty=p.repetition_penalty,
                                stop_token_ids=sorted(stop_ids))
        decoder = _Decoder(job.stream, tok, self.tok_lock, stop_ids, job.stops)
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self._input_device())
        if p.seed is not None:
            torch.manual_seed(p.seed)
        with self._switch(job.served), inference_mode(self.model):
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                stopping_criteria=StoppingCriteriaList([decoder]))
        return decoder.close()


def _context_length(model) -> int | None:
    from pocketrlhf.models.forward import unwrap

    _, lm = unwrap(model)
    cfg = lm.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
