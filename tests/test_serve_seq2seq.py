"""chat and serve with an encoder-decoder base (tiny T5, as flan-t5; tiny BART): the prompt goes to
the encoder, the decoder's reply streams out, adapters taught a reply give it back, over the
engine, the chat loop, the OpenAI API and the web page's compare; 4-bit too. Concurrent requests
are decoded together (continuous batching) and answer token for token as ``generate`` does alone."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from pocketrlhf.data.templates import prompt_text
from pocketrlhf.data.tokenize import encode
from pocketrlhf.serve.api import ServeConfig, create_app
from pocketrlhf.serve.chat import ChatSession
from pocketrlhf.serve.engine import Engine, SamplingParams, ServingOptions

from conftest import serve_in_background, teach_adapter

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)
KEY = "sk-seq2seq"
AUTH = {"Authorization": f"Bearer {KEY}"}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Recorder:
    """What the batched engine samples: each stream's tokens and logits (keyed by id(stream)), and
    the streams of each sampling call. ``pause_at``: the worker waits at that call until ``go()``."""

    def __init__(self, engine, monkeypatch, pause_at: int = 0):
        self.tokens: dict[int, list[int]] = {}
        self.logits: dict[int, list] = {}
        self.calls: list[set[int]] = []
        self.paused, self.gate, self.pause_at = threading.Event(), threading.Event(), pause_at
        sample = engine._sample

        def recording(rows, logits):
            sample(rows, logits)
            for row, row_logits in zip(rows, logits):
                self.tokens.setdefault(id(row.job.stream), []).append(row.last)
                self.logits.setdefault(id(row.job.stream), []).append(row_logits.float().clone())
            self.calls.append({id(row.job.stream) for row in rows})
            if len(self.calls) == self.pause_at:
                self.paused.set()
                assert self.gate.wait(60)

        monkeypatch.setattr(engine, "_sample", recording)

    def go(self) -> None:
        self.gate.set()


def generated(engine, name, prompt_ids: list[int], max_new: int, repetition_penalty: float = 1.0):
    """transformers' generate, greedy, for one prompt alone under model ``name``: the decoder's tokens
    after its start token, and the logits of each step."""
    import torch

    ids = torch.tensor([prompt_ids])
    with engine._switch(engine.served(name)), torch.no_grad():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                    do_sample=False, repetition_penalty=repetition_penalty, output_logits=True,
                                    return_dict_in_generate=True)
    return out.sequences[0, 1:].tolist(), [x[0].float() for x in out.logits]


def batched_equals_generate(engine, asks, monkeypatch, max_new: int = 10, atol: float = 1e-4,
                            repetition_penalty: float = 1.0) -> list[list[int]]:
    """Half of ``asks`` ((model, text) pairs) submitted together; the rest once the first ones
    have decoded two steps (the worker waits for them): they join a batch whose self-attention
    cache is wider than theirs, and rows leave as they end. Greedy, EOS the only stop. Each
    answer must be generate's for that prompt alone, token for token, with its logits."""
    import torch

    rec = Recorder(engine, monkeypatch, pause_at=3)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, repetition_penalty=repetition_penalty)
    prompts = [engine.chat_prompt(name, ask(text)) for name, text in asks]
    half = (len(asks) + 1) // 2
    streams = [engine.submit(name, ids, params, ()) for (name, _), ids in zip(asks[:half], prompts[:half])]
    assert rec.paused.wait(60)
    streams += [engine.submit(name, ids, params, ()) for (name, _), ids in zip(asks[half:], prompts[half:])]
    rec.go()
    for stream in streams:
        assert stream.wait(120) and stream.finish_reason in ("stop", "length")
    early, late = {id(s) for s in streams[:half]}, {id(s) for s in streams[half:]}
    assert any(call & early and call & late for call in rec.calls), "no late request joined the running batch"
    got = [rec.tokens[id(s)] for s in streams]
    for (name, _), ids, stream in zip(asks, prompts, streams):
        tokens, logits = generated(engine, name, ids, max_new, repetition_penalty)
        assert rec.tokens[id(stream)] == tokens
        assert torch.allclose(torch.stack(rec.logits[id(stream)]), torch.stack(logits), atol=atol)
        assert stream.completion_tokens == len(tokens)
    return got


@pytest.fixture(scope="module")
def t5_adapters(tiny_t5, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq_serve")
    return {
        "stack": teach_adapter(tiny_t5, root / "stack" / "adapter", "stackllama",
                                       # No letter twice in a row: this tiny T5's relative positions
                                       # cannot learn "ee" reliably (the causal tests' "see you").
                                       [("hi", "fine thanks"), ("bye", "so long")]),
        "plain": teach_adapter(tiny_t5, root / "plain", "plain", [("hi", "what a day")]),
    }


@pytest.fixture(scope="module")
def engine(t5_adapters):
    eng = Engine.load(ServingOptions(model=str(t5_adapters["stack"]), device="cpu"),
                      {"plain": str(t5_adapters["plain"])}, max_batch=4)
    yield eng
    eng.close()


def reply(engine, name, text, params=GREEDY, stops=None):
    ids = engine.chat_prompt(name, ask(text))
    stream = engine.submit(name, ids, params, engine.stop_strings(name) if stops is None else stops)
    return list(stream), stream


def test_the_encoder_reads_the_prompt_and_the_decoder_streams_the_reply(engine, tiny_t5, caplog):
    assert engine.seq2seq and engine.max_batch == 4  # continuous batching on the decoder
    # Each adapter answers in its training format; the base has no chat template: 'auto' is plain.
    assert {n: m.template for n, m in engine.models.items()} == {"t5": "plain", "stack": "stackllama", "plain": "plain"}
    tok = engine.served("stack").tokenizer
    ids = engine.chat_prompt("stack", ask("hi"))
    assert ids == encode(tok, prompt_text("hi", "stackllama"), special=True) and ids[-1] == tok.eos_token_id
    deltas, stream = reply(engine, "stack", "hi")
    # Streamed token by token from the decoder, its start token left out; EOS ends the reply.
    assert "".join(deltas) == "fine thanks" and len(deltas) > 3
    assert stream.finish_reason == "stop" and stream.completion_tokens == len(tok("fine thanks", add_special_tokens=False)["input_ids"]) + 1
    assert stream.prompt_tokens == len(ids)
    assert "".join(reply(engine, "stack", "bye")[0]) == "so long"
    assert "".join(reply(engine, "plain", "hi")[0]) == "what a day"
    # A stop string ends the reply before it, as for a causal LM.
    deltas, stream = reply(engine, "stack", "bye", stops=(" long",))
    assert "".join(deltas) == "so" and stream.finish_reason == "stop"
    # The base: the adapters off, another answer, cut at max_new_tokens.
    base, stream = reply(engine, "t5", "hi", SamplingParams(temperature=0.0, max_new_tokens=5))
    assert "".join(base) not in ("fine thanks", "what a day") and stream.completion_tokens == 5
    assert stream.finish_reason == "length"


def test_plain_conversations_are_one_encoder_text(engine):
    tok = engine.served("plain").tokenizer
    conversation = [{"role": "system", "content": "be kind"}, *ask("hi"), {"role": "assistant", "content": "hello"},
                    *ask("more")]
    assert engine.chat_prompt("plain", conversation) == encode(tok, "be kind\n\nhi\nhello\nmore", special=True)


def test_programmatic_chat_with_a_seq2seq_adapter(engine):
    out = io.StringIO()
    chat = ChatSession(engine, GREEDY, style="programmatic", inp=io.StringIO('{"content": "hi"}\n{"command": "/clear"}\n"bye"\n'), out=out)
    chat.run()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[0]["type"] == "ready" and events[0]["template"] == "stackllama"
    replies = [e for e in events if e["type"] == "reply"]
    assert [r["content"] for r in replies] == ["fine thanks", "so long"]
    assert all(r["finish_reason"] == "stop" for r in replies)
    deltas = [e["content"] for e in events if e["type"] == "delta"]
    assert "".join(deltas) == "fine thanksso long" and len(deltas) > 4


def test_concurrent_requests_are_decoded_together_as_generate_answers_each(engine, monkeypatch):
    """Prompts of different lengths, two adapters and the base (adapters off) in one batch, rows
    joining while others decode and leaving when they end: generate's greedy answers."""
    asks = [("t5", "a good movie with a great story and wonderful actors"), ("stack", "hi"), ("plain", "hi"),
            ("stack", "bye"), ("t5", "hi"), ("plain", "the quick brown fox")]
    assert len({len(engine.chat_prompt(name, ask(text))) for name, text in asks}) >= 4
    before = len(engine.batch_sizes)
    got = batched_equals_generate(engine, asks, monkeypatch)
    tok = engine.served("stack").tokenizer
    assert [tok.decode(t, skip_special_tokens=True) for t in got[1:4]] == ["fine thanks", "what a day", "so long"]
    assert max(engine.batch_sizes[before:]) >= 3
    # A repetition penalty counts the decoder's ids (its start token and the reply), as generate's does.
    # (The logits compared are before the penalty, as generate's output_logits.)
    batched_equals_generate(engine, asks[:3], monkeypatch, repetition_penalty=1.5)


def test_seeded_sampling_does_not_depend_on_the_batch(engine, monkeypatch):
    """A seeded request samples with its own generator: alone or joining others mid-way, the same answer."""
    ids = engine.chat_prompt("t5", ask("a good movie"))
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12, seed=11)
    tokens = Recorder(engine, monkeypatch).tokens
    alone = engine.submit("t5", ids, p, ())
    alone.text()
    rec = Recorder(engine, monkeypatch, pause_at=3)
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=12)
    others = [engine.submit(name, engine.chat_prompt(name, ask(text)), unseeded)
              for name, text in (("t5", "the quick brown fox jumps"), ("stack", "hi"), ("plain", "bye"))]
    assert rec.paused.wait(60)
    batched = engine.submit("t5", ids, p, ())
    rec.go()
    batched.text()
    for s in others:
        assert s.wait(60)
    assert rec.tokens[id(batched)] == tokens[id(alone)] and len(tokens[id(alone)]) >= 2
    assert any(id(batched) in call and len(call) >= 2 for call in rec.calls)  # it did share steps with others
    # Another seed is another answer (the seed is what decides it).
    other = engine.submit("t5", ids, dataclasses.replace(p, seed=12), ())
    other.text()
    assert rec.tokens[id(other)] != tokens[id(alone)]


def test_max_batch_1_answers_one_request_at_a_time_through_generate(t5_adapters):
    eng = Engine.load(ServingOptions(model=str(t5_adapters["stack"]), device="cpu"),
                      {"plain": str(t5_adapters["plain"])}, max_batch=1)
    try:
        assert eng.max_batch == 1
        streams = [eng.submit(name, eng.chat_prompt(name, ask(text)), GREEDY, eng.stop_strings(name))
                   for name, text in (("stack", "hi"), ("plain", "hi"), ("stack", "bye"))]
        assert [s.text() for s in streams] == ["fine thanks", "what a day", "so long"]
        assert eng.batch_sizes == []  # no batched step: each went through generate
    finally:
        eng.close()


def test_encoder_decoders_are_batched_where_each_rows_decoder_positions_can_be_kept(engine, tiny_bart):
    """T5's relative bias ignores left padding; BART's learned positions are set per row; another
    scheme (Marian's sinusoidal table) is served one request at a time."""
    from transformers import AutoModelForSeq2SeqLM, MarianConfig

    from pocketrlhf.models.forward import unwrap
    from pocketrlhf.models.loading import load_base
    from pocketrlhf.serve.batching import batchable, decoder_positions

    assert decoder_positions(unwrap(engine.model)[1]) == "relative" and batchable(engine.model) == ""
    assert decoder_positions(load_base(str(tiny_bart), device="cpu", training=False)) == "learned"
    marian = AutoModelForSeq2SeqLM.from_config(MarianConfig(
        vocab_size=64, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32))
    assert decoder_positions(marian) == ""
    assert batchable(marian) == "an encoder-decoder model (marian) whose decoder positions cannot be set per row"


def test_a_4bit_seq2seq_base_answers(tiny_t5, t5_adapters, tmp_path, monkeypatch):
    """NF4 T5 (``wo`` kept in fp32), on the generic CPU 4-bit kernel where layer sizes need it (d_ff
    176); batched requests answer as generate does for each alone."""
    from pocketrlhf.models.quantization import linear4bit_modules
    from pocketrlhf.models.tiny import build_tiny_model
    from pocketrlhf.data import synthetic

    eng = Engine.load(ServingOptions(model=str(t5_adapters["stack"]), load_4bit=True, device="cpu"),
                      {"plain": str(t5_adapters["plain"])})
    try:
        assert linear4bit_modules(eng.model) and eng.max_batch == 8
        deltas, stream = reply(eng, "stack", "hi")
        assert stream.finish_reason in ("stop", "length") and stream.completion_tokens >= 1
        assert "".join(deltas).startswith("fine")  # NF4 rounding leaves the taught reply's start
        batched_equals_generate(eng, [("t5", "a good movie with a great story"), ("stack", "hi"), ("plain", "hi"),
                                      ("stack", "bye"), ("t5", "hi")], monkeypatch)
    finally:
        eng.close()
    odd = build_tiny_model(tmp_path / "t5odd", "t5", texts=synthetic.corpus(), vocab_size=320, intermediate_size=176)
    eng = Engine.load(ServingOptions(model=str(odd), load_4bit=True, device="cpu"))
    try:
        slow = [m for _, m in linear4bit_modules(eng.model) if m.support_avx512bf16_for_cpu is False]
        assert slow and all(176 in (m.in_features, m.out_features) for m in slow)
        _, stream = reply(eng, None, "hi", SamplingParams(temperature=1.0, max_new_tokens=6, seed=0))
        assert stream.finish_reason in ("stop", "length") and 1 <= stream.completion_tokens <= 6
        batched_equals_generate(eng, [(None, "a good movie with a great story"), (None, "hi"), (None, "bye bye")],
                                monkeypatch, max_new=6)
    finally:
        eng.close()


def test_a_bart_adapter_answers_its_decoder_start_token_left_out(tiny_bart, tmp_path, monkeypatch):
    """BART starts the decoder with EOS: it must neither end the reply nor show in it; the streamed
    reply is what transformers' generate writes after the start token. (The random base answers
    EOS at once; a briefly taught adapter writes words.)"""
    import torch

    adapter = teach_adapter(tiny_bart, tmp_path / "bart", "plain", [("hi", "fine thanks")], steps=60, lr=3e-3)
    eng = Engine.load(ServingOptions(model=str(adapter), device="cpu"))
    try:
        deltas, stream = reply(eng, None, "hi", SamplingParams(temperature=0.0, max_new_tokens=8))
        tok = eng.served(None).tokenizer
        ids = torch.tensor([eng.chat_prompt(None, ask("hi"))])
        with torch.no_grad():
            expected = eng.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0].tolist()
        assert expected[0] == tok.eos_token_id == eng.model.config.decoder_start_token_id
        assert expected[1] != tok.eos_token_id
        assert "".join(deltas) == tok.decode(expected[1:], skip_special_tokens=True) and deltas
        assert stream.completion_tokens == len(expected) - 1
        # Encoder and decoder have positions of their own: a prompt near the limit leaves the reply all of its own.
        assert eng.room(eng.context_length) == eng.context_length and eng.room(eng.context_length + 1) == 0
        # Batched: rows joining later have their own (learned) decoder positions, not the batch's column.
        base = next(name for name, m in eng.models.items() if m.adapter is None)
        got = batched_equals_generate(eng, [(None, "hi"), (None, "a good movie with a great story"), (base, "hi"),
                                            (None, "bye"), (None, "hi")], monkeypatch, max_new=8)
        assert len(got[0]) > 2 and got[2] == [tok.eos_token_id]  # the random base ends at once, the adapter writes
    finally:
        eng.close()


# ---------------------------------------------------------------------------------------------
# The OpenAI API and the web page's compare.


@pytest.fixture(scope="module")
def server(t5_adapters, tmp_path_factory):
    votes = tmp_path_factory.mktemp("votes") / "votes.jsonl"
    cfg = ServeConfig(model=str(t5_adapters["stack"]), adapters=f"plain={t5_adapters['plain']}", device="cpu",
                      feedback_file=str(votes), max_tokens=24, max_batch=4)
    srv = serve_in_background(cfg, KEY)
    yield srv
    srv.stop()


def test_serve_answers_and_streams_with_seq2seq_adapters(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["t5", "stack", "plain"]
    r = client.chat.completions.create(model="stack", messages=ask("hi"), temperature=0)
    assert r.choices[0].message.content == "fine thanks" and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="plain", messages=ask("hi"), temperature=0, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "what a day" and len(pieces) > 2
    # Raw text completion: the prompt is the encoder's input as it is.
    text = client.completions.create(model="stack", prompt=prompt_text("bye", "stackllama"), temperature=0)
    assert text.choices[0].text == "so long"


def test_compare_streams_two_seq2seq_adapters_and_takes_a_vote(server):
    r = httpx.post(server.url + "/feedback/compare", headers=AUTH, timeout=120,
                   json={"prompt": "hi", "models": ["stack", "plain"], "temperature": 0})
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    texts = ["", ""]
    for e in events[1:]:
        if "delta" in e:
            texts[e["slot"]] += e["delta"]
    assert texts == ["fine thanks", "what a day"] and events[-1] == {"done": True, "complete": True}
    v = httpx.post(server.url + "/feedback/vote", headers=AUTH, timeout=60,
                   json={"comparison": events[0]["comparison"], "vote": "better", "winner": 0})
    assert v.status_code == 200
    row = json.loads(server.votes.read_text().splitlines()[-1])
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("hi", "fine thanks", "what a day")


def test_compare_decodes_both_adapters_in_the_same_decoder_steps(server):
    """The compare page's two answers take the decoder steps of the longer one, not of both in turn."""
    from pocketrlhf.models.forward import unwrap

    decoder = unwrap(server.engine.model)[1].get_decoder()
    calls = []
    handle = decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        before = len(server.engine.batch_sizes)
        r = httpx.post(server.url + "/feedback/compare", headers=AUTH, timeout=120,
                       json={"prompt": "hi", "models": ["stack", "plain"], "temperature": 0})
        assert r.status_code == 200, r.text
        together = len(calls)
        assert max(server.engine.batch_sizes[before:]) == 2
        calls.clear()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        texts = [client.chat.completions.create(model=m, messages=ask("hi"), temperature=0).choices[0].message.content
                 for m in ("stack", "plain")]
        one_by_one = len(calls)
    finally:
        handle.remove()
    assert texts == ["fine thanks", "what a day"]
    # Two answers of about the same length (9-10 tokens with EOS, one decoder pass each): one after the
    # other 19 passes, together about 10 (the longer answer's, plus one if they were admitted apart).
    assert together <= one_by_one // 2 + 2


def test_context_limits_count_encoder_and_decoder_apart(tiny_bart):
    """BART's learned positions: the encoder and the decoder each have max_position_embeddings of
    their own; a request over either limit is a 400 that says which."""
    from fastapi.testclient import TestClient

    cfg = ServeConfig(model=str(tiny_bart), device="cpu", max_tokens=8)
    engine = Engine.load(cfg)
    ctx = engine.context_length
    try:
        with TestClient(create_app(lambda: engine, cfg), base_url="http://127.0.0.1") as client:
            deadline = time.monotonic() + 60
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)

            def complete(prompt, max_tokens):
                return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                            "temperature": 0})

            # A prompt + reply longer than the context is fine when each side fits its own positions.
            fits = complete([5] * (ctx - 4), 6)
            assert fits.status_code == 200, fits.text
            too_long = complete([5] * (ctx + 1), 4)
            assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
            assert f"encoder reads at most {ctx} tokens, and the prompt is {ctx + 1}" in too_long.json()["error"]["message"]
            too_many = complete("hi", ctx + 1)
            assert too_many.status_code == 400
            assert f"decoder writes at most {ctx} tokens; you requested {ctx + 1}" in too_many.json()["error"]["message"]
    finally:
        engine.close()


def test_a_chat_format_on_a_seq2seq_base_is_a_one_line_error(tiny_t5, t5_adapters, capsys):
    from pocketrlhf.cli import main
    from pocketrlhf.errors import ConfigError
    from pocketrlhf.serve.engine import plan_models

    for fmt in ("chatml", "vicuna", "llama-2"):
        with pytest.raises(ConfigError, match=f"t5: prompt format '{fmt}' needs a decoder-only chat template; an "
                                              "encoder-decoder base takes --template plain or stackllama"):
            plan_models(ServingOptions(model=str(tiny_t5), template=fmt))
    assert plan_models(ServingOptions(model=str(t5_adapters["stack"]))).models["stack"].template == "stackllama"
    assert main(["chat", str(t5_adapters["plain"]), "--template", "chatml"]) == 2
    assert capsys.readouterr().err.startswith("error: t5: prompt format 'chatml' needs a decoder-only chat template")


def test_the_model_folders_generation_settings_do_not_leak_in(tiny_t5, tmp_path):
    """As for causal bases: generation_config.json's sampling fields (here ones that would change
    the greedy reply) are ignored; its token fields (the decoder start) are kept."""
    import shutil

    import torch

    from pocketrlhf.models.loading import load_base, load_tokenizer

    tok = load_tokenizer(str(tiny_t5))
    ids = torch.tensor([encode(tok, "hi", special=True)])
    with torch.no_grad():
        first = load_base(str(tiny_t5), device="cpu", training=False).generate(
            input_ids=ids, max_new_tokens=1, do_sample=False)[0, 1].item()
    copy = tmp_path / "t5"
    shutil.copytree(tiny_t5, copy)
    settings = json.loads((copy / "generation_config.json").read_text())
    settings.update(suppress_tokens=[first], no_repeat_ngram_size=1, min_new_tokens=6)
    (copy / "generation_config.json").write_text(json.dumps(settings))
    with torch.no_grad():  # transformers' own generate follows them: another first token
        assert load_base(str(copy), device="cpu", training=False).generate(
            input_ids=ids, max_new_tokens=1, do_sample=False)[0, 1].item() != first
    replies = []
    for folder in (tiny_t5, copy):
        eng = Engine.load(ServingOptions(model=str(folder), device="cpu"))
        try:
            replies.append(reply(eng, None, "hi", SamplingParams(temperature=0.0, max_new_tokens=6))[0])
        finally:
            eng.close()
    assert replies[0] == replies[1] and replies[0]
    assert replies[0][0] == tok.decode([first])


def test_a_merged_seq2seq_model_answers_like_its_adapter(t5_adapters, tmp_path):
    """merge folds the taught adapter into encoder and decoder; the merged folder, served as a
    plain model, gives the adapter's replies in the format it was trained in."""
    from pocketrlhf.merge import MergeConfig, run

    out = tmp_path / "merged"
    run(MergeConfig(adapter=str(t5_adapters["stack"]), out=str(out), progress=False))
    eng = Engine.load(ServingOptions(model=str(out), device="cpu"))
    try:
        name = next(iter(eng.models))
        assert eng.seq2seq and eng.models[name].template == "stackllama"
        assert "".join(reply(eng, name, "hi")[0]) == "fine thanks"
        assert "".join(reply(eng, name, "bye")[0]) == "so long"
    finally:
        eng.close()
