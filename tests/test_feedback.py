"""Compare and vote over HTTP: batched answers, votes as JSONL preference pairs, bad votes, a killed server, rm/dpo on the file."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pocketrlhf.data.formats import preference_pairs
from pocketrlhf.data.loading import load_records
from pocketrlhf.serve.api import ServeConfig
from pocketrlhf.serve.engine import SamplingParams

from conftest import serve_in_background, teach_adapter

KEY = "sk-feedback"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("feedback")
    return {
        "stack": teach_adapter(llama, root / "stack", "stackllama", [("hi", "fine thanks"), ("bye", "see you")]),
        "chat": teach_adapter(llama, root / "chat", "chatml", [("hi", "hello friend<|im_end|>")]),
    }


def wait_ready(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    votes = tmp_path_factory.mktemp("votes") / "votes.jsonl"
    cfg = ServeConfig(model=str(adapters["stack"]), adapters=f"chat={adapters['chat']}", device="cpu",
                      feedback_file=str(votes), max_tokens=24, max_queue=64)
    srv = serve_in_background(cfg, KEY)
    yield srv
    srv.stop()


def sse(response: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def run_compare(url: str, prompt="hi", models=("stack", "chat"), **body) -> tuple[str, list[str], list]:
    r = httpx.post(url + "/feedback/compare", headers=AUTH, timeout=120,
                   json={"prompt": prompt, "models": list(models), "temperature": 0, **body})
    assert r.status_code == 200, r.text
    events = sse(r)
    start = events[0]
    texts = [""] * len(start["slots"])
    for e in events[1:]:
        if "delta" in e:
            texts[e["slot"]] += e["delta"]
    assert events[-1] == {"done": True, "complete": True}
    return start["comparison"], texts, events


def vote(url: str, body, headers=AUTH) -> httpx.Response:
    kw = {"content": body} if isinstance(body, (bytes, str)) else {"json": body}
    return httpx.post(url + "/feedback/vote", headers={"Content-Type": "application/json", **headers}, timeout=60, **kw)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------


def test_compare_answers_come_from_one_batch_and_a_vote_is_a_preference_pair(server):
    before = len(server.engine.batch_sizes)
    cid, texts, events = run_compare(server.url, seed=3)
    assert texts == ["fine thanks", "hello friend"]  # each adapter with its own prompt format and stop rules
    assert events[0]["slots"] == [{"slot": 0, "label": "A", "model": "stack"}, {"slot": 1, "label": "B", "model": "chat"}]
    assert max(server.engine.batch_sizes[before:]) == 2  # both adapters decoded in the same forward passes
    r = vote(server.url, {"comparison": cid, "vote": "better", "winner": 1, "annotator": "web-abc"})
    assert r.status_code == 200 and r.json() == {"ok": True, "comparison": cid, "rows": 1, "models": ["stack", "chat"]}
    row = lines(server.votes)[-1]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("hi", "hello friend", "fine thanks")
    assert (row["chosen_model"], row["rejected_model"], row["vote"], row["annotator"]) == ("chat", "stack", "better", "web-abc")
    assert row["sampling"]["temperature"] == 0.0 and row["sampling"]["seed"] == 3 and row["sampling"]["max_tokens"] == 24
    assert row["timestamp"].endswith("Z") and row["comparison"] == cid and row["anonymous"] is False
    again = vote(server.url, {"comparison": cid, "vote": "tie"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
    assert len(lines(server.votes)) == 1


def test_an_anonymous_compare_hides_the_models_until_the_vote(server):
    seen = set()
    for _ in range(6):
        cid, texts, events = run_compare(server.url, anonymous=True, max_tokens=4)
        assert all(s["model"] is None for s in events[0]["slots"])
        r = vote(server.url, {"comparison": cid, "vote": "better", "winner": 0})
        order = tuple(r.json()["models"])
        seen.add(order)
        assert lines(server.votes)[-1]["chosen_model"] == order[0] and lines(server.votes)[-1]["anonymous"] is True
    assert seen == {("stack", "chat"), ("chat", "stack")}  # shuffled (chance of one order six times: 1/32)


def test_three_models_a_tie_and_the_summary(server):
    cid, texts, _ = run_compare(server.url, models=("stack", "chat", "llama"), max_tokens=6)
    r = vote(server.url, {"comparison": cid, "vote": "better", "winner": 0})
    assert r.json()["rows"] == 2  # the winner beat each of the other two
    beaten = [(x["chosen_model"], x["rejected_model"]) for x in lines(server.votes)[-2:]]
    assert beaten == [("stack", "chat"), ("stack", "llama")]
    cid, texts, _ = run_compare(server.url, max_tokens=4)
    assert vote(server.url, {"comparison": cid, "vote": "tie"}).json()["rows"] == 1
    tie = lines(server.votes)[-1]
    assert tie["vote"] == "tie" and "chosen" not in tie and tie["answers"] == texts
    summary = httpx.get(server.url + "/feedback/summary", headers=AUTH).json()
    assert summary["by_vote"]["tie"] >= 1 and summary["file"] == str(server.votes)
    stack = next(m for m in summary["models"] if m["model"] == "stack")
    assert stack["ties"] >= 1 and stack["wins"] >= 2 and 0 < stack["win_rate"] <= 1
    assert httpx.get(server.url + "/feedback/summary").status_code == 401


def test_twenty_concurrent_votes_are_twenty_whole_lines(server):
    ids = [run_compare(server.url, max_tokens=3)[0] for _ in range(20)]
    start = len(lines(server.votes))
    results = {}
    barrier = threading.Barrier(20)

    def cast(i):
        barrier.wait()
        results[i] = vote(server.url, {"comparison": ids[i], "vote": "better", "winner": i % 2, "annotator": f"user-{i}"})

    threads = [threading.Thread(target=cast, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in results.values()) == [200] * 20
    raw = server.votes.read_text().splitlines()[start:]
    assert len(raw) == 20
    rows = [json.loads(x) for x in raw]  # every line whole and parseable
    assert sorted(r["comparison"] for r in rows) == sorted(ids)
    assert {r["annotator"] for r in rows} == {f"user-{i}" for i in range(20)}


@pytest.mark.parametrize("body, status, code, message", [
    ({"comparison": "cmp-nope", "vote": "tie"}, 404, "comparison_not_found", "no comparison 'cmp-nope'"),
    (b"{not json", 400, "invalid_json", "could not parse the JSON body"),
    (b'{"comparison": "x", "vote": "tie"}', 415, "unsupported_media_type", "Content-Type: application/json"),
    ({"vote": "tie"}, 400, None, "'comparison' is missing"),
    ({"comparison": "x", "vote": "maybe"}, 400, None, "'vote' must be one of better, tie, both_bad"),
    ({"comparison": "x", "vote": "tie", "annotator": "a b<script>"}, 400, None, "'annotator' must be 1 to 64"),
    ({"comparison": 5, "vote": "tie"}, 400, None, "'comparison' must be a comparison id string"),
])
def test_bad_votes_get_clear_errors_and_write_nothing(server, body, status, code, message):
    before = server.votes.read_bytes() if server.votes.exists() else b""
    # A form on another site can post text/plain without a CORS preflight: such a body is never read.
    r = vote(server.url, body, headers={**AUTH, "Content-Type": "text/plain"} if status == 415 else AUTH)
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and (code is None or err["code"] == code)
    assert (server.votes.read_bytes() if server.votes.exists() else b"") == before


def test_a_bad_winner_or_missing_key_writes_nothing(server):
    cid, _, _ = run_compare(server.url, max_tokens=3)
    before = server.votes.read_bytes()
    for body, want in [({"comparison": cid, "vote": "better"}, "'winner' is missing"),
                       ({"comparison": cid, "vote": "better", "winner": 2}, "'winner' must be the slot of the better answer, 0 to 1"),
                       ({"comparison": cid, "vote": "better", "winner": "A"}, "'winner' must be")]:
        r = vote(server.url, body)
        assert r.status_code == 400 and want in r.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = vote(server.url, {"comparison": cid, "vote": "tie"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(server.url + "/feedback/compare", headers=headers, json={"prompt": "hi", "models": ["stack", "chat"]})
        assert r.status_code == 401
    assert server.votes.read_bytes() == before
    assert vote(server.url, {"comparison": cid, "vote": "both_bad"}).status_code == 200  # still votable once


@pytest.mark.parametrize("body, message", [
    ({"prompt": "hi", "models": ["stack"]}, "'models' must be a list of 2 to 4 model ids"),
    ({"prompt": "", "models": ["stack", "chat"]}, "'prompt' must be a non-empty string"),
    ({"prompt": "hi", "models": ["stack", "nope"]}, "the model 'nope' does not exist"),
    ({"prompt": "hi", "models": ["stack", "chat"], "temperature": 5}, "'temperature' must be a number from 0 to 2"),
])
def test_bad_compare_requests(server, body, message):
    r = httpx.post(server.url + "/feedback/compare", headers=AUTH, json=body)
    assert r.status_code in (400, 404) and message in r.json()["error"]["message"]


def test_an_unfinished_comparison_cannot_be_voted(server):
    c = server.app.state.comparisons.new("hi", "", ["stack", "chat"], {}, False)
    c.finished[0] = True
    r = vote(server.url, {"comparison": c.id, "vote": "tie"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "comparison_incomplete"


def test_the_page_and_its_files_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="/static/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")  # no CDN
    for name in ("app.js", "markdown.js", "style.css"):
        assert httpx.get(server.url + f"/static/{name}").status_code == 200
    assert "Win rate" in httpx.get(server.url + "/feedback").text


# ---------------------------------------------------------------------------------------------
# The engine under the compare view: mixed adapters batched, joined and left mid-way.


def test_mixed_adapter_batches_give_each_request_its_own_answer(server):
    engine = server.engine
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    asks = [("stack", "hi"), ("chat", "hi"), ("stack", "bye"), ("llama", "hi"), ("chat", "hi"), ("stack", "hi")]
    alone = []
    for name, text in asks:  # one at a time: nothing else in the batch
        ids = engine.chat_prompt(name, [{"role": "user", "content": text}])
        alone.append(engine.submit(name, ids, greedy, engine.stop_strings(name)).text())
    before = len(engine.batch_sizes)
    streams = []
    for k, (name, text) in enumerate(asks):
        ids = engine.chat_prompt(name, [{"role": "user", "content": text}])
        streams.append(engine.submit(name, ids, greedy, engine.stop_strings(name)))
        if k == 2:
            streams[0].wait(30)  # the later ones join a batch already decoding
    together = [s.text() for s in streams]
    assert together == alone and alone[:3] == ["fine thanks", "hello friend", "see you"]
    assert max(engine.batch_sizes[before:]) >= 3


def test_seeded_sampling_does_not_depend_on_the_batch(server):
    engine = server.engine
    ids = engine.chat_prompt("llama", [{"role": "user", "content": "hi"}])
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12, seed=11)
    alone = engine.submit("llama", ids, p).text()
    others = [engine.submit("chat", engine.chat_prompt("chat", [{"role": "user", "content": "hi"}]),
                            SamplingParams(temperature=1.0, max_new_tokens=12)) for _ in range(3)]
    batched = engine.submit("llama", ids, p)
    assert batched.text() == alone
    for s in others:
        s.wait(30)


# ---------------------------------------------------------------------------------------------
# A killed server, and rm/dpo on the file.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_page_open_across_a_server_restart_can_still_vote(adapters, tmp_path):
    votes = tmp_path / "votes.jsonl"
    cfg = ServeConfig(model=str(adapters["stack"]), adapters=f"chat={adapters['chat']}", device="cpu",
                      feedback_file=str(votes), max_tokens=8, max_batch=1)  # the one-at-a-time path, too

    srv = serve_in_background(cfg, KEY)
    try:
        pending, texts, _ = run_compare(srv.url, max_tokens=3)
        done, _, _ = run_compare(srv.url, prompt="bye", max_tokens=3)
        assert vote(srv.url, {"comparison": done, "vote": "tie"}).status_code == 200
    finally:
        srv.stop()
    srv = serve_in_background(cfg, KEY)
    try:
        r = vote(srv.url, {"comparison": pending, "vote": "better", "winner": 1})
        assert r.status_code == 200, r.text
        assert lines(votes)[-1] | {"chosen": texts[1], "rejected": texts[0], "comparison": pending} == lines(votes)[-1]
        assert vote(srv.url, {"comparison": done, "vote": "tie"}).json()["error"]["code"] == "already_voted"
        assert vote(srv.url, {"comparison": pending, "vote": "tie"}).json()["error"]["code"] == "already_voted"
    finally:
        srv.stop()
    assert len(lines(votes)) == 2


def test_kill_9_while_voting_leaves_a_file_rm_reads(adapters, tmp_path):
    votes = tmp_path / "fb" / "votes.jsonl"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "POCKETRLHF_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "pocketrlhf", "serve", str(adapters["stack"]), "--adapters",
                             f"chat={adapters['chat']}", "--port", str(port), "--device", "cpu", "--log-level", "warning",
                             "--feedback-file", str(votes), "--max-tokens", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    voted = []

    def voter(k):
        while not stop.is_set():
            try:
                cid = run_compare(url, prompt=["hi", "bye"][k % 2], temperature=1.0)[0]
                kind = ["better", "tie", "both_bad"][len(voted) % 3]
                r = vote(url, {"comparison": cid, "vote": kind, "winner": k % 2})
                if r.status_code == 200:
                    voted.append(kind)
            except (httpx.TransportError, AssertionError):
                return

    try:
        wait_ready(url)
        threads = [threading.Thread(target=voter, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(voted) < 9 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # while the voters are still voting
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(voted) >= 9
    rows = lines(votes)  # every line whole
    assert len(rows) >= len(voted)  # every acknowledged vote (and perhaps the one in flight)
    pairs, skipped = preference_pairs(load_records(votes), str(votes))
    assert len(pairs) == sum(1 for r in rows if r["vote"] == "better") >= 1
    assert skipped.counts["tie votes"] + skipped.counts["both-bad votes"] == sum(1 for r in rows if r["vote"] != "better")


def test_a_line_cut_short_by_a_crash_is_dropped_on_the_next_start(tmp_path):
    from pocketrlhf.serve.feedback import FeedbackFile

    path = tmp_path / "votes.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "vote": "better"}\n{"prompt": "x", "cho')
    store = FeedbackFile(path)
    assert path.read_text() == '{"prompt": "a", "chosen": "b", "rejected": "c", "vote": "better"}\n'
    store.append([{"prompt": "d", "vote": "tie"}])
    assert [r["prompt"] for r in lines(path)] == ["a", "d"]


def test_rm_and_dpo_train_on_a_feedback_file(server, llama, tmp_path):
    from pocketrlhf.stages import dpo, rm

    # Votes cast through the server: "stack" always wins against "chat", plus ties and both-bad votes.
    for prompt in ["hi", "bye", "hello", "how are you", "what is this", "tell me", "good movie", "bad film"]:
        cid, _, _ = run_compare(server.url, prompt=prompt, max_tokens=6, temperature=1.0)
        vote(server.url, {"comparison": cid, "vote": "better", "winner": 0})
    votes = server.votes
    rows = lines(votes)
    ties = sum(1 for r in rows if r["vote"] == "tie")
    bad = sum(1 for r in rows if r["vote"] == "both_bad")
    assert ties >= 1 and bad >= 1
    summary = rm.train(rm.RMConfig(model=str(llama), data=str(votes), output_dir=str(tmp_path / "rm"), device="cpu",
                                   batch_size=4, max_steps=2, eval_fraction=0.0, lora_r=4, progress=False))
    info = json.loads((tmp_path / "rm" / "data.json").read_text()) if (tmp_path / "rm" / "data.json").exists() else summary
    text = json.dumps(info)
    assert '"tie votes": %d' % ties in text and '"both-bad votes": %d' % bad in text
    assert (tmp_path / "rm" / "adapter" / "adapter_config.json").is_file()
    dpo.train(dpo.DPOConfig(model=str(llama), data=str(votes), output_dir=str(tmp_path / "dpo"), device="cpu",
                            batch_size=4, max_steps=2, eval_fraction=0.0, lora_r=4, progress=False))
    assert (tmp_path / "dpo" / "adapter" / "adapter_config.json").is_file()


def test_a_pipeline_takes_the_feedback_file_as_rm_and_dpo_data(llama, sft_file, tmp_path):
    from pocketrlhf.pipeline import Pipeline, PipelineConfig

    votes = tmp_path / "votes.jsonl"
    votes.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b", "vote": "better"}) + "\n")
    pipe = Pipeline(PipelineConfig(model=str(llama), output_dir=str(tmp_path / "run"), stages=["sft", "rm", "dpo"],
                                   sft={"data": str(sft_file)}, rm={"data": str(votes)}))
    assert pipe.stage_config("rm").data == str(votes)
    assert pipe.stage_config("dpo").data == str(votes)  # DPO reads the reward model's data when it names none


def test_both_mixed_adapter_paths_match_peft(server):
    import torch

    from pocketrlhf.serve.batching import MixedAdapters

    model = server.engine.model
    ids = torch.tensor([[5, 6, 7, 8, 9]] * 4)
    names = ["stack", "__base__", "chat", "stack"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
        assert not torch.allclose(want[0], want[1]) and not torch.allclose(want[0], want[2])
        stacked = MixedAdapters(model)  # the stacked low-rank product of plain LoRA layers
        assert stacked.fast
        with stacked.use(names):
            fast = model(input_ids=ids).logits
        hooked = MixedAdapters(model, fast=False)  # peft's own path, for layers the other cannot take
        try:
            with hooked.use(names):
                slow = model(input_ids=ids).logits
        finally:
            for h in hooked.handles:
                h.remove()
        plain = model(input_ids=ids).logits  # outside a batch: the active adapter, as before
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(slow, want)
    assert not torch.allclose(plain[1], want[1])  # row 1 (base) differs from the active adapter's answer


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    """Only a cut-off row (a crash mid-write) is dropped at start; a whole row written by another
    tool without a final newline is kept, and the next vote starts on a line of its own."""
    from pocketrlhf.serve.feedback import FeedbackFile

    path = tmp_path / "votes.jsonl"
    path.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "b", "chosen": "x", "rejected": "y"}')
    FeedbackFile(path)
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == ["a", "b"]
    path.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "b", "cho')
    FeedbackFile(path)
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == ["a"]
