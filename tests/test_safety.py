"""Nothing lost: bad input stops with one line, and what the user had (their files, the last good
checkpoint, a finished adapter) is unchanged afterwards, checked byte for byte."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from pocketrlhf.cli import main, resume_command
from pocketrlhf.data.synthetic import PROMPT, TITLES
from pocketrlhf.errors import ConfigError, NonFiniteError, RewardFunctionError
from pocketrlhf.models.roles import rule_reward
from pocketrlhf.stages import common, sft


def checksums(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def user_folder(path):
    """A folder as a user might point --output-dir at: their own files, a git repository."""
    (path / ".git").mkdir(parents=True)
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "notes.txt").write_text("my notes\n")
    return path


def metrics(run_dir, split="train"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if m["split"] == split]


# ---------------------------------------------------------------------------------------------
# Never delete what pocketrlhf did not create.


def test_data_stackexchange_overwrite_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "paired.jsonl", [{"qid": q, "question": f"q{q}", "response_j": "a", "response_k": "b"}
                                                     for q in range(20)])
    folder = user_folder(tmp_path / "work")
    before = checksums(folder)
    assert main(["data", "stackexchange", str(pairs), "--output-dir", str(folder), "--overwrite"]) == 2
    assert f"{folder} holds .git, notes.txt but was not made by `pocketrlhf data stackexchange`" in one_line_error(capsys)
    assert checksums(folder) == before
    # Its own folder is replaced as asked.
    out = tmp_path / "prepared"
    assert main(["data", "stackexchange", str(pairs), "--output-dir", str(out)]) == 0
    assert main(["data", "stackexchange", str(pairs), "--output-dir", str(out), "--overwrite"]) == 0
    assert (out / "manifest.json").is_file() and common.is_own_folder(out, "data stackexchange")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    folder = user_folder(tmp_path / "work")
    before = checksums(folder)
    for extra in ([], ["--resume"]):
        assert main(["demo", "--quick", "--no-progress", "--output-dir", str(folder), *extra]) == 2
        err = one_line_error(capsys)
        assert f"{folder} holds .git, notes.txt but was not made by `pocketrlhf demo`" in err
        assert checksums(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == [".git", "notes.txt"]


def test_demo_starts_over_in_its_own_folder_and_keeps_what_it_did_not_write(tmp_path):
    from pocketrlhf.demo import prepare_folder

    root = tmp_path / "demo"
    prepare_folder(root, resume=False)  # a new folder is fine
    assert common.is_own_folder(root, "demo")
    (root / "sft").mkdir()
    (root / "sft" / "summary.json").write_text("{}")
    (root / "report.md").write_text("old report")
    (root / "notes.txt").write_text("mine")
    prepare_folder(root, resume=True)  # continuing keeps the previous outputs
    assert (root / "sft" / "summary.json").is_file()
    prepare_folder(root, resume=False)
    assert sorted(p.name for p in root.iterdir()) == [common.MARKER, "notes.txt"]
    assert (root / "notes.txt").read_text() == "mine"
    # A folder another command made is not the demo's to clear.
    other = tmp_path / "sft-run"
    other.mkdir()
    common.write_marker(other, "sft")
    (other / "adapter").mkdir()
    with pytest.raises(ConfigError, match="not made by `pocketrlhf demo`"):
        prepare_folder(other, resume=False)
    assert (other / "adapter").is_dir()


def sft_args(llama, sft_file, out, *extra):
    return ["sft", "--model", str(llama), "--data", str(sft_file), "--output-dir", str(out), "--device", "cpu",
            "--no-progress", "--batch-size", "4", "--no-packing", "--seq-length", "64", "--eval-fraction", "0",
            "--max-steps", "2", *extra]


def test_overwrite_removes_only_pocketrlhf_runs(tmp_path, llama, sft_file, capsys):
    # A folder holding what looks like a run (an adapter folder) that pocketrlhf did not write.
    folder = user_folder(tmp_path / "work")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"the user's own adapter")
    before = checksums(folder)
    assert main(sft_args(llama, sft_file, folder, "--overwrite")) == 2
    assert "holds adapter but was not made by pocketrlhf" in one_line_error(capsys)
    assert checksums(folder) == before
    assert main(sft_args(llama, sft_file, folder)) == 2  # without --overwrite: the usual advice
    assert "already holds a run (adapter)" in one_line_error(capsys)
    assert checksums(folder) == before

    # Someone else's config.yaml is not overwritten by a fresh run either.
    other = user_folder(tmp_path / "other")
    (other / "config.yaml").write_text("mine: true\n")
    before = checksums(other)
    assert main(sft_args(llama, sft_file, other)) == 2
    assert "holds config.yaml but was not made by pocketrlhf" in one_line_error(capsys)
    assert checksums(other) == before

    # Unrelated files are no obstacle: the run goes in beside them, and --overwrite later clears only
    # the run's own outputs.
    mixed = user_folder(tmp_path / "mixed")
    before = checksums(mixed)
    assert main(sft_args(llama, sft_file, mixed)) == 0
    assert common.is_own_folder(mixed, "sft") and (mixed / "adapter").is_dir()
    assert main(sft_args(llama, sft_file, mixed, "--overwrite", "--max-steps", "1")) == 0
    assert [m["step"] for m in metrics(mixed)] == [1]
    assert {k: v for k, v in checksums(mixed).items() if k in before} == before


# ---------------------------------------------------------------------------------------------
# Non-finite values and broken reward functions.

REWARDS = '''
import math

POISON = {poison!r}
calls = []


def nan_for_one(prompts, responses):
    return [math.nan if POISON in p else len(r) / 10 for p, r in zip(prompts, responses)]


def raises(responses):
    raise ValueError("boom\\nsecond line")


def strings(responses):
    return [0.5] * (len(responses) - 1) + ["good"]


def too_few(responses):
    return [0.0] * (len(responses) - 1)
'''


@pytest.fixture
def ppo_setup(tmp_path):
    """16 prompts, one per title, 8 per step: the first step answers 8 of them, the second the
    other 8, among them the one whose answers the poisoned reward scores NaN."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT.format(title=t)} for t in TITLES])
    poisoned = common.epoch_order(len(TITLES), 0, 0)[8 + 2]  # third rollout of step 2
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS.format(poison=TITLES[poisoned]))
    return prompts, rewards, poisoned


def ppo_args(llama, prompts, out, reward, *extra):
    return ["ppo", "--model", str(llama), "--prompts", str(prompts), "--output-dir", str(out), "--device", "cpu",
            "--reward-function", reward, "--rollouts-per-step", "8", "--batch-size", "8",
            "--gradient-accumulation-steps", "1", "--max-new-tokens", "6", "--eval-fraction", "0", "--ppo-epochs", "1",
            "--no-progress", "--max-steps", "3", "--save-steps", "1", "--learning-rate", "1e-3", *extra]


def test_a_nan_reward_stops_ppo_naming_the_function_and_prompt(tmp_path, llama, ppo_setup, capsys):
    prompts, rewards, poisoned = ppo_setup
    out = tmp_path / "run"
    spec = f"{rewards}:nan_for_one"
    assert main(ppo_args(llama, prompts, out, spec)) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: ppo step 2: reward function {spec} returned nan for the answer to prompt {poisoned}, "
                          f"'{PROMPT.format(title=TITLES[poisoned])}'"), err
    assert f"last checkpoint {out / 'checkpoint-1'}" in err and "--skip-nonfinite" in err
    # Nothing after the last good step: no adapter, no summary, no second checkpoint.
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert [m["step"] for m in metrics(out)] == [1]
    weights = load_file(str(out / "checkpoint-1" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # Continuing meets the same answer again: the same error, and only config.yaml (which records
    # the last command's options, here --resume auto) changed.
    before = checksums(out)
    assert main(ppo_args(llama, prompts, out, spec, "--resume", "auto")) == 2
    assert one_line_error(capsys) == err
    after = checksums(out)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == {k: v for k, v in before.items()
                                                                       if k != "config.yaml"}


def test_skip_nonfinite_drops_the_rollout_and_counts_it(tmp_path, llama, ppo_setup):
    prompts, rewards, _ = ppo_setup
    out = tmp_path / "run"
    assert main(ppo_args(llama, prompts, out, f"{rewards}:nan_for_one", "--skip-nonfinite", "--max-steps", "2")) == 0
    steps = metrics(out)
    assert [m["nonfinite_skipped"] for m in steps] == [0, 1]
    assert all(m["score"] is not None and math.isfinite(m["score"]) for m in steps)
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["final_score"]) and math.isfinite(summary["final_kl"])


def test_broken_reward_functions_are_one_line_errors(tmp_path, llama, ppo_setup, capsys):
    prompts, rewards, _ = ppo_setup
    first_prompts = common.epoch_order(len(TITLES), 0, 0)[:8]
    out = tmp_path / "run"
    assert main(ppo_args(llama, prompts, out, f"{rewards}:raises", "--max-steps", "1")) == 2
    assert one_line_error(capsys) == (f"error: ppo step 1: reward function {rewards}:raises raised ValueError: boom "
                                      f"(on 8 responses) (prompts {first_prompts[0]}..{first_prompts[-1]})")
    assert not (out / "adapter").exists()
    assert main(ppo_args(llama, prompts, out, f"{rewards}:strings", "--max-steps", "1", "--overwrite")) == 2
    last = first_prompts[-1]
    assert one_line_error(capsys) == (f"error: ppo step 1: reward function {rewards}:strings returned str 'good' as a "
                                      f"score; it must return numbers (the answer to prompt {last}, "
                                      f"'{PROMPT.format(title=TITLES[last])}')")
    assert not (out / "adapter").exists()

    # The same checks without a model: wrong length, wrong container, and what is accepted.
    ids = torch.zeros(3, 2, dtype=torch.long)

    def score(fn, spec="m:f"):
        return rule_reward(fn, spec)(ids, ids, ["p"] * 3, ["a", "b", "c"])

    with pytest.raises(RewardFunctionError, match=r"^reward function m:f returned 2 scores for 3 responses$"):
        score(lambda responses: [0.0, 1.0])
    with pytest.raises(RewardFunctionError, match=r"returned str 'bad'; it must return a list of 3 numbers"):
        score(lambda responses: "bad")
    with pytest.raises(RewardFunctionError, match=r"returned NoneType None as a score"):
        score(lambda prompts, responses: [1.0, None, 2.0])
    import numpy as np

    assert score(lambda responses: np.array([1, 2, 3], dtype=np.float32)).tolist() == [1.0, 2.0, 3.0]
    assert score(lambda responses: torch.tensor([0.5, 1.5, 2.5])).tolist() == [0.5, 1.5, 2.5]
    assert score(lambda responses: [True, False, True]).tolist() == [1.0, 0.0, 1.0]


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_sft_loss(monkeypatch, kind: str, at_call: int):
    """SFT's loss turns non-finite (the loss itself, or only its gradient) at one micro-batch."""
    original = sft.SFTLoss.loss
    calls = {"n": 0}

    def loss(self, module, batch):
        value, metrics = original(self, module, batch)
        calls["n"] += 1
        if calls["n"] == at_call:
            value = value * float("inf") if kind == "loss" else NanGradient.apply(value)
        return value, metrics

    monkeypatch.setattr(sft.SFTLoss, "loss", loss)


def sft_config(llama, sft_file, out, **kw):
    settings = dict(model=str(llama), data=str(sft_file), output_dir=str(out), device="cpu", packing=False,
                    seq_length=64, batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3, max_steps=3,
                    save_steps=1, eval_fraction=0, progress=False, lora_r=8, lr_scheduler="constant")
    settings.update(kw)
    return sft.SFTConfig(**settings)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nonfinite_loss_or_gradient_stops_the_offline_loop(tmp_path, llama, sft_file, monkeypatch, kind):
    poison_sft_loss(monkeypatch, kind, at_call=4)  # step 2, second micro-batch
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as caught:
        sft.train(sft_config(llama, sft_file, out))
    what = "the loss of micro-batch 2 of 2 is inf" if kind == "loss" else "the gradient norm is nan"
    assert str(caught.value).startswith(f"sft step 2: {what}; stopped before writing anything (last checkpoint "
                                        f"{out / 'checkpoint-1'}")
    assert "\n" not in str(caught.value)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (out / "adapter").exists() and [m["step"] for m in metrics(out)] == [1]


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skip_nonfinite_skips_the_micro_batch_or_step(tmp_path, llama, sft_file, monkeypatch, kind):
    poison_sft_loss(monkeypatch, kind, at_call=4)
    out = tmp_path / "run"
    sft.train(sft_config(llama, sft_file, out, skip_nonfinite=True))
    steps = metrics(out)
    assert [m["nonfinite_skipped"] for m in steps] == [0, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in steps)
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    if kind == "gradient":  # the whole step is skipped: step 2 leaves the weights as step 1 left them
        step1 = load_file(str(out / "checkpoint-1" / "adapter" / "adapter_model.safetensors"))
        step2 = load_file(str(out / "checkpoint-2" / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(step1[k], step2[k]) for k in step1)


# ---------------------------------------------------------------------------------------------
# Resume.


def crashed_run(llama, sft_file, tmp_path):
    """A run that died right after checkpoint-2 (of 4)."""
    full = tmp_path / "full"
    assert main(sft_args(llama, sft_file, full, "--max-steps", "4", "--save-steps", "2", "--learning-rate", "1e-3",
                         "--lr-scheduler", "constant")) == 0
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    return crashed


def test_resume_with_other_settings_is_an_error_listing_them(tmp_path, llama, sft_file, capsys):
    crashed = crashed_run(llama, sft_file, tmp_path)
    before = checksums(crashed)
    args = sft_args(llama, sft_file, crashed, "--max-steps", "4", "--save-steps", "2", "--lr-scheduler", "constant",
                    "--resume", "auto")
    assert main(args + ["--learning-rate", "2e-3", "--seed", "1"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {crashed / 'checkpoint-2'} was trained with other settings (seed: 0 -> 1; "
                          "learning_rate: 0.001 -> 0.002); resuming would not continue the same run"), err
    assert "--resume-ignore-config" in err
    assert checksums(crashed) == before  # nothing written for a refused resumption
    # What only changes logging, saving or the length of the run may differ.
    assert main(args + ["--learning-rate", "1e-3", "--logging-steps", "2", "--save-total-limit", "5",
                        "--max-steps", "5"]) == 0
    assert [m["step"] for m in metrics(crashed)] == [4, 5]


def test_resume_ignore_config_continues_with_the_new_settings(tmp_path, llama, sft_file, capsys):
    crashed = crashed_run(llama, sft_file, tmp_path)
    assert main(sft_args(llama, sft_file, crashed, "--max-steps", "4", "--save-steps", "2", "--lr-scheduler",
                         "constant", "--resume", "auto", "--learning-rate", "2e-3", "--resume-ignore-config")) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "with changed settings (learning_rate: 0.001 -> 0.002)" in err
    assert [(m["step"], m["lr"]) for m in metrics(crashed)] == [(3, 2e-3), (4, 2e-3)]


def test_resume_auto_never_retrains_a_finished_run(tmp_path, llama, sft_file, capsys):
    out = tmp_path / "run"
    assert main(sft_args(llama, sft_file, out, "--save-steps", "1")) == 0
    before = checksums(out)
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(sft_args(llama, sft_file, out, "--resume", "auto")) == 0
    assert "holds a finished run (summary.json, adapter): nothing to resume" in capsys.readouterr().err
    assert checksums(out) == before
    # Other settings: the finished run's results would be passed off as theirs.
    with pytest.raises(ConfigError, match=r"finished run trained with other settings \(learning_rate: "):
        sft.train(sft_config(llama, sft_file, out, max_steps=2, batch_size=4, gradient_accumulation_steps=1,
                             resume="auto"))
    assert sft.train(sft_config(llama, sft_file, out, max_steps=2, batch_size=4, gradient_accumulation_steps=1,
                                resume="auto", resume_ignore_config=True)) == summary
    assert checksums(out) == before
    # --overwrite beside --resume auto: trained again, from scratch.
    written = (out / "metrics.jsonl").stat().st_mtime_ns
    assert main(sft_args(llama, sft_file, out, "--resume", "auto", "--overwrite")) == 0
    assert (out / "metrics.jsonl").stat().st_mtime_ns > written
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"]


# ---------------------------------------------------------------------------------------------
# Ctrl-C.


def test_interrupt_tells_the_command_that_continues(tmp_path, llama, sft_file, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "train", interrupted)
    out = tmp_path / "my run"
    assert main(sft_args(llama, sft_file, out, "--overwrite", "--resume=checkpoint-9")) == 130
    err = capsys.readouterr().err.strip()
    again = " ".join(sft_args(llama, sft_file, f"'{out}'"))
    assert err == f"interrupted; continue with: pocketrlhf {again} --resume auto"
    assert resume_command("demo", ["--quick"], None) == "pocketrlhf demo --quick --resume"
    assert resume_command("chat", ["m"], object()) is None
