"""The README's main job, in its quick form: every claim of the demo table, and the same numbers twice."""

import json

import pytest

from pocketrlhf.cli import main


@pytest.mark.slow
def test_quick_demo_shows_every_stage_working_and_repeats_exactly(tmp_path, capsys):
    runs = []
    for name in ("first", "second"):
        assert main(["demo", "--quick", "--output-dir", str(tmp_path / name), "--no-progress"]) == 0
        runs.append(json.loads((tmp_path / name / "demo_results.json").read_text()))
    out = capsys.readouterr().out
    assert "pocketrlhf chat" in out and "report.md" in out
    assert runs[0] == runs[1]  # same seed, same numbers
    m = runs[0]["models"]
    assert m["sft"]["eos_fraction"] > m["base"]["eos_fraction"] + 0.2  # SFT learns to answer and stop
    assert m["sft"]["well_formed"] > m["base"]["well_formed"] + 0.2
    assert runs[0]["reward_model_heldout_accuracy"] >= 0.85  # the RM ranks held-out pairs
    assert m["ppo"]["ground_truth"] > m["sft"]["ground_truth"] + 0.3  # PPO raises the ground truth
    assert m["ppo"]["kl_to_sft"] < 10  # with a bounded KL
    assert m["dpo"]["ground_truth"] > m["sft"]["ground_truth"] + 0.2  # DPO does too
    assert m["dpo"]["kl_to_sft"] < 10
    for path in ("report.md", "ppo/plots/score.png", "ppo/adapter/adapter_model.safetensors",
                 "evaluation/evaluation.md"):
        assert (tmp_path / "first" / path).is_file(), path
