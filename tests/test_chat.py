"""`pocketrlhf chat` and the engine under it: adapter resolution, prompt formats, stopping, the REPL."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketrlhf.cli import main
from pocketrlhf.data.tokenize import encode, tokenize_pair
from pocketrlhf.errors import ConfigError, ModelLoadError
from pocketrlhf.models.quantization import linear4bit_modules
from pocketrlhf.serve.chat import ChatSession
from pocketrlhf.serve.engine import (Engine, SamplingParams, ServingOptions, _held_back, max_memory_map,
                                     parse_adapters, plan_models)

from conftest import teach_adapter

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=30)


@pytest.fixture(scope="module")
def stack_adapter(llama, tmp_path_factory) -> Path:
    # "\n\nQuestion:" is the stackllama stop string: the second reply must stop before it.
    out = tmp_path_factory.mktemp("chat") / "sft" / "adapter"
    return teach_adapter(llama, out, "stackllama", [("hi", "fine thanks"), ("bye", "see you\n\nQuestion: more")])


@pytest.fixture(scope="module")
def engine(stack_adapter):
    eng = Engine.load(ServingOptions(model=str(stack_adapter), device="cpu"))
    yield eng
    eng.close()


def session(engine, text="", style="simple", params=GREEDY, **kw):
    out = io.StringIO()
    chat = ChatSession(engine, params, style=style, inp=io.StringIO(text), out=out, **kw)
    return chat, out


# ---------------------------------------------------------------------------------------------
# Resolving a model or adapter directory.


def test_an_adapter_dir_resolves_its_base_name_and_training_format(stack_adapter, llama):
    plan = plan_models(ServingOptions(model=str(stack_adapter)))
    assert plan.base == str(Path(llama).resolve())
    assert list(plan.models) == ["llama", "sft"]  # runs/<name>/adapter is served as <name>
    assert plan.default == "sft"
    assert plan.models["sft"].template == "stackllama" and plan.models["llama"].template == "auto"
    assert plan.models["llama"].adapter is None and plan.models["sft"].adapter == "sft"
    forced = plan_models(ServingOptions(model=str(stack_adapter), template="chatml"))
    assert forced.models["sft"].template == "chatml"


def test_a_plain_adapter_and_a_base_model_get_their_formats(llama, tmp_path):
    plain = tmp_path / "plain"
    teach_adapter(llama, plain, "plain", [("a", "b")], train=False)
    assert plan_models(ServingOptions(model=str(plain))).models["plain"].template == "plain"
    base = plan_models(ServingOptions(model=str(llama)))
    assert list(base.models) == ["llama"] and base.default == "llama" and base.models["llama"].template == "auto"


def test_an_adapter_whose_base_moved_says_so_and_base_overrides(stack_adapter, llama, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in stack_adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/nowhere/llama"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"was trained on /nowhere/llama, which does not exist here; pass --base DIR"):
        plan_models(ServingOptions(model=str(moved)))
    assert plan_models(ServingOptions(model=str(moved), base=str(llama))).base == str(Path(llama).resolve())


def test_missing_model_and_misused_base_are_one_line_errors(llama, capsys):
    assert main(["chat", "/nowhere/model"]) == 2
    assert capsys.readouterr().err == "error: /nowhere/model does not exist (expected a model or adapter directory)\n"
    with pytest.raises(ConfigError, match="--base only applies to an adapter directory"):
        plan_models(ServingOptions(model=str(llama), base=str(llama)))


def test_8bit_and_4bit_together_is_an_error(llama, capsys):
    assert main(["chat", str(llama), "--load-8bit", "--load-4bit"]) == 2
    assert capsys.readouterr().err == "error: --load-8bit and --load-4bit are exclusive: pick one\n"


def test_offloading_flags_explain_they_need_a_cuda_gpu(llama, capsys):
    with pytest.raises(ConfigError) as e:
        max_memory_map("cpu", True, "")
    assert str(e.value) == ("--cpu-offloading split the weights between a CUDA GPU and the CPU; this run is on cpu "
                            "(no CUDA GPU), where they have no effect: leave them out")
    assert main(["chat", str(llama), "--device", "cpu", "--max-gpu-memory", "8GiB"]) == 2
    assert "--max-gpu-memory split the weights between a CUDA GPU and the CPU" in capsys.readouterr().err
    # On a GPU they become accelerate's max_memory (checked without one: no CUDA call is needed).
    assert max_memory_map("cuda:1", False, "7.5GiB") == {1: "7.5GiB"}
    limits = max_memory_map("cuda:0", True, "8GiB")
    assert limits[0] == "8GiB" and limits["cpu"].endswith("MiB")
    with pytest.raises(ConfigError, match="--max-gpu-memory: expected a size such as 8GiB"):
        max_memory_map("cuda:0", False, "lots")
    assert max_memory_map("cpu", False, "") is None


def test_adapters_option_parses_name_dir_pairs():
    assert parse_adapters("a=/x, b=/y/z") == {"a": "/x", "b": "/y/z"}
    with pytest.raises(ConfigError, match="expected name=dir, got 'nodir'"):
        parse_adapters("nodir")
    with pytest.raises(ConfigError, match="the name 'a' is given twice"):
        parse_adapters("a=/x,a=/y")


# ---------------------------------------------------------------------------------------------
# Prompt formats and stopping.


def test_prompt_formats_render_as_trained(engine):
    tok = engine.served(None).tokenizer
    msgs = [{"role": "user", "content": "q"}]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(engine.chat_prompt(None, msgs)) == "Question: q\n\nAnswer: "  # the adapter's own format
    assert decode(engine.chat_prompt(None, msgs, "chatml")) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert decode(engine.chat_prompt(None, msgs, "llama-2")) == "[INST] q [/INST]"
    assert decode(engine.chat_prompt(None, msgs, "vicuna")).endswith("USER: q ASSISTANT:")
    two = msgs + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}]
    # plain: past exchanges exactly as SFT tokenized them (prompt, completion, EOS), then the new prompt.
    expected = tokenize_pair(tok, "q", "a", False).input_ids + encode(tok, "r", special=True)
    assert engine.chat_prompt(None, two, "plain") == expected
    assert decode(expected) == "qa<|endoftext|>r"
    assert engine.stop_strings(None) == ("\n\nQuestion:",)
    assert engine.stop_strings(None, "plain") == ()


def test_held_back_text_is_an_unfinished_stop_string_or_character():
    stops = ("\n\nQuestion:",)
    assert _held_back("see you\n\nQue", stops) == 5
    assert _held_back("see you\n", stops) == 1
    assert _held_back("see you", stops) == 0
    assert _held_back("caf\ufffd", ()) == 1


def reply(engine, name, text, params=GREEDY, template=None):
    ids = engine.chat_prompt(name, [{"role": "user", "content": text}], template)
    stream = engine.submit(name, ids, params, engine.stop_strings(name, template))
    deltas = list(stream)
    return "".join(deltas), stream, deltas


def test_replies_stop_at_eos_and_before_stop_strings(engine):
    text, stream, _ = reply(engine, None, "hi")
    assert (text, stream.finish_reason) == ("fine thanks", "stop")
    assert stream.prompt_tokens == len(engine.chat_prompt(None, [{"role": "user", "content": "hi"}]))
    text, stream, deltas = reply(engine, None, "bye")
    # The adapter goes on with "\n\nQuestion: more"; no piece of the stop string is ever shown.
    assert (text, stream.finish_reason) == ("see you", "stop")
    assert all("\n" not in d for d in deltas)


def test_a_stop_string_split_over_several_tokens_is_cut_exactly(engine):
    full, stream, _ = reply(engine, "llama", "hi", SamplingParams(temperature=0, max_new_tokens=40))
    assert stream.finish_reason == "length" and stream.completion_tokens == 40
    stop = full[6:10]
    cut, stream, _ = reply(engine, "llama", "hi", SamplingParams(temperature=0, max_new_tokens=40, stop=(stop,)))
    assert cut == full[:full.find(stop)] and stream.finish_reason == "stop"


def test_a_cancelled_stream_stops_and_frees_the_worker(engine):
    ids = engine.chat_prompt("llama", [{"role": "user", "content": "hi"}])
    stream = engine.submit("llama", ids, SamplingParams(temperature=0, max_new_tokens=400))
    next(iter(stream))
    stream.cancel()
    assert stream.wait(10) and stream.finish_reason == "cancelled" and stream.completion_tokens < 400
    assert reply(engine, None, "hi")[0] == "fine thanks"


def test_base_and_adapter_share_one_model(engine):
    # Same weights object; the base answers with the adapter disabled.
    assert reply(engine, "llama", "hi")[0] != "fine thanks"
    assert reply(engine, "sft", "hi")[0] == "fine thanks"


# ---------------------------------------------------------------------------------------------
# The chat loop.


def test_chat_streams_replies_and_runs_commands(engine, tmp_path):
    script = "\n".join([
        "hi", "/regen", "/undo", "/set", "/set temperature=0.5 top_p=0.9 max_new_tokens=25 verbose=true",
        "/set temprature=1", "/set top_p=2", "/set temperature=0", "/clear", "bye", "/system be brief", "/save " + str(tmp_path / "conv"),
        "/clear", "/bogus", "/help", "/exit", "never read",
    ]) + "\n"
    chat, out = session(engine, script)
    chat.run()
    text = out.getvalue()
    assert text.startswith("chatting with sft (prompt format: stackllama, context 512 tokens)")
    assert text.count("fine thanks") == 2  # the reply, then /regen
    assert "(removed the last exchange)" in text
    assert "temperature=0.0 top_p=1.0 top_k=0 min_p=0.0 max_new_tokens=30" in text
    assert "temperature=0.5 top_p=0.9 top_k=0 min_p=0.0 max_new_tokens=25 repetition_penalty=1.0 seed=-1 verbose=True" in text
    assert "error: /set: unknown setting 'temprature' (did you mean temperature?)" in text
    assert "error: /set: top_p must be in (0, 1], got 2.0" in text
    assert "see you\n[" in text and "tokens/s]" in text  # verbose: count and speed after the reply
    assert "error: unknown command /bogus" in text
    assert "/regen               generate the last reply again" in text  # /help
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert saved["system"] == "be brief" and saved["template"] == "stackllama"
    assert saved["messages"] == [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    assert chat.messages == []  # /clear; /exit left before "never read"


def test_load_restores_a_saved_conversation_and_rejects_bad_files(engine, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"system": "s", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine thanks"}]}))
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "user"}]}')
    (tmp_path / "broken.json").write_text('{"messages": [\n  oops]}')
    chat, out = session(engine, f"/load {tmp_path / 'c'}\n/load {tmp_path / 'bad.json'}\n"
                                f"/load {tmp_path / 'broken.json'}\n/load {tmp_path / 'none.json'}\n")
    chat.run()
    text = out.getvalue()
    assert f"(loaded 2 messages from {tmp_path / 'c.json'})" in text
    assert f"error: /load: {tmp_path / 'bad.json'}: message 1 is not" in text
    assert f"error: /load: {tmp_path / 'broken.json'}:2:3: not JSON" in text
    assert f"error: /load: cannot read {tmp_path / 'none.json'}: No such file or directory" in text
    assert chat.system == "s" and chat.messages[-1]["content"] == "fine thanks"


def test_multi_line_messages_and_escaped_slash(engine):
    chat, _ = session(engine, '"""first line\nsecond line\n"""\n"""one"""\n//set is text\n')
    chat.run()
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert users == ["first line\nsecond line", "one", "/set is text"]


class InterruptingOutput(io.StringIO):
    """Raises KeyboardInterrupt (as Ctrl-C would) the first time reply text is written."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def write(self, s):
        if self.armed and s and not s.startswith((">>>", "(", "\n", "chatting with")):
            self.armed = False
            raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(engine):
    out = InterruptingOutput()
    chat = ChatSession(engine, SamplingParams(temperature=0.0, max_new_tokens=400), out=out,
                       inp=io.StringIO("hi\n/set max_new_tokens=30\nhi\n"))
    out.armed = True
    chat.run()
    text = out.getvalue()
    assert "(stopped; that exchange was dropped)" in text
    assert text.count("fine thanks") == 1  # the next message got its full reply
    assert chat.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine thanks"}]
    assert engine.pending == 0


class InterruptingInput(io.StringIO):
    def __init__(self, text):
        super().__init__(text)
        self.first = True

    def readline(self, *a):
        if self.first:
            self.first = False
            raise KeyboardInterrupt
        return super().readline(*a)


def test_ctrl_c_at_the_prompt_does_not_leave_and_ctrl_d_does(engine):
    out = io.StringIO()
    chat = ChatSession(engine, GREEDY, inp=InterruptingInput("hi\n"), out=out)
    chat.run()  # returns at end of input (Ctrl-D)
    assert "(use /exit or Ctrl-D to leave)" in out.getvalue()
    assert chat.messages[-1]["content"] == "fine thanks"


def test_programmatic_style_is_json_lines(engine):
    lines = "\n".join(['{"content": "hi"}', "not json", '{"command": "/clear"}', '"bye"',
                       '{"role": "system", "content": "s"}', '{"oops": 1}']) + "\n"
    chat, out = session(engine, lines, style="programmatic")
    chat.run()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[0] == {"type": "ready", "model": "sft", "template": "stackllama", "context_length": 512}
    replies = [e for e in events if e["type"] == "reply"]
    assert [r["content"] for r in replies] == ["fine thanks", "see you"]
    assert all(r["finish_reason"] == "stop" and r["completion_tokens"] > 0 for r in replies)
    deltas = [e["content"] for e in events if e["type"] == "delta"]
    assert "".join(deltas) == "fine thankssee you"
    errors = [e["message"] for e in events if e["type"] == "error"]
    assert errors[0].startswith("not a JSON line (Expecting value at column 1): not json")
    assert errors[1].startswith('expected {"content": "..."}')
    assert chat.system == "s"


def test_a_long_conversation_drops_its_oldest_exchanges(engine):
    chat, out = session(engine, "hi\nbye\nhi\n" + "word " * 200 + "\n", params=SamplingParams(temperature=0, max_new_tokens=8))
    old = engine.context_length
    engine.context_length = 60
    try:
        chat.run()
    finally:
        engine.context_length = old
    text = out.getvalue()
    assert "(the conversation outgrew the 60-token context: dropped the 1 oldest exchange(s))" in text
    assert "the model's context is 60 tokens; send something shorter" in text
    assert len(engine.chat_prompt(None, chat.conversation())) <= 60


# ---------------------------------------------------------------------------------------------
# Quantized bases on the CPU.


def test_4bit_chat_on_layer_sizes_the_cpu_kernel_cannot_hold(odd_llama, tmp_path):
    """odd_llama's MLP width (176) crashes bitsandbytes' CPU 4-bit inference kernel; chat must fall back."""
    adapter = teach_adapter(odd_llama, tmp_path / "odd", "chatml", [("hi", "x")], train=False)
    eng = Engine.load(ServingOptions(model=str(adapter), load_4bit=True, device="cpu"))
    try:
        slow = [m for _, m in linear4bit_modules(eng.model) if m.support_avx512bf16_for_cpu is False]
        assert slow and all(176 in (m.in_features, m.out_features) for m in slow)
        chat, out = session(eng, '{"content": "hello"}\n{"command": "/set max_new_tokens=6"}\n"again"\n',
                            style="programmatic", params=SamplingParams(temperature=1.0, max_new_tokens=10, seed=0))
        chat.run()
        replies = [json.loads(line) for line in out.getvalue().splitlines() if '"reply"' in line]
        assert len(replies) == 2 and all(r["completion_tokens"] >= 1 for r in replies)
        assert replies[1]["completion_tokens"] <= 6
    finally:
        eng.close()


def test_8bit_chat_on_cpu(stack_adapter):
    eng = Engine.load(ServingOptions(model=str(stack_adapter), load_8bit=True, device="cpu"))
    try:
        _, stream, _ = reply(eng, None, "hi", SamplingParams(temperature=0, max_new_tokens=12))
        assert stream.finish_reason in ("stop", "length") and stream.completion_tokens >= 1
    finally:
        eng.close()


def test_closing_the_engine_cancels_queued_jobs_and_stops_its_worker(stack_adapter):
    import threading

    eng = Engine.load(ServingOptions(model=str(stack_adapter), device="cpu"))
    ids = eng.chat_prompt(None, [{"role": "user", "content": "hi"}])
    eng.busy.acquire()  # the worker takes the first job and waits: both jobs are still to run
    streams = [eng.submit(None, ids, GREEDY) for _ in range(2)]
    closing = threading.Thread(target=eng.close)
    closing.start()
    assert eng._closing.wait(10)
    eng.busy.release()
    closing.join(30)
    assert not closing.is_alive() and not eng._worker.is_alive()
    assert [s.finish_reason for s in streams] == ["cancelled", "cancelled"]
    assert [s.completion_tokens for s in streams] == [0, 0] and eng.pending == 0
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit(None, ids, GREEDY)


# ---------------------------------------------------------------------------------------------
# The real command.


def test_chat_command_in_programmatic_style_over_a_pipe(stack_adapter):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pocketrlhf", "chat", str(stack_adapter), "--style", "programmatic",
         "--temperature", "0", "--device", "cpu"],
        input='{"content": "hi"}\n{"command": "/clear"}\n{"content": "bye"}\n', capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]  # stdout is pure JSON lines
    assert [e["content"] for e in events if e["type"] == "reply"] == ["fine thanks", "see you"]
