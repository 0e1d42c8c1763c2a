"""Every bad input is one line on stderr (``error: ...`` naming the option), exit status 2, and
nothing the user had is changed. Most cases fail before any model is loaded."""

import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from pocketrlhf.cli import main
from pocketrlhf.config import parse_args
from pocketrlhf.data import synthetic
from pocketrlhf.data.formats import Skipped, prompts
from pocketrlhf.errors import ModelLoadError
from pocketrlhf.paths import is_hub_dataset, is_hub_id

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by its SHA-256: equal snapshots mean nothing was added, changed or removed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A user's folder (the current directory) holding a file of theirs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    write_jsonl(tmp_path / "sft.jsonl", synthetic.sft_rows(4, seed=0))
    write_jsonl(tmp_path / "prompts.jsonl", synthetic.prompt_rows(4, seed=0))
    return tmp_path


def fails(argv: list[str], capsys, folder: Path) -> str:
    """Run the command, check the one-line error and the untouched folder, return the line."""
    before = snapshot(folder)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert snapshot(folder) == before
    return captured.err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize("argv,message", [
    (["sft", "--learning-rate", "-1e-4"], "--learning-rate must be > 0, got -0.0001"),
    (["sft", "--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
    (["dpo", "--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
    (["sft", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["rm", "--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be at least 1, got 0"),
    (["ppo", "--rollouts-per-step", "0"], "--rollouts-per-step must be at least 1, got 0"),
    (["sft", "--lora-r", "0"], "--lora-r must be at least 1, got 0"),
    (["sft", "--seq-length", "-5"], "--seq-length must be at least 1, got -5"),
    (["sft", "--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1), got 1.5"),
    (["sft", "--max-steps", "-1"], "--max-steps must be at least 0, got -1"),
    (["sft", "--epochs", "0"], "--epochs must be > 0, got 0.0"),
    (["ppo", "--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["evaluate", "--samples", "0"], "--samples must be at least 1, got 0"),
    (["chat", "--temperature", "-1", "somewhere"], "--temperature must be at least 0, got -1.0"),
    (["sft", "--packing", "maybe"], "--packing: expected true or false, got 'maybe'"),
])
def test_out_of_range_options_are_one_line(workdir, capsys, argv, message):
    assert fails(argv, capsys, workdir) == message


def test_yaml_values_are_checked_and_named_with_their_file(workdir, capsys):
    (workdir / "run.yaml").write_text("batch_size: 0\nmodel: ./nowhere\n")
    assert fails(["sft", "--config", "run.yaml"], capsys, workdir) == "run.yaml: batch_size must be at least 1, got 0"
    # A flag overrides the file, and then the file's next problem is named.
    assert fails(["sft", "--config", "run.yaml", "--batch-size", "2", "--data", "sft.jsonl"], capsys, workdir) == (
        "run.yaml: model ./nowhere does not exist (expected a local Hugging Face model folder)")


def test_a_bool_flag_before_a_positional_still_takes_it_as_the_positional():
    from pocketrlhf.serve.chat import ChatConfig

    cfg = parse_args(ChatConfig, ["--verbose", "models/x"], ("model",))
    assert cfg.verbose is True and cfg.model == "models/x"


@pytest.mark.parametrize("model", ["/nonexistent/llama", "./llama", "../nowhere/llama", "~/nowhere-pocketrlhf/llama",
                                   "models/llama", "runs/a/b"])
def test_a_local_looking_model_that_does_not_exist_fails_at_once(workdir, capsys, model):
    (workdir / "models").mkdir()  # `models/llama` is that folder's llama, not a hub repository
    before = snapshot(workdir)
    assert fails(["sft", "--model", model, "--data", "sft.jsonl", "--output-dir", "out"], capsys, workdir) == (
        f"--model {model} does not exist (expected a local Hugging Face model folder)")
    assert snapshot(workdir) == before


def test_no_model_at_all(workdir, capsys):
    assert fails(["sft", "--data", "sft.jsonl"], capsys, workdir) == "--model is required (a local Hugging Face model folder)"
    assert fails(["ppo", "--model", str(workdir), "--reward-function", "x:y"], capsys, workdir) == (
        "--prompts is required (a prompts file or folder)")


def test_model_loading_checks_the_path_itself(workdir):
    from pocketrlhf.models.loading import load_base, load_tokenizer

    (workdir / "models").mkdir()
    with pytest.raises(ModelLoadError, match=r"^models/llama does not exist \(expected a local Hugging Face model folder\)$"):
        load_tokenizer("models/llama")
    with pytest.raises(ModelLoadError, match=r"^--model is required \(a local Hugging Face model folder\)$"):
        load_base("")


def test_hub_ids_stay_allowed(workdir):
    assert is_hub_id("gpt2") and is_hub_id("meta-llama/Llama-2-7b-hf")
    assert is_hub_dataset("lvwerra/stack-exchange-paired") and not is_hub_dataset("data/train.jsonl")
    (workdir / "meta-llama").mkdir()
    assert not is_hub_id("meta-llama/Llama-2-7b-hf")  # there is a local folder of that name
    assert not is_hub_id("./gpt2") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")


@pytest.mark.parametrize("argv,message", [
    (["sft", "--data", "nothere.jsonl"], "--data nothere.jsonl does not exist (expected a data file or folder, "
                                         "or a hub dataset id org/name)"),
    (["sft", "--data", "sft.jsonl", "--eval-data", "data/held_out"], "--eval-data data/held_out does not exist "
                                                                     "(expected a data file or folder, or a hub dataset id org/name)"),
    (["ppo", "--prompts", "prompts.jsonl", "--sft-adapter", "runs/sft/adapter", "--reward-function", "x:y"],
     "--sft-adapter runs/sft/adapter does not exist (expected an adapter folder)"),
    (["ppo", "--prompts", "prompts.jsonl", "--reward-function", "rewards.py:score"],
     "--reward-function rewards.py does not exist (expected a Python file)"),
])
def test_paths_that_must_exist(workdir, capsys, argv, message):
    (workdir / "data").mkdir()
    assert fails(argv + ["--model", str(workdir), "--output-dir", "out"], capsys, workdir) == message


def test_stackexchange_folder_without_posts_xml(workdir, capsys):
    (workdir / "dump").mkdir()
    (workdir / "dump" / "Users.xml").write_text("<users/>")
    message = fails(["data", "stackexchange", "dump", "--output-dir", "se"], capsys, workdir)
    assert message.startswith("dump: a folder with no Posts.xml")


def test_csv_with_an_unclosed_quote_names_its_line(workdir, capsys, llama):
    (workdir / "bad.csv").write_text('prompt,completion\nhi,there\n"oops,never closed\nbye,now\n')
    message = fails(["sft", "--model", str(llama), "--data", "bad.csv", "--device", "cpu", "--output-dir",
                     str(workdir.parent / f"{workdir.name}-out")], capsys, workdir)
    assert message == "bad.csv:3: a quoted field opened on this line is never closed"


def test_pipeline_checks_every_sections_paths_before_any_stage(workdir, capsys):
    (workdir / "model").mkdir()
    (workdir / "run.yaml").write_text(yaml.safe_dump({
        "model": "model", "output_dir": "run", "stages": ["sft", "rm", "ppo"],
        "sft": {"data": "sft.jsonl"}, "rm": {"data": "sft.jsonl"}, "ppo": {"prompts": "promtps.jsonl"}}))
    assert fails(["pipeline", "run.yaml"], capsys, workdir) == (
        "run.yaml: ppo: prompts promtps.jsonl does not exist (expected a data file or folder, or a hub dataset id org/name)")
    assert not (workdir / "run").exists()

    (workdir / "run.yaml").write_text(yaml.safe_dump({"model": "model", "stages": ["sft"], "sft": {"batch_size": 0}}))
    assert fails(["pipeline", "run.yaml"], capsys, workdir) == "run.yaml: sft: batch_size must be at least 1, got 0"
    (workdir / "run.yaml").write_text(yaml.safe_dump({"model": "model", "stages": ["sft"]}))
    assert fails(["pipeline", "run.yaml"], capsys, workdir) == "run.yaml: sft: data is required (a data file or folder)"
    (workdir / "run.yaml").write_text(yaml.safe_dump({"model": "model", "stages": ["data", "sft"], "stackexchange": "dumps",
                                                      "data": {"site": "stackoverflow.com"}}))
    assert fails(["pipeline", "run.yaml"], capsys, workdir) == (
        "run.yaml: stackexchange dumps does not exist (expected a Posts.xml dump, a folder holding one, or a paired dataset)")
    (workdir / "run.yaml").write_text(yaml.safe_dump({"model": "./mdl", "stages": ["sft"], "sft": {"data": "sft.jsonl"}}))
    assert fails(["pipeline", "run.yaml"], capsys, workdir) == (
        "run.yaml: model ./mdl does not exist (expected a local Hugging Face model folder)")


def test_serve_without_its_packages_names_the_pip_command(workdir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    message = fails(["serve", "somewhere"], capsys, workdir)
    assert message.startswith("pocketrlhf serve needs fastapi and uvicorn") and "pip install 'pocketrlhf[serve]'" in message


def test_serve_dependencies_are_installed_by_default():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert {"fastapi", "uvicorn"} <= names
    assert project["optional-dependencies"]["serve"]  # old install commands keep working


def test_data_group_help_lists_its_commands(capsys):
    assert main(["data", "--help"]) == 0
    assert "data stackexchange" in capsys.readouterr().out
    assert main(["data"]) == 2
    assert "data stackexchange" in capsys.readouterr().out


def test_help_into_a_closed_pipe_is_quiet():
    reader, writer = os.pipe()
    os.close(reader)  # like `| head` that has already exited
    proc = subprocess.run([sys.executable, "-m", "pocketrlhf", "sft", "--help"], stdout=writer, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT)
    os.close(writer)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr and proc.returncode == 1


def test_sft_help_names_the_data_columns(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "prompt+completion" in out and "messages" in out and "question+response_j" in out


def test_skipped_rows_are_counted_with_their_row_numbers():
    import datasets

    rows = [{"prompt": p} for p in ["a", "", "b", " ", "c", "", "", "d"]]
    _, skipped = prompts(datasets.Dataset.from_list(rows), "p.jsonl")
    assert skipped.describe() == "4 rows with an empty prompt (rows 2, 4, 6, ...)"
    one = Skipped()
    one.add("rows with empty text", 7)
    assert one.describe() == "1 rows with empty text (row 7)"


def test_models_list_shows_no_absolute_paths(llama):
    from fastapi.testclient import TestClient

    from pocketrlhf.serve.api import ServeConfig, create_app
    from pocketrlhf.serve.engine import plan_models

    cfg = ServeConfig(model=str(llama), device="cpu")
    plan = plan_models(cfg)
    engine = types.SimpleNamespace(models=plan.models, default=plan.default, context_length=64,
                                   pending=lambda: 0, close=lambda *a, **k: None)
    with TestClient(create_app(lambda: engine, cfg), base_url="http://127.0.0.1") as client:
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
        cards = client.get("/v1/models").json()["data"]
    assert cards and all(str(llama) not in str(card) and not str(card["root"]).startswith("/") for card in cards)
    assert cards[0]["id"] == cards[0]["root"] == llama.name
