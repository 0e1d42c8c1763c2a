"""``pocketrlhf serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one base and its adapters.

    pocketrlhf serve runs/sft/adapter --adapters dpo=runs/dpo/adapter --load-4bit

serves the base (adapters disabled), ``sft`` and ``dpo`` as three model ids from ONE copy of the
base weights. The port opens at once; the model loads in the background (``GET /health`` says 503
until it is ready). Requests go to one generation worker in arrival order; a streaming client
that disconnects cancels its generation. Errors use OpenAI's ``{"error": {...}}`` shape.
"""

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

from pocketrlhf.config import option
from pocketrlhf.errors import ConfigError, PocketError
from pocketrlhf.serve.engine import SamplingParams, ServingOptions
from pocketrlhf.serve.feedback import (VOTES, Comparisons, FeedbackFile, journal_path, summary, valid_annotator,
                                      vote_rows)

log = logging.getLogger("pocketrlhf")


@dataclasses.dataclass
class ServeConfig(ServingOptions):
    adapters: str = option("", "more adapters on the same base, each served as its own model id: name=dir,name2=dir2")
    name: str = option("", "model id of the positional adapter (default: its folder's name; runs/x/adapter is 'x')")
    host: str = option("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = option(8000, "port to listen on")
    api_key: str = option("", "require 'Authorization: Bearer KEY' on /v1 routes (also read from POCKETRLHF_API_KEY)")
    max_tokens: int = option(512, "reply length limit when a request sets no max_tokens")
    max_batch: int = option(8, "requests generated together, in one batch across adapters (1: one at a time)")
    max_queue: int = option(64, "requests that may wait for a place in the batch; more get a 503")
    max_body_bytes: int = option(1_000_000, "largest accepted request body (413 above)")
    feedback_file: str = option("feedback/votes.jsonl", "where the web page's compare votes are appended "
                                "(JSONL preference pairs that rm and dpo read)")
    web: bool = option(True, "serve the web page (chat, compare, votes) at /")
    cors_origins: str = option("", "comma-separated origins allowed by CORS, or * (empty: no CORS headers)")
    allowed_hosts: str = option("", "comma-separated names clients may reach the server by (the Host header), or *; "
                                "empty: localhost, 127.0.0.1 and ::1 when listening on a loopback address, any otherwise")
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "server log verbosity")


# ---------------------------------------------------------------------------------------------
# Requests a browser was tricked into sending.

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _host_name(host: str) -> str:
    """The name part of a Host header or an origin's authority: ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def allowed_host_names(cfg: "ServeConfig") -> tuple[str, ...] | None:
    """The Host names the server answers to, or None for any."""
    names = tuple(n.strip().lower() for n in cfg.allowed_hosts.split(",") if n.strip())
    if "*" in names:
        return None
    if _is_loopback(cfg.host):
        return LOOPBACK_NAMES + names
    return names or None


def cross_site_refusal(method: str, headers: dict[str, str], hosts: tuple[str, ...] | None,
                       cors_origins: tuple[str, ...]) -> str | None:
    """Why a request must be refused, or None.

    A server on 127.0.0.1 without an API key trusts whoever can connect, and any web page the
    user opens can make the browser connect: a page on another site can POST a form (no CORS
    preflight for form content types, so votes could be written into the feedback file), and a
    DNS name rebound to 127.0.0.1 makes the browser treat the server as that page's own origin,
    able to read replies. The Host header foils rebinding (the browser sends the attacker's
    name), and a cross-origin Origin on a request that changes state foils forms and fetches.
    """
    host = headers.get("host", "")
    if hosts is not None and _host_name(host) not in hosts:
        return (f"Host '{host}' is not one this server answers to ({', '.join(hosts)}); "
                "start it with --allowed-hosts NAME to reach it by another name")
    origin = headers.get("origin")
    if method in ("GET", "HEAD", "OPTIONS") or origin is None:
        return None
    authority = origin.partition("://")[2]
    if authority.lower() == host.lower() or "*" in cors_origins or origin in cors_origins:
        return None
    return f"cross-origin {method} from {origin} refused (allow it with --cors-origins {origin})"


class CrossSiteGuard:
    """ASGI middleware applying ``cross_site_refusal`` to every HTTP request (pages and static files
    included); refusals are OpenAI-shaped 403s."""

    def __init__(self, app, hosts: tuple[str, ...] | None, cors_origins: tuple[str, ...]):
        self.app, self.hosts, self.cors_origins = app, hosts, cors_origins

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            why = cross_site_refusal(scope["method"], headers, self.hosts, self.cors_origins)
            if why:
                from fastapi.responses import JSONResponse

                log.warning("refused %s %s: %s", scope["method"], scope["path"], why)
                body = APIError(403, why, "invalid_request_error", code="cross_site_request").body()
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# OpenAI-shaped errors.


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------
# Request parsing (hand-written rather than pydantic: every message names the offending field).

_NUMBER = (int, float)

# Fields each route understands; anything else is ignored with a log line.
_SAMPLING_FIELDS = {"model", "temperature", "top_p", "max_tokens", "stop", "n", "seed", "stream", "stream_options",
                    "top_k", "min_p", "repetition_penalty", "user", "presence_penalty", "frequency_penalty"}
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt"}
_SILENT = {"user"}


def _get(body: dict, name: str, kinds: tuple, default: Any, check: Callable[[Any], bool] | None = None,
         want: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok or (check is not None and not check(value)):
        raise _bad(f"'{name}' must be {want}, got {json.dumps(value)[:60]}", param=name)
    return value


def parse_sampling(body: dict, default_max_tokens: int) -> tuple[SamplingParams, int | None, int]:
    """Sampling settings, the requested max_tokens (None: not given) and n."""
    max_tokens = _get(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
    max_tokens = _get(body, "max_tokens", (int,), max_tokens, lambda v: v >= 1, "an integer >= 1")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = tuple(stop)
    else:
        raise _bad("'stop' must be a string or a list of at most 16 strings", param="stop")
    top_k = _get(body, "top_k", (int,), 0, lambda v: v >= -1, "an integer >= 0 (-1 or 0: off)")
    params = SamplingParams(
        max_new_tokens=max_tokens or default_max_tokens,
        temperature=float(_get(body, "temperature", _NUMBER, 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2")),
        top_p=float(_get(body, "top_p", _NUMBER, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        top_k=max(top_k, 0),
        min_p=float(_get(body, "min_p", _NUMBER, 0.0, lambda v: 0 <= v <= 1, "a number from 0 to 1")),
        repetition_penalty=float(_get(body, "repetition_penalty", _NUMBER, 1.0, lambda v: 0 < v <= 10,
                                      "a number in (0, 10]")),
        seed=_get(body, "seed", (int,), None, None, "an integer"),
        stop=tuple(s for s in stops if s),
    )
    n = _get(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "an integer from 1 to 16")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, _NUMBER, 0, lambda v: -2 <= v <= 2, "a number from -2 to 2"):
            log.info("ignoring %s (not supported; use repetition_penalty)", name)
    return params, max_tokens, n


def parse_stream(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False, None, "true or false")
    options = _get(body, "stream_options", (dict,), {}, None, 'an object such as {"include_usage": true}')
    include_usage = _get(options, "include_usage", (bool,), False, None, "true or false")
    return stream, bool(stream and include_usage)


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role must be system, user or assistant, got {json.dumps(role)}"
                       + (" (tool calling is not supported)" if role in ("tool", "function") else ""), param=f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content: only text parts are supported", param=f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def parse_prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise _bad("'prompt' must be a string, a list of strings, or token ids", param="prompt")


def ignored_fields(body: dict, known: set[str], route: str) -> list[str]:
    extra = sorted(k for k in body if k not in known and k not in _SILENT)
    if extra:
        log.info("%s: ignoring field(s) not supported here: %s", route, ", ".join(extra))
    return extra


# ---------------------------------------------------------------------------------------------
# The app.


START = time.time()  # "created" of every model card
STATIC = Path(__file__).parent / "static"


@dataclasses.dataclass
class ServerState:
    engine: Any = None
    error: str | None = None
    server: Any = None  # the uvicorn.Server, so that a failed load can stop it


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _generation_failed(e: BaseException) -> APIError:
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n choices: its own seed, so the n answers differ but each is reproducible."""
    return params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)


def _chunker(kind: str, rid: str, created: int, model: str, include_usage: bool) -> Callable[..., str]:
    """One server-sent event of a streamed response; ``usage`` is present when the client asked."""

    def chunk(choices: list, usage: dict | None = None) -> str:
        obj = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return _sse(obj)

    return chunk


@dataclasses.dataclass(frozen=True)
class ChoiceShape:
    """How one route writes a choice: whole (non-streamed), or as stream events (an optional
    opening event, one per text delta, a closing one with the finish reason)."""

    kind: str  # "object" of the whole response
    chunk_kind: str  # "object" of each streamed event
    whole: Callable[[int, str, str], dict]
    delta: Callable[[int, str], dict]
    closing: Callable[[int, str], dict]
    opening: Callable[[int], dict] | None = None


CHAT_CHOICES = ChoiceShape(
    "chat.completion", "chat.completion.chunk",
    whole=lambda i, text, reason: {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                   "finish_reason": reason},
    delta=lambda i, text: {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None},
    closing=lambda i, reason: {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason},
    opening=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None})
TEXT_CHOICES = ChoiceShape(
    "text_completion", "text_completion",
    whole=lambda i, text, reason: {"index": i, "text": text, "logprobs": None, "finish_reason": reason},
    delta=lambda i, text: {"index": i, "text": text, "logprobs": None, "finish_reason": None},
    closing=lambda i, reason: {"index": i, "text": "", "logprobs": None, "finish_reason": reason})


def create_app(load: Callable[[], Any], cfg: ServeConfig, api_key: str = ""):
    """The FastAPI app. ``load`` builds the Engine; it runs on a thread once the server is up."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    state = ServerState()

    def load_in_background() -> None:
        try:
            state.engine = load()
            log.info("ready: serving %s", ", ".join(state.engine.models))
        except Exception as e:  # noqa: BLE001 - reported on /health and at exit
            state.error = str(e) if isinstance(e, PocketError) else f"{type(e).__name__}: {e}"
            log.error("loading failed: %s", state.error)
            if state.server is not None:
                state.server.should_exit = True

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load_in_background, name="pocketrlhf-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.close()

    app = FastAPI(title="pocketrlhf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pocket = state
    origins = [o.strip() for o in cfg.cors_origins.split(",") if o.strip()]
    if origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    # Added last, so it runs first: a refused request never reaches CORS or a route.
    app.add_middleware(CrossSiteGuard, hosts=allowed_host_names(cfg), cors_origins=tuple(origins))

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, message, code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def ready_engine():
        if state.engine is None:
            if state.error:
                raise APIError(500, f"the model failed to load: {state.error}", "server_error")
            raise APIError(503, "the model is still loading; retry shortly (GET /health says when it is ready)",
                           "server_error", code="model_loading")
        return state.engine

    async def read_json(request: Request) -> dict:
        # A form's content types need no CORS preflight; JSON does, so only JSON bodies are read.
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"the body must be JSON sent with 'Content-Type: application/json' (got "
                           f"'{kind or 'none'}')", code="unsupported_media_type")
        limit = cfg.max_body_bytes
        too_large = APIError(413, f"request body larger than {limit} bytes (--max-body-bytes)", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"could not parse the JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise _bad("the JSON body must be an object", code="invalid_json")
        return data

    def pick_model(engine, body: dict) -> str:
        name = _get(body, "model", (str,), engine.default, None, "a model id string")
        if name not in engine.models:
            raise APIError(404, f"the model '{name}' does not exist; available: {', '.join(engine.models)}",
                           param="model", code="model_not_found")
        return name

    def fit(engine, prompt_tokens: int, max_tokens: int | None, params: SamplingParams, param: str) -> SamplingParams:
        ctx = engine.context_length
        if ctx is None:
            return params
        if getattr(engine, "seq2seq", False):  # the prompt fills the encoder's positions, the reply the decoder's
            if prompt_tokens > ctx:
                raise _bad(f"this model's encoder reads at most {ctx} tokens, and the prompt is {prompt_tokens} tokens",
                           param=param, code="context_length_exceeded")
            if max_tokens is not None and max_tokens > ctx:
                raise _bad(f"this model's decoder writes at most {ctx} tokens; you requested {max_tokens} for the "
                           "completion; lower max_tokens", param=param, code="context_length_exceeded")
            return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, ctx))
        if max_tokens is not None and prompt_tokens + max_tokens > ctx:
            raise _bad(f"this model's maximum context length is {ctx} tokens; you requested {prompt_tokens + max_tokens} "
                       f"tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion); shorten the prompt "
                       "or lower max_tokens", param=param, code="context_length_exceeded")
        if prompt_tokens >= ctx:
            raise _bad(f"this model's maximum context length is {ctx} tokens, and the prompt alone is {prompt_tokens} "
                       "tokens", param=param, code="context_length_exceeded")
        return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, ctx - prompt_tokens))

    def admit(engine, jobs: int) -> None:
        if engine.pending + jobs > cfg.max_queue + engine.max_batch:
            raise APIError(503, f"server busy: {engine.pending} request(s) already running or queued (--max-queue "
                           f"{cfg.max_queue}); retry shortly", "server_error", code="server_busy")

    async def collect(request: Request, stream) -> str:
        """The whole text of a stream; a client that hangs up cancels it; a failed generation is a 500."""

        async def watch():
            while not stream.done:
                if await request.is_disconnected():
                    stream.cancel()
                    return
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        try:
            return "".join([d async for d in stream])
        except Exception as e:  # noqa: BLE001 - reported to the client
            raise _generation_failed(e) from None
        finally:
            watcher.cancel()
            if not stream.done:
                stream.cancel()

    @app.get("/health")
    async def health():
        if state.engine is not None:
            return {"status": "ok", "models": list(state.engine.models)}
        if state.error:
            return JSONResponse({"status": "error", "message": state.error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    def public_source(source: str) -> str:
        # Clients see the folder's name, not where it lies on the server's disk.
        return Path(source).name if Path(source).is_absolute() else source

    def model_card(engine, served) -> dict:
        base = engine.models[next(iter(engine.models))]
        return {"id": served.name, "object": "model", "created": int(START), "owned_by": "pocketrlhf",
                "root": public_source(served.source), "parent": None if served.adapter is None else base.name,
                "max_model_len": engine.context_length}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        engine = ready_engine()
        return {"object": "list", "data": [model_card(engine, s) for s in engine.models.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        engine = ready_engine()
        if model_id not in engine.models:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card(engine, engine.models[model_id])

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def finish(reason: str | None) -> str:
        return "length" if reason == "length" else "stop"

    async def open_request(request: Request, known_fields: set[str], route: str) -> tuple[dict, object, str]:
        """What every generation route checks first: the key, the JSON body, a loaded model, the
        model id; unknown fields are logged. Returns (body, engine, model id)."""
        authorize(request)
        body = await read_json(request)
        engine = ready_engine()
        name = pick_model(engine, body)
        ignored_fields(body, known_fields, route)
        return body, engine, name

    async def respond(request: Request, engine, name: str, shape: ChoiceShape, jobs: list[tuple], stops,
                      stream_mode: bool, include_usage: bool, prompt_tokens: int, rid: str):
        """Run ``jobs`` ((choice index, prompt, sampling params), in order) and answer with their
        choices, whole or streamed. A streamed failure comes as an error event, then the end."""
        loop = asyncio.get_running_loop()
        created = int(time.time())
        if not stream_mode:
            choices, completion_tokens = [], 0
            for index, prompt, params in jobs:
                s = engine.submit(name, prompt, params, stops, loop)
                text = await collect(request, s)
                completion_tokens += s.completion_tokens
                choices.append(shape.whole(index, text, finish(s.finish_reason)))
            return {"id": rid, "object": shape.kind, "created": created, "model": name, "choices": choices,
                    "usage": usage(prompt_tokens, completion_tokens)}

        chunk = _chunker(shape.chunk_kind, rid, created, name, include_usage)

        async def events():
            current, completion_tokens = None, 0
            try:
                for index, prompt, params in jobs:
                    current = engine.submit(name, prompt, params, stops, loop)
                    if shape.opening is not None:
                        yield chunk([shape.opening(index)])
                    try:
                        async for delta in current:
                            yield chunk([shape.delta(index, delta)])
                    except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream
                        yield _sse(_generation_failed(e).body())
                        yield "data: [DONE]\n\n"
                        return
                    completion_tokens += current.completion_tokens
                    yield chunk([shape.closing(index, finish(current.finish_reason))])
                if include_usage:
                    yield chunk([], usage(prompt_tokens, completion_tokens))
                yield "data: [DONE]\n\n"
            finally:
                if current is not None and not current.done:
                    current.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, engine, name = await open_request(request, CHAT_FIELDS, "/v1/chat/completions")
        messages = parse_messages(body)
        params, max_tokens, n = parse_sampling(body, cfg.max_tokens)
        stream_mode, include_usage = parse_stream(body)
        try:
            prompt = engine.chat_prompt(name, messages)
        except Exception as e:  # noqa: BLE001 - a chat template that rejects these messages
            raise _bad(f"cannot format these messages with {engine.served(name).template}: {e}", param="messages") from None
        params = fit(engine, len(prompt), max_tokens, params, "messages")
        admit(engine, 1)
        jobs = [(i, prompt, _seeded(params, i)) for i in range(n)]
        return await respond(request, engine, name, CHAT_CHOICES, jobs, engine.stop_strings(name), stream_mode,
                             include_usage, len(prompt), f"chatcmpl-{uuid.uuid4().hex}")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, engine, name = await open_request(request, COMPLETION_FIELDS, "/v1/completions")
        prompts = parse_prompts(body)
        params, max_tokens, n = parse_sampling(body, cfg.max_tokens)
        stream_mode, include_usage = parse_stream(body)
        encoded = [engine.encode(name, p) if isinstance(p, str) else p for p in prompts]
        vocab = min(len(engine.served(name).tokenizer), engine.vocab_size)
        for ids in encoded:
            if any(t < 0 or t >= vocab for t in ids):
                raise _bad(f"'prompt' has token ids outside the vocabulary (0..{vocab - 1})", param="prompt")
            if not ids:
                raise _bad("'prompt' is empty", param="prompt")
        fitted = [fit(engine, len(ids), max_tokens, params, "prompt") for ids in encoded]
        admit(engine, 1)
        jobs = [(p * n + j, ids, _seeded(prm, j)) for p, (ids, prm) in enumerate(zip(encoded, fitted)) for j in range(n)]
        return await respond(request, engine, name, TEXT_CHOICES, jobs, (), stream_mode, include_usage,
                             sum(len(ids) for ids in encoded), f"cmpl-{uuid.uuid4().hex}")

    # -- the web page and its votes ------------------------------------------------------------

    votes = FeedbackFile(cfg.feedback_file) if cfg.feedback_file else None
    comparisons = (Comparisons(journal=FeedbackFile(journal_path(votes.path)), voted={r.get("comparison") for r in votes.rows()})
                   if votes else Comparisons())
    app.state.comparisons = comparisons

    if cfg.web:
        from fastapi.responses import FileResponse
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

        @app.get("/feedback", include_in_schema=False)
        async def feedback_page():
            return FileResponse(STATIC / "feedback.html", headers={"Cache-Control": "no-cache"})

    @app.post("/feedback/compare")
    async def compare(request: Request):
        """One prompt, 2-4 model ids, their answers streamed together (one batch) as server-sent events."""
        authorize(request)
        body = await read_json(request)
        engine = ready_engine()
        prompt = _get(body, "prompt", (str,), None, lambda v: bool(v.strip()), "a non-empty string")
        if prompt is None:
            raise _bad("'prompt' must be a non-empty string", param="prompt")
        system = _get(body, "system", (str,), "", None, "a string")
        models = body.get("models")
        if not (isinstance(models, list) and 2 <= len(models) <= 4 and all(isinstance(m, str) for m in models)):
            raise _bad("'models' must be a list of 2 to 4 model ids", param="models")
        for m in models:
            if m not in engine.models:
                raise APIError(404, f"the model '{m}' does not exist; available: {', '.join(engine.models)}",
                               param="models", code="model_not_found")
        anonymous = _get(body, "anonymous", (bool,), False, None, "true or false")
        params, max_tokens, _ = parse_sampling({k: v for k, v in body.items() if k != "n"}, cfg.max_tokens)
        if anonymous:
            models = random.sample(models, len(models))  # the arena: which side is which is a secret until the vote
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompts, fitted = [], []
        for m in models:
            try:
                ids = engine.chat_prompt(m, messages)
            except Exception as e:  # noqa: BLE001 - a chat template that rejects these messages
                raise _bad(f"cannot format this prompt for {m}: {e}", param="prompt") from None
            prompts.append(ids)
            fitted.append(fit(engine, len(ids), max_tokens, params, "prompt"))
        admit(engine, len(models))
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "min_p": params.min_p, "repetition_penalty": params.repetition_penalty,
                    "max_tokens": params.max_new_tokens, "seed": params.seed}
        c = comparisons.new(prompt, system, models, sampling, anonymous)
        loop = asyncio.get_running_loop()
        streams = [engine.submit(m, ids, prm, engine.stop_strings(m), loop) for m, ids, prm in zip(models, prompts, fitted)]

        async def events():
            out: asyncio.Queue = asyncio.Queue()

            async def pump(i, stream):
                try:
                    async for delta in stream:
                        c.answers[i] += delta
                        await out.put({"slot": i, "delta": delta})
                    c.finished[i] = True
                    await out.put({"slot": i, "finish_reason": finish(stream.finish_reason)})
                except Exception as e:  # noqa: BLE001 - reported in the stream
                    await out.put({"slot": i, **_generation_failed(e).body()})
                finally:
                    await out.put(None)

            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
            try:
                yield _sse({"comparison": c.id, "anonymous": anonymous,
                            "slots": [{"slot": i, "label": "ABCD"[i], "model": None if anonymous else m}
                                      for i, m in enumerate(models)]})
                running = len(tasks)
                while running:
                    item = await out.get()
                    if item is None:
                        running -= 1
                        continue
                    yield _sse(item)
                if c.complete:
                    try:
                        await asyncio.to_thread(comparisons.finished, c)
                    except OSError as e:  # still votable until the server stops
                        log.warning("cannot journal comparison %s to %s: %s", c.id, comparisons.journal.path, e)
                yield _sse({"done": True, "complete": c.complete})
                yield "data: [DONE]\n\n"
            finally:
                for s in streams:
                    if not s.done:
                        s.cancel()
                for t in tasks:
                    t.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/feedback/vote")
    async def vote(request: Request):
        """A vote on a finished comparison, appended to the feedback file as preference pairs."""
        authorize(request)
        body = await read_json(request)
        cid = _get(body, "comparison", (str,), None, None, "a comparison id string")
        if cid is None:
            raise _bad("'comparison' is missing: the id the compare stream started with", param="comparison")
        kind = _get(body, "vote", (str,), None, lambda v: v in VOTES, "one of " + ", ".join(VOTES))
        if kind is None:
            raise _bad("'vote' is missing: one of " + ", ".join(VOTES), param="vote")
        annotator = _get(body, "annotator", (str,), "anonymous", valid_annotator,
                         "1 to 64 letters, digits or . _ : -")
        c = comparisons.get(cid)
        if c is None:
            raise APIError(404, f"no comparison '{cid[:80]}' (unknown, unfinished when the server stopped, or older "
                           "than the newest 10000)",
                           param="comparison", code="comparison_not_found")
        winner = None
        if kind == "better":
            winner = _get(body, "winner", (int,), None, lambda v: 0 <= v < len(c.models),
                          f"the slot of the better answer, 0 to {len(c.models) - 1}")
            if winner is None:
                raise _bad("'winner' is missing: the slot of the better answer", param="winner")
        if not c.complete:
            raise APIError(409, "this comparison's answers did not all finish; run it again", param="comparison",
                           code="comparison_incomplete")
        if votes is None:
            raise APIError(404, "votes are not recorded here (--feedback-file is empty)", code="feedback_off")
        if not comparisons.claim(cid):
            raise APIError(409, "this comparison already has a vote", param="comparison", code="already_voted")
        rows = vote_rows(c, kind, winner, annotator)
        try:
            await asyncio.to_thread(votes.append, rows)
        except OSError as e:
            c.voted = False
            raise APIError(500, f"cannot write the vote to {votes.path}: {e.strerror or e}", "server_error") from None
        return {"ok": True, "comparison": cid, "rows": len(rows), "models": c.models}

    @app.get("/feedback/summary")
    async def feedback_summary(request: Request):
        authorize(request)
        rows = await asyncio.to_thread(votes.rows) if votes is not None else []
        return {"file": str(votes.path) if votes is not None else None, **summary(rows)}

    return app


# ---------------------------------------------------------------------------------------------
# Running it.


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error when the address cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another --port or --host)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """A uvicorn server on a thread (tests, notebooks): ``.url``, ``.stop()``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = listen(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        if hasattr(app, "state") and hasattr(app.state, "pocket"):
            app.state.pocket.server = self.server
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(cfg: ServeConfig) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:  # an install made before they became default dependencies
        raise ConfigError(f"pocketrlhf serve needs fastapi and uvicorn ({e}): pip install 'pocketrlhf[serve]'") from None

    from pocketrlhf.errors import ModelLoadError
    from pocketrlhf.logs import setup_logging
    from pocketrlhf.models.loading import resolve_device
    from pocketrlhf.serve.engine import Engine, max_memory_map, parse_adapters, plan_models

    setup_logging(getattr(logging, cfg.log_level.upper()))
    if cfg.load_8bit and cfg.load_4bit:
        raise ConfigError("--load-8bit and --load-4bit are exclusive: pick one")
    for name, value, low in (("--max-tokens", cfg.max_tokens, 1), ("--max-queue", cfg.max_queue, 0),
                             ("--max-batch", cfg.max_batch, 1),
                             ("--max-body-bytes", cfg.max_body_bytes, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    api_key = cfg.api_key or os.environ.get("POCKETRLHF_API_KEY", "")
    # Everything that can be checked without loading weights fails here, before the port opens.
    plan = plan_models(cfg, parse_adapters(cfg.adapters), cfg.name)
    max_memory_map(resolve_device(cfg.device), cfg.cpu_offloading, cfg.max_gpu_memory)
    if not _is_loopback(cfg.host) and not api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", cfg.host)
    sock = listen(cfg.host, cfg.port)
    app = create_app(lambda: Engine.load(cfg, plan=plan, max_batch=cfg.max_batch), cfg, api_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
    app.state.pocket.server = server
    log.info("listening on http://%s:%d (OpenAI base_url http://%s:%d/v1); loading the model...",
             cfg.host, cfg.port, cfg.host, cfg.port)
    if cfg.web:
        log.info("web page: http://%s:%d/ (chat, compare and vote); votes go to %s", cfg.host, cfg.port,
                 Path(cfg.feedback_file).expanduser().resolve() if cfg.feedback_file else "nowhere (--feedback-file '')")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly: the normal way to stop
        log.info("stopped")
    finally:
        sock.close()
    if app.state.pocket.error:
        raise ModelLoadError(app.state.pocket.error)
