"""Fitting the ecosystem: trackers (--report-to), model cards, and uploads to a Hub.

Trackers write offline and are read back with their own formats. Uploads go to a real local HTTP
server speaking the part of the Hub API huggingface_hub uses for a commit of small files (repo
creation, metadata validation, pre-upload, commit): everything but the LFS/Xet transfer of large
files, which the real Hub asks for and this server never does (it takes every file inline).
"""

import base64
import json
import re
import shutil
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pocketrlhf import cards, tracking
from pocketrlhf.cli import main
from pocketrlhf.errors import ConfigError
from pocketrlhf.stages import sft


def metrics(run_dir, split="train"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["split"] == split]


def config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), device="cpu", packing=False,
                completion_only=True, seq_length=64, batch_size=8, learning_rate=3e-3, max_steps=4, eval_steps=2,
                warmup_steps=0, lora_r=8, logging_steps=1, progress=False, seed=0)
    base.update(kw)
    return sft.SFTConfig(**base)


# ---------------------------------------------------------------------------------------------
# Trackers.


def wandb_records(path):
    """The records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records
    (7-byte header: crc, length, type 1 full / 2 first / 3 middle / 4 last) hold protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf, pos = buf + data[pos:pos + length], pos + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_every_tracker_gets_the_metrics_config_and_plots_offline(tmp_path, llama, sft_file, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_PROJECT", "pocketrlhf-test")
    # trackio reads TRACKIO_DIR when imported: a fresh import writes into this test's folder.
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "run"
    sft.train(config(llama, sft_file, out, report_to="tensorboard, wandb,trackio"))
    train, evals = metrics(out), metrics(out, "eval")
    expected = {("train", m["step"]): m["loss"] for m in train} | {("eval", m["step"]): m["loss"] for m in evals}
    assert len(evals) == 2  # step 2 and the final evaluation

    # tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    got = {(split, e.step): e.value for split in ("train", "eval") for e in acc.Scalars(f"sft/{split}/loss")}
    assert got == pytest.approx(expected)
    assert {t.split("/")[-1] for t in acc.Tags()["images"]} >= {"loss"}
    assert "learning_rate" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    # wandb (offline: a .wandb file under OUTPUT_DIR/wandb)
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    got, config_keys, images = {}, set(), set()
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for split in ("train", "eval"):
                if f"{split}/loss" in row:
                    got[(split, row["_step"])] = row[f"{split}/loss"]
            images |= {k.split("/")[1] for k, v in row.items() if k.startswith("plots/") and v == "image-file"}
        elif kind == "run":
            config_keys |= {item.key for item in record.run.config.update}
    assert got == pytest.approx(expected)
    assert {"learning_rate", "optimizer", "data"} <= config_keys
    assert "loss" in images

    # trackio (its local store)
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("pocketrlhf-test", f"sft-{out.name}")
    got = {(split, row["step"]): row[f"{split}/loss"] for row in logs for split in ("train", "eval")
           if row.get(f"{split}/loss") is not None}
    assert got == pytest.approx(expected)
    assert SQLiteStorage.get_run_config("pocketrlhf-test", f"sft-{out.name}")["learning_rate"] == 3e-3
    assert any("plots/loss" in row for row in logs)


def test_report_to_names_are_checked():
    assert tracking.parse("none") == [] and tracking.parse("") == []
    assert tracking.parse("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match="'mlflow' is not one of none, tensorboard, wandb, trackio"):
        tracking.parse("tensorboard,mlflow")


def test_a_missing_tracker_is_refused_before_anything_is_written(tmp_path, llama, sft_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an import of a package not installed meets
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^--report-to wandb needs the wandb package: pip install 'pocketrlhf\[wandb\]'$"):
        sft.train(config(llama, sft_file, out, report_to="wandb"))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Model cards.


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama, sft_file):
    out = tmp_path_factory.mktemp("carded") / "run"
    sft.train(config(llama, sft_file, out))
    return out


def test_the_card_has_hub_metadata_and_the_training(trained, llama):
    text = (trained / "adapter" / "README.md").read_text()
    meta = cards.read_metadata(text)
    assert meta == {"library_name": "peft", "pipeline_tag": "text-generation", "tags": ["pocketrlhf", "sft", "lora"]}
    # A local base is no Hub id: named in the text, not as base_model (the Hub would refuse the card).
    assert str(llama) in text
    summary = json.loads((trained / "summary.json").read_text())
    assert f"for {summary['steps']} optimizer steps" in text
    assert f"| eval_loss (held out) | {summary['eval_loss']:.4g} |" in text
    assert f"| train_loss | {summary['train_loss']:.4g} |" in text
    assert "| optimizer | `adamw` |" in text and "- data: `" in text
    folded = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(folded) == yaml.safe_load((trained / "config.yaml").read_text())
    assert f"pocketrlhf chat {trained / 'adapter'}" in text


def test_a_hub_base_is_the_cards_base_model():
    meta = cards.metadata("meta-llama/Llama-2-7b-hf", "rm", "LORA", merged=False)
    assert meta == {"base_model": "meta-llama/Llama-2-7b-hf", "library_name": "peft",
                    "pipeline_tag": "text-classification", "tags": ["pocketrlhf", "rm", "lora"]}


def test_the_cards_peft_snippet_loads_the_adapter(trained):
    text = (trained / "adapter" / "README.md").read_text()
    snippet = re.search(r"With peft.*?```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's own code, as a reader would run it
    saved = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    assert_holds_adapter(scope["model"], saved)
    assert scope["tokenizer"]("hello")["input_ids"]
    transformers_snippet = re.search(r"With transformers.*?```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(transformers_snippet, scope)  # noqa: S102
    assert_holds_adapter(scope["model"], saved)


def assert_holds_adapter(model, saved: dict) -> None:
    """Every saved LoRA tensor is in the model, with the same values."""
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for name, tensor in saved.items():
        match = [v for k, v in loaded.items() if k.endswith(name.split("base_model.model.")[-1])]
        assert len(match) == 1 and torch.equal(match[0].float(), tensor.float()), name


def test_a_merged_model_gets_its_card(trained, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(trained / "adapter"), "--out", str(out), "--no-verify"]) == 0
    text = (out / "README.md").read_text()
    assert cards.read_metadata(text) == {"library_name": "transformers", "pipeline_tag": "text-generation",
                                         "tags": ["pocketrlhf", "sft", "merged"]}
    assert "Merged from the adapter" in text and "eval_loss (held out)" in text
    snippet = re.search(r"With transformers.*?```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102
    assert scope["model"].config.model_type == "llama"


# ---------------------------------------------------------------------------------------------
# The Hub.


class FakeHub:
    """Repos, files and requests of a local server answering huggingface_hub's upload calls."""

    def __init__(self):
        self.token = "hf_test"
        self.repos: dict[str, dict] = {}
        self.fail_commits = False
        self.cards: list[dict] = []


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> bytes:
            if self.headers.get("Content-Length"):
                return self.rfile.read(int(self.headers["Content-Length"]))
            out = b""
            while self.headers.get("Transfer-Encoding") == "chunked":
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
            return out

        def do_GET(self):
            self.reply(404, {"error": "not found"})

        def do_POST(self):
            body = self.body()
            if self.headers.get("authorization") != f"Bearer {hub.token}":
                return self.reply(401, {"error": "Invalid credentials in Authorization header"})
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts == ["api", "repos", "create"]:
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}"
                hub.repos.setdefault(repo, {"private": req.get("visibility") == "private", "files": {}})
                return self.reply(200, {"url": f"http://{self.headers['host']}/{repo}", "name": repo, "id": repo})
            if parts == ["api", "validate-yaml"]:
                text = json.loads(body)["content"]
                meta = cards.read_metadata(text)
                hub.cards.append(meta)
                base = meta.get("base_model")
                if base is not None and not re.match(r"^[\w.-]+/[\w.-]+$", str(base)):  # as the Hub does
                    return self.reply(400, {"errors": [{"message": f'"base_model" with value "{base}" is not valid'}]})
                return self.reply(200, {"errors": [], "warnings": []})
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
                repo = f"{parts[2]}/{parts[3]}"
                if repo not in hub.repos:
                    return self.reply(404, {"error": "Repository not found"})
                if parts[4] == "preupload":
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in json.loads(body)["files"]]})
                if hub.fail_commits:
                    return self.reply(500, {"error": "Internal Error"})
                for line in (json.loads(x) for x in body.decode().splitlines() if x.strip()):
                    if line["key"] == "file":
                        hub.repos[repo]["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    elif line["key"] == "header":
                        hub.repos[repo]["message"] = line["value"]["summary"]
                oid = "0" * 40
                return self.reply(200, {"commitUrl": f"http://{self.headers['host']}/{repo}/commit/{oid}",
                                        "commitOid": oid, "pullRequestUrl": None})
            self.reply(404, {"error": "not found"})

    return Handler


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests' conftest sets it
    yield hub
    server.shutdown()


def test_push_to_hub_after_training_uploads_the_adapter_folder(tmp_path, llama, sft_file, fake_hub):
    out = tmp_path / "run"
    sft.train(config(llama, sft_file, out, push_to_hub="me/tiny-sft", hub_private=True))
    repo = fake_hub.repos["me/tiny-sft"]
    assert repo["private"] is True
    local = {p.name: p.read_bytes() for p in (out / "adapter").iterdir() if p.is_file()}
    assert set(repo["files"]) == set(local) >= {"adapter_model.safetensors", "adapter_config.json",
                                                "pocketrlhf_adapter.json", "tokenizer_config.json", "README.md"}
    assert all(repo["files"][k] == v for k, v in local.items() if k != "README.md")
    uploaded = repo["files"]["README.md"].decode()
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-sft")' in uploaded and str(out / "adapter") not in uploaded
    assert fake_hub.cards and fake_hub.cards[-1]["tags"] == ["pocketrlhf", "sft", "lora"]


def test_push_command_and_a_failed_upload(tmp_path, trained, fake_hub, capsys):
    folder = trained / "adapter"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["push", str(folder), "me/again"]) == 0
    assert "uploaded" in capsys.readouterr().out and "adapter_model.safetensors" in fake_hub.repos["me/again"]["files"]
    # A folder without a card (saved before cards existed) gets one in the upload, not on disk.
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "README.md").unlink()
    assert main(["push", str(bare), "me/bare"]) == 0
    capsys.readouterr()
    assert not (bare / "README.md").exists()
    card = fake_hub.repos["me/bare"]["files"]["README.md"].decode()
    assert cards.read_metadata(card)["library_name"] == "peft" and 'from_pretrained("me/bare")' in card
    fake_hub.fail_commits = True
    assert main(["push", str(folder), "me/again"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed" in err[0] and "the local folder is intact" in err[0], err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    fake_hub.token = "another"  # the user's token is refused
    assert main(["push", str(folder), "me/again"]) != 0
    assert "the local folder is intact" in capsys.readouterr().err


def test_push_errors_before_any_work(tmp_path, llama, sft_file, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.utils.get_token", lambda: None)
    with pytest.raises(ConfigError, match="expected a Hub repo id like user/name"):
        sft.train(config(llama, sft_file, tmp_path / "run", push_to_hub="no-slash"))
    assert not (tmp_path / "run").exists()
    assert main(["push", str(tmp_path), "me/x"]) != 0
    assert "holds neither an adapter" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "me/x"]) != 0
    assert "no Hugging Face token" in capsys.readouterr().err
