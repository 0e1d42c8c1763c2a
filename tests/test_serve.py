"""`pocketrlhf serve`: a real uvicorn server on loopback, driven by the official openai client and raw HTTP."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from safetensors import safe_open

from pocketrlhf.cli import main
from pocketrlhf.errors import ModelLoadError
from pocketrlhf.serve.api import BackgroundServer, ServeConfig, create_app
from pocketrlhf.serve.engine import Engine, parse_adapters

from conftest import teach_adapter

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {
        # stackllama, stopping on EOS ("hi") and on its "\n\nQuestion:" stop string ("bye").
        "stack": teach_adapter(llama, root / "stack", "stackllama", [("hi", "fine thanks"), ("bye", "see you\n\nQuestion: more")]),
        # ChatML, stopping on the <|im_end|> end-of-turn token.
        "chat": teach_adapter(llama, root / "chat", "chatml", [("hi", "hello friend<|im_end|>")]),
    }


def wait_ready(url: str, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code != 503:
                return r
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(adapters):
    cfg = ServeConfig(model=str(adapters["stack"]), adapters=f"chat={adapters['chat']}", device="cpu", max_queue=2,
                      max_body_bytes=20_000, max_tokens=64, max_batch=2)
    app = create_app(lambda: Engine.load(cfg, parse_adapters(cfg.adapters), max_batch=cfg.max_batch), cfg, api_key=KEY)
    srv = BackgroundServer(app)
    assert wait_ready(srv.url).status_code == 200
    srv.engine = app.state.pocket.engine
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body=None, headers=AUTH, **kw):
    if body is not None:
        kw["content"] = body if isinstance(body, (bytes, str)) else json.dumps(body)
    kw.setdefault("timeout", 60)
    return httpx.post(server.url + path, headers={"Content-Type": "application/json", **headers}, **kw)


def ask(text):
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# The OpenAI client.


def test_models_lists_the_base_and_each_adapter(client, server, llama):
    models = client.models.list().data
    assert [m.id for m in models] == ["llama", "stack", "chat"]
    cards = {m.id: m.model_dump() for m in models}
    assert cards["llama"]["parent"] is None and cards["stack"]["parent"] == "llama"
    assert cards["chat"]["max_model_len"] == 512
    assert client.models.retrieve("chat").id == "chat"


def test_one_copy_of_the_base_holds_every_adapter(server, llama):
    model = server.engine.model
    assert set(model.peft_config) == {"stack", "chat"}
    with safe_open(str(Path(llama) / "model.safetensors"), "pt") as f:
        base_numel = sum(f.get_tensor(k).numel() for k in f.keys())
    non_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert non_adapter == base_numel


def test_chat_completion_picks_the_adapter_by_model(client, server):
    r = client.chat.completions.create(model="stack", messages=ask("hi"), temperature=0)
    assert r.choices[0].message.content == "fine thanks" and r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == "stack"
    prompt = server.engine.chat_prompt("stack", ask("hi"))
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The ChatML adapter stops on <|im_end|>, which never shows; the base is the adapters switched off.
    assert client.chat.completions.create(model="chat", messages=ask("hi"), temperature=0).choices[0].message.content == "hello friend"
    base = client.chat.completions.create(model="llama", messages=ask("hi"), temperature=0, max_tokens=12)
    assert base.choices[0].message.content not in ("fine thanks", "hello friend")
    assert base.choices[0].finish_reason == "length" and base.usage.completion_tokens == 12
    # Switching back and forth leaves each adapter as it was.
    assert client.chat.completions.create(model="stack", messages=ask("bye"), temperature=0).choices[0].message.content == "see you"


def test_chat_streaming_ends_with_usage_and_done(client, server):
    chunks = list(client.chat.completions.create(model="stack", messages=ask("bye"), temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "see you"  # the stop string "\n\nQuestion:" is never sent
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "chat", "messages": ask("hi"), "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert "usage" not in json.loads(lines[1][6:])
    chunks = list(client.chat.completions.create(model="stack", messages=ask("hi"), temperature=0, n=2, stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == "fine thanks" and mine[-1].finish_reason == "stop"


def test_completions_plain_streamed_and_batched(client):
    prompt = "Question: hi\n\nAnswer: "  # raw text: no template is applied
    r = client.completions.create(model="stack", prompt=prompt, temperature=0, max_tokens=20)
    assert r.choices[0].text == "fine thanks" and r.choices[0].finish_reason == "stop" and r.object == "text_completion"
    streamed = list(client.completions.create(model="stack", prompt=prompt, temperature=0, max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "fine thanks"
    many = client.completions.create(model="stack", prompt=[prompt, "Question: bye\n\nAnswer: "], temperature=0,
                                     max_tokens=20, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == "fine thanks"
    assert many.choices[2].text.startswith("see you")


def test_sampling_fields_seed_n_stop_and_extensions(client):
    kw = dict(model="llama", messages=ask("hi"), temperature=1.0, max_tokens=10)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert client.chat.completions.create(seed=7, **kw).choices[0].message.content == a
    r = client.chat.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.choices[0].message.content == a
    greedy = client.chat.completions.create(model="llama", messages=ask("hi"), temperature=0, max_tokens=30)
    full = greedy.choices[0].message.content
    stop = full[8:11]
    cut = client.chat.completions.create(model="llama", messages=ask("hi"), temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    extra = client.chat.completions.create(model="stack", messages=ask("hi"), temperature=0, max_tokens=20,
                                           extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.0})
    assert extra.choices[0].message.content == "fine thanks"


def test_unknown_fields_are_ignored_with_a_log_line(server):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pocketrlhf")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        r = post(server, "/v1/chat/completions", {"model": "stack", "messages": ask("hi"), "temperature": 0,
                                                  "max_tokens": 20, "frobnicate": 1, "logit_bias": {}})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine thanks"
    assert any("ignoring field(s) not supported here: frobnicate, logit_bias" in rec.getMessage() for rec in records)


def test_client_errors_are_openai_shaped(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=ask("hi"))
    assert e.value.body == {"message": "the model 'nope' does not exist; available: llama, stack, chat",
                            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="stack", messages=ask("hi"), max_tokens=600)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    assert "maximum context length is 512 tokens" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


# ---------------------------------------------------------------------------------------------
# Raw HTTP: malformed requests, auth, limits.


def error_of(r):
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, param, message", [
    (b"{not json", None, "could not parse the JSON body"),
    (b"[1, 2]", None, "the JSON body must be an object"),
    ({"model": "stack"}, "messages", "'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "tool calling is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "only text parts"),
    ({"messages": ask("hi"), "temperature": "hot"}, "temperature", "'temperature' must be a number from 0 to 2"),
    ({"messages": ask("hi"), "temperature": 3}, "temperature", "got 3"),
    ({"messages": ask("hi"), "max_tokens": 0}, "max_tokens", "an integer >= 1"),
    ({"messages": ask("hi"), "n": 100}, "n", "an integer from 1 to 16"),
    ({"messages": ask("hi"), "stop": [1]}, "stop", "'stop' must be a string or a list"),
    ({"messages": ask("hi"), "stream": "yes"}, "stream", "true or false"),
    ({"messages": ask("hi"), "model": 3}, "model", "a model id string"),
])
def test_malformed_chat_requests_get_400(server, body, param, message):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param and message in err["message"]


def test_malformed_completion_requests_get_400(server):
    for body, message in [({"prompt": 5}, "'prompt' must be a string"), ({"prompt": [10**6]}, "outside the vocabulary"),
                          ({"prompt": "x" * 2000, "max_tokens": 10}, "maximum context length is 512")]:
        r = post(server, "/v1/completions", {"model": "stack", **body})
        assert r.status_code == 400 and message in error_of(r)["message"]


def test_missing_model_uses_the_default_one(server):
    r = post(server, "/v1/chat/completions", {"messages": ask("hi"), "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == "stack"
    assert r.json()["choices"][0]["message"]["content"] == "fine thanks"


def test_api_key_is_required_on_v1_but_not_on_health(server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    r = post(server, "/v1/chat/completions", {"messages": ask("hi")}, headers={})
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_bodies_over_the_limit_get_413(server):
    big = json.dumps({"messages": ask("x" * 30_000)})
    r = post(server, "/v1/chat/completions", big)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    # Without a Content-Length (chunked upload) the limit still holds.
    chunks = (big[i:i + 4096].encode() for i in range(0, len(big), 4096))
    r = httpx.post(server.url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=chunks, timeout=60)
    assert r.status_code == 413


def test_requests_a_browser_was_tricked_into_sending_are_refused(server):
    port = server.url.rsplit(":", 1)[1]
    # A form POST from another site (text/plain needs no CORS preflight) is not read as JSON.
    r = httpx.post(server.url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "text/plain"},
                   content=json.dumps({"messages": ask("hi")}))
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"
    # A cross-origin POST is refused before any route runs; the server's own page is not.
    r = post(server, "/feedback/vote", {"id": "x", "choice": "a"}, headers={**AUTH, "Origin": "https://evil.example"})
    assert r.status_code == 403 and error_of(r)["code"] == "cross_site_request"
    r = post(server, "/v1/chat/completions", {"messages": ask("hi"), "temperature": 0},
             headers={**AUTH, "Origin": f"http://127.0.0.1:{port}"})
    assert r.status_code == 200
    # A DNS name rebound to 127.0.0.1 arrives with its own Host: refused, even on /health.
    r = httpx.get(server.url + "/health", headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 403 and "--allowed-hosts" in error_of(r)["message"]
    assert httpx.get(server.url + "/health", headers={"Host": f"localhost:{port}"}).status_code == 200


@pytest.mark.parametrize("bound, allowed, host, ok", [
    ("127.0.0.1", "", "127.0.0.1:8000", True), ("127.0.0.1", "", "[::1]:8000", True), ("::1", "", "localhost", True),
    ("127.0.0.1", "", "attacker.example:8000", False), ("127.0.0.1", "box.lan", "box.lan:8000", True),
    ("127.0.0.1", "*", "anything:1", True), ("0.0.0.0", "", "10.1.2.3:8000", True),
    ("0.0.0.0", "box.lan", "10.1.2.3:8000", False),
])
def test_host_names_the_server_answers_to(bound, allowed, host, ok):
    from pocketrlhf.serve.api import allowed_host_names, cross_site_refusal

    hosts = allowed_host_names(ServeConfig(model="m", host=bound, allowed_hosts=allowed))
    assert (cross_site_refusal("GET", {"host": host}, hosts, ()) is None) == ok


@pytest.mark.parametrize("method, origin, cors, ok", [
    ("POST", None, (), True), ("POST", "http://127.0.0.1:8000", (), True), ("POST", "http://127.0.0.1:9999", (), False),
    ("POST", "null", (), False), ("POST", "https://app.example", ("https://app.example",), True),
    ("POST", "https://other.example", ("https://app.example",), False), ("POST", "https://x.example", ("*",), True),
    ("GET", "https://x.example", (), True),
])
def test_state_changing_requests_must_come_from_the_servers_own_origin(method, origin, cors, ok):
    from pocketrlhf.serve.api import cross_site_refusal

    headers = {"host": "127.0.0.1:8000"} | ({"origin": origin} if origin else {})
    assert (cross_site_refusal(method, headers, ("127.0.0.1",), cors) is None) == ok


def test_unknown_routes_and_methods_are_openai_shaped(server):
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and error_of(r)["message"] == "no route GET /v1/nothing"
    r = httpx.get(server.url + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


# ---------------------------------------------------------------------------------------------
# Concurrency, a full queue, disconnects.


def test_concurrent_requests_queue_on_one_worker(server):
    results: dict[int, httpx.Response] = {}

    def call(i):
        name, text, want = [("stack", "hi", "fine thanks"), ("chat", "hi", "hello friend"), ("stack", "bye", "see you")][i % 3]
        results[i] = (post(server, "/v1/chat/completions", {"model": name, "messages": ask(text), "temperature": 0}), want)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3
    for r, want in results.values():
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
    assert server.engine.pending == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "stack", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "stack", "prompt": "hi"}),
])
def test_a_failed_generation_is_a_500_and_the_server_goes_on(server, monkeypatch, path, body):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "_forward", broken)
    r = post(server, path, body)
    assert r.status_code == 500
    assert error_of(r)["type"] == "server_error" and error_of(r)["message"] == "generation failed: RuntimeError: boom"
    # Streamed: the headers are already sent, so the error comes as an event, then the end.
    r = post(server, path, {**body, "stream": True})
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert any(json.loads(e).get("error", {}).get("message") == "generation failed: RuntimeError: boom"
               for e in events[:-1])
    monkeypatch.undo()
    r = post(server, path, {**body, "temperature": 0})
    assert r.status_code == 200 and server.engine.pending == 0


def test_a_full_queue_answers_503_and_the_rest_complete(server):
    engine = server.engine
    results = []
    engine.busy.acquire()  # the worker is busy: requests pile up
    try:
        threads = [threading.Thread(target=lambda: results.append(post(server, "/v1/chat/completions",
                                                                       {"model": "stack", "messages": ask("hi"),
                                                                        "temperature": 0})))
                   for _ in range(4)]  # max_batch=2 taken by the worker + max_queue=2 waiting
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while engine.pending < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.pending == 4
        r = post(server, "/v1/chat/completions", {"model": "stack", "messages": ask("hi")})
        assert r.status_code == 503 and error_of(r)["code"] == "server_busy"
    finally:
        engine.busy.release()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200, 200, 200]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    engine = server.engine
    streams = []
    submit = engine.submit

    def recording_submit(*a, **kw):
        streams.append(submit(*a, **kw))
        return streams[-1]

    # Slow the model down (20 ms a token) so the reply is still being generated when the client leaves.
    hook = engine.model.get_input_embeddings().register_forward_pre_hook(lambda *a: time.sleep(0.02))
    engine.submit = recording_submit
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"model": "llama", "messages": ask("hi"), "temperature": 0, "max_tokens": 400,
                                "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        assert streams[0].wait(20)
        # A non-streaming client that gives up (here: a read timeout) is noticed too.
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/chat/completions", {"model": "llama", "messages": ask("hi"), "temperature": 0,
                                                  "max_tokens": 400}, timeout=0.5)
        assert streams[1].wait(20)
    finally:
        engine.submit = submit
        hook.remove()
    assert streams[0].finish_reason == "cancelled" and streams[0].completion_tokens < 400
    assert streams[1].finish_reason == "cancelled" and streams[1].completion_tokens < 400
    r = client.chat.completions.create(model="stack", messages=ask("hi"), temperature=0)
    assert r.choices[0].message.content == "fine thanks"


# ---------------------------------------------------------------------------------------------
# Startup: health while loading, load failures, the real command.


def test_health_is_503_while_loading_then_200(adapters):
    cfg = ServeConfig(model=str(adapters["chat"]), device="cpu", cors_origins="http://ui.localhost")
    gate = threading.Event()

    def load():
        gate.wait(30)
        return Engine.load(cfg)

    srv = BackgroundServer(create_app(load, cfg))
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = post(srv, "/v1/chat/completions", {"messages": ask("hi")}, headers={})
        assert r.status_code == 503 and error_of(r)["code"] == "model_loading"
        gate.set()
        r = wait_ready(srv.url)
        assert r.status_code == 200 and r.json() == {"status": "ok", "models": ["llama", "chat"]}
        preflight = httpx.options(srv.url + "/v1/chat/completions", headers={
            "Origin": "http://ui.localhost", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://ui.localhost"
    finally:
        gate.set()
        srv.stop()


def test_a_failed_load_is_reported_and_stops_the_server(tmp_path):
    cfg = ServeConfig(model=str(tmp_path))

    def load():
        raise ModelLoadError(f"{tmp_path} has no config.json: not a Hugging Face model directory")

    app = create_app(load, cfg)
    srv = BackgroundServer(app)
    srv.thread.join(20)
    assert not srv.thread.is_alive()  # the server shut itself down
    assert app.state.pocket.error == f"{tmp_path} has no config.json: not a Hugging Face model directory"
    srv.sock.close()


def test_serve_checks_its_arguments_before_listening(adapters, capsys):
    assert main(["serve", "/nowhere/model"]) == 2
    assert capsys.readouterr().err == "error: /nowhere/model does not exist (expected a model or adapter directory)\n"
    assert main(["serve", str(adapters["stack"]), "--adapters", "stack2"]) == 2
    assert capsys.readouterr().err == "error: --adapters: expected name=dir, got 'stack2'\n"
    assert main(["serve", str(adapters["stack"]), "--adapters", f"stack={adapters['chat']}"]) == 2
    assert "two served models would both be called 'stack'" in capsys.readouterr().err
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        assert main(["serve", str(adapters["stack"]), "--port", str(port), "--device", "cpu"]) == 2
        assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    finally:
        busy.close()


def test_serve_command_end_to_end(adapters):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "POCKETRLHF_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "pocketrlhf", "serve", str(adapters["stack"]), "--adapters",
                             f"chat={adapters['chat']}", "--port", str(port), "--device", "cpu", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_ready(url, timeout=90).status_code == 200
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list().data] == ["llama", "stack", "chat"]
        assert c.chat.completions.create(model="chat", messages=ask("hi"), temperature=0).choices[0].message.content == "hello friend"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()


# ---------------------------------------------------------------------------------------------
# The batched engine: sampling filters, 4-bit bases.


def test_sampling_filters_of_one_row():
    import torch

    from pocketrlhf.serve.batching import next_token

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    g = torch.Generator().manual_seed(0)

    def draw(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        return {next_token(logits, None, temperature, top_k, top_p, min_p, 1.0, g) for _ in range(200)}

    assert draw() == {0, 1, 2, 3, 4}
    assert draw(top_k=2) == {1, 2}
    assert draw(top_p=0.4) == {1, 2}  # token 1 alone holds < 0.4 of the mass, 1 + 2 more
    assert draw(min_p=0.8) == {1, 2, 4} and draw(min_p=0.85) == {1, 2}
    assert draw(temperature=0) == {1}
    # The repetition penalty pushes seen tokens down: 3.0 / 2 < 2.9.
    assert next_token(logits, torch.tensor([1]), 0, 0, 1.0, 0.0, 2.0, None) == 2


def test_a_4bit_base_answers_a_batch_mixing_adapters_and_the_base(odd_llama, tmp_path):
    """odd_llama's MLP width (176) crashes bitsandbytes' CPU 4-bit inference kernel: batches must fall back too."""
    from pocketrlhf.serve.engine import SamplingParams, ServingOptions

    a = teach_adapter(odd_llama, tmp_path / "a", "chatml", [("hi", "x")], train=False)
    b = teach_adapter(odd_llama, tmp_path / "b", "chatml", [("hi", "y")], train=False)
    eng = Engine.load(ServingOptions(model=str(a), load_4bit=True, device="cpu"), {"b": str(b)})
    try:
        assert eng.max_batch == 8
        params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=0)
        streams = [eng.submit(name, eng.chat_prompt(name, ask("hello")), params)
                   for name in ("a", "b", "llama176", "a")]
        for s in streams:
            s.text()
        assert all(s.finish_reason in ("stop", "length") and s.completion_tokens >= 1 for s in streams)
        assert max(eng.batch_sizes) >= 2
    finally:
        eng.close()


def test_text_held_back_for_a_stop_string_is_sent_when_the_reply_ends(llama):
    """A reply ending in the first character(s) of a stop string, then EOS: those characters were
    held back in case the stop string followed; EOS makes them the reply's end, so they are sent."""
    import threading

    from pocketrlhf.models.loading import load_tokenizer
    from pocketrlhf.serve.engine import Stream, _Decoder

    tok = load_tokenizer(str(llama))
    stream = Stream("m", 0)
    decoder = _Decoder(stream, tok, threading.Lock(), {tok.eos_token_id}, ("```",))
    for token in tok("use `x`", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]:
        if decoder.feed(token):
            break
    sent = []
    while not stream._queue.empty():
        sent.append(stream._queue.get_nowait())
    assert "".join(x for x in sent if isinstance(x, str)) == "use `x`"
    assert decoder.reason == "stop"
