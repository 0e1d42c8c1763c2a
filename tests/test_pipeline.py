import json
import shutil

import pytest
import yaml

from pocketrlhf.cli import main
from pocketrlhf.data import synthetic
from pocketrlhf.pipeline import Pipeline, PipelineConfig

from conftest import write_jsonl

GROUND_TRUTH = "pocketrlhf.data.synthetic:sentiment_reward"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_data")
    return {"sft": str(write_jsonl(root / "sft.jsonl", synthetic.sft_rows(300, seed=0))),
            "pairs": str(write_jsonl(root / "pairs.jsonl", synthetic.preference_rows(200, seed=1))),
            "prompts": str(write_jsonl(root / "prompts.jsonl", synthetic.prompt_rows(60, seed=2)))}


def tiny_pipeline(base, data, out, **overrides) -> dict:
    """A whole pipeline in a few short stages (seconds, not a quality run)."""
    quiet = {"progress": False, "logging_steps": 1}
    cfg = dict(
        output_dir=str(out), model=str(base), device="cpu", seed=0, progress=False,
        stages=["sft", "rm", "ppo", "dpo", "eval"],
        sft={"data": data["sft"], "packing": False, "completion_only": True, "seq_length": 48, "batch_size": 8,
             "learning_rate": 3e-3, "max_steps": 6, "save_steps": 3, **quiet},
        rm={"data": data["pairs"], "batch_size": 8, "learning_rate": 3e-3, "max_steps": 4, **quiet},
        ppo={"prompts": data["prompts"], "max_steps": 2, "rollouts_per_step": 8, "batch_size": 4,
             "gradient_accumulation_steps": 1, "max_new_tokens": 8, "ppo_epochs": 1, "eval_fraction": 0, **quiet},
        dpo={"batch_size": 8, "max_steps": 3, **quiet},
        evaluation={"prompts": data["prompts"], "samples": 8, "max_new_tokens": 8, "reward_function": GROUND_TRUTH},
    )
    cfg.update(overrides)
    return cfg


def test_pipeline_runs_every_stage_on_one_base_and_reports(tmp_path, pretrained_llama, data):
    out = tmp_path / "run"
    Pipeline(PipelineConfig(**tiny_pipeline(pretrained_llama, data, out))).run()
    for stage in ("sft", "rm", "ppo", "dpo"):
        assert (out / stage / "summary.json").is_file() and (out / stage / "adapter").is_dir(), stage
        assert (out / stage / "report.md").is_file()
    assert (out / "rm" / "adapter" / "head.safetensors").is_file()
    ppo_cfg = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["sft_adapter"] == str(out / "sft" / "adapter")  # stages are wired together
    assert ppo_cfg["reward_adapter"] == str(out / "rm" / "adapter")
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert set(results) == {"base", "sft", "ppo", "dpo"}
    for row in results.values():
        assert {"reward_model_score", "win_rate_vs_sft", "kl_to_sft", "ground_truth", "eos_fraction"} <= set(row)
    assert results["sft"]["kl_to_sft"] == 0.0 and results["sft"]["win_rate_vs_sft"] == 0.5
    assert "answers side by side" in (out / "evaluation" / "evaluation.md").read_text()
    report = (out / "report.md").read_text()
    assert "## ppo" in report and "## evaluation" in report
    png = out / "ppo" / "plots" / "kl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_rerun_skips_finished_stages_and_resumes_the_interrupted_one(tmp_path, pretrained_llama, data,
                                                                              caplog):
    out = tmp_path / "run"
    cfg = tiny_pipeline(pretrained_llama, data, out, stages=["sft"])
    Pipeline(PipelineConfig(**cfg)).run()
    full_losses = [json.loads(x)["loss"] for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()
                   if json.loads(x)["split"] == "train"]
    # Interrupt: keep only checkpoint-3 of the sft run, as if it died at step 4.
    for p in (out / "sft").iterdir():
        if p.name != "checkpoint-3":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    Pipeline(PipelineConfig(**cfg)).run()
    resumed = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed if r["split"] == "train"] == [4, 5, 6]
    assert [r["loss"] for r in resumed if r["split"] == "train"] == full_losses[3:]
    stamp = (out / "sft" / "summary.json").stat().st_mtime_ns
    import logging

    logging.getLogger("pocketrlhf").addHandler(caplog.handler)
    try:
        Pipeline(PipelineConfig(**cfg)).run()
    finally:
        logging.getLogger("pocketrlhf").removeHandler(caplog.handler)
    assert "sft already finished" in caplog.text
    assert (out / "sft" / "summary.json").stat().st_mtime_ns == stamp


def test_same_seed_same_numbers(tmp_path, pretrained_llama, data):
    stages = ["sft", "rm", "ppo", "eval"]
    for name in ("a", "b"):
        Pipeline(PipelineConfig(**tiny_pipeline(pretrained_llama, data, tmp_path / name, stages=stages))).run()
    a = json.loads((tmp_path / "a" / "evaluation" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "evaluation" / "results.json").read_text())
    assert a == b


def test_pipeline_cli_and_config_errors(tmp_path, pretrained_llama, data, capsys):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"model": str(pretrained_llama), "stages": ["sft"],
                                        "sft": {"data": data["sft"], "lerning_rate": 1e-3}}))
    assert main(["pipeline", str(run_yaml), "--output-dir", str(tmp_path / "out")]) == 2
    assert "run.yaml: sft: unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in capsys.readouterr().err
    run_yaml.write_text(yaml.safe_dump({"model": str(pretrained_llama), "stages": ["sft", "kto"]}))
    assert main(["pipeline", str(run_yaml)]) == 2
    assert "unknown stage 'kto'" in capsys.readouterr().err
    run_yaml.write_text(yaml.safe_dump({"stages": ["sft"]}))
    assert main(["pipeline", str(run_yaml)]) == 2
    assert "`model:` (the base model directory) is required" in capsys.readouterr().err
    run_yaml.write_text(yaml.safe_dump({"model": str(pretrained_llama), "stages": ["data", "sft"]}))
    assert main(["pipeline", str(run_yaml)]) == 2
    assert "the data stage needs `stackexchange:`" in capsys.readouterr().err


def test_report_command(tmp_path, llama, sft_file, capsys):
    from pocketrlhf.stages import sft

    sft.train(sft.SFTConfig(model=str(llama), data=str(sft_file), output_dir=str(tmp_path / "run"), device="cpu",
                            max_steps=3, batch_size=4, packing=False, progress=False))
    (tmp_path / "run" / "report.md").unlink()
    assert main(["report", str(tmp_path / "run")]) == 0
    text = (tmp_path / "run" / "report.md").read_text()
    assert "| loss |" in text and "plots/loss.png" in text
    assert (tmp_path / "run" / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_pipeline_grpo_stage_is_wired_and_evaluated(tmp_path, pretrained_llama, data):
    out = tmp_path / "run"
    cfg = tiny_pipeline(pretrained_llama, data, out, stages=["sft", "rm", "grpo", "eval"],
                        grpo={"prompts": data["prompts"], "max_steps": 2, "prompts_per_step": 2, "num_generations": 4,
                              "max_new_tokens": 8, "eval_fraction": 0, "reward_function": [GROUND_TRUTH],
                              "progress": False})
    Pipeline(PipelineConfig(**cfg)).run()
    grpo_cfg = yaml.safe_load((out / "grpo" / "config.yaml").read_text())
    assert grpo_cfg["sft_adapter"] == str(out / "sft" / "adapter")
    assert grpo_cfg["reward_adapter"] == ""  # a rule reward was given: the rm stage's adapter is not mixed in
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert set(results) == {"base", "sft", "grpo"}
    assert results["grpo"]["kl_to_sft"] != 0.0  # trained away from the SFT copy (8 samples: the estimate may be < 0)
    assert "## grpo" in (out / "report.md").read_text()
