"""``pocketrlhf demo``: the whole pipeline on a built-in task with a tiny model built locally.

The task mirrors the seeds' classic RLHF example (write positive movie reviews). A tiny base model
is created from a config and briefly pretrained on unlabelled reviews, then the real pipeline runs:
SFT on noisy demonstrations (every sentiment) -> a reward model on preference pairs -> PPO with that
reward model -> DPO on the same pairs -> evaluation. The ground truth is a fixed sentiment lexicon
(pocketrlhf.data.synthetic), independent of the learned reward model. No network, no GPU.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Literal

from pocketrlhf.algorithms.stats import describe_accuracy
from pocketrlhf.config import option
from pocketrlhf.data import synthetic
from pocketrlhf.errors import ConfigError
from pocketrlhf.folders import refuse_foreign, write_marker
from pocketrlhf.logs import log, setup_logging

GROUND_TRUTH = "pocketrlhf.data.synthetic:sentiment_reward"
# What the demo writes at the top of its folder: starting over removes these, and nothing else.
OUTPUTS = ("base", "data", "sft", "rm", "ppo", "dpo", "evaluation", "report.md", "pipeline.yaml", "demo_results.json")


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = option("runs/demo", "the demo's folder (model, data, every stage's run, report)")
    arch: Literal["llama", "mistral", "qwen2", "gpt_neox", "gpt2"] = option("llama", "tiny model architecture")
    quantization: Literal["none", "8bit", "4bit"] = option("none", "base precision for every stage")
    seed: int = option(0, "seed of the model, the data and every stage")
    quick: bool = option(False, "a shorter run (fewer steps): a smoke test, weaker results")
    resume: bool = option(False, "continue an interrupted demo instead of starting over")
    progress: bool = option(True, "progress bars")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build_base(cfg: DemoConfig, root: Path) -> Path:
    from pocketrlhf.models.tiny import build_tiny_model, pretrain_tiny_model

    base = root / "base"
    if not (base / "model.safetensors").is_file():
        log.info("demo: building a tiny %s and pretraining it on unlabelled reviews", cfg.arch)
        build_tiny_model(base, cfg.arch, texts=synthetic.corpus(), vocab_size=320, seed=cfg.seed)
        pretrain_tiny_model(base, synthetic.pretraining_texts(seed=cfg.seed + 3), steps=100 if cfg.quick else 200,
                            seed=cfg.seed)
    return base


def pipeline_config(cfg: DemoConfig, root: Path, base: Path):
    from pocketrlhf.pipeline import PipelineConfig

    scale = 0.5 if cfg.quick else 1.0
    data = root / "data"
    sft_data = write_jsonl(data / "sft.jsonl", synthetic.sft_rows(1500, seed=cfg.seed))
    pairs = write_jsonl(data / "pairs.jsonl", synthetic.preference_rows(800, seed=cfg.seed + 1))
    prompts = write_jsonl(data / "prompts.jsonl", synthetic.prompt_rows(400, seed=cfg.seed + 2))
    held_out = write_jsonl(data / "eval_prompts.jsonl", synthetic.prompt_rows(64, seed=cfg.seed + 4))
    common_opts = {"progress": cfg.progress, "logging_steps": 5}
    return PipelineConfig(
        output_dir=str(root), model=str(base), quantization=cfg.quantization, device="cpu", seed=cfg.seed,
        progress=cfg.progress, stages=["sft", "rm", "ppo", "dpo", "eval"],
        sft={"data": sft_data, "packing": False, "completion_only": True, "seq_length": 64, "batch_size": 16,
             "learning_rate": 2e-3, "max_steps": int(400 * scale), "lora_r": 16, "warmup_steps": 10, **common_opts},
        rm={"data": pairs, "batch_size": 16, "learning_rate": 2e-3, "max_steps": int(80 * scale), "eval_fraction": 0.2,
            **common_opts},
        ppo={"prompts": prompts, "max_steps": int(40 * scale), "learning_rate": 2e-4, "rollouts_per_step": 32,
             "batch_size": 8, "gradient_accumulation_steps": 2, "max_new_tokens": 32, "kl_coef": 0.1,
             "adaptive_kl": True, "kl_target": 4.0, "kl_horizon": 1000, "lr_scheduler": "constant",
             "eval_fraction": 0.1, "save_steps": 10, "logging_steps": 1, "progress": cfg.progress},
        dpo={"batch_size": 16, "learning_rate": 2e-4, "max_steps": int(100 * scale), "beta": 0.5, "eval_fraction": 0.2,
             **common_opts},
        evaluation={"prompts": held_out, "samples": 64, "max_new_tokens": 32, "reward_function": GROUND_TRUTH},
    )


def well_formed_fraction(samples_path: Path, model: str) -> float:
    rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
    return sum(synthetic.well_formed(r[model].strip()) for r in rows) / len(rows)


def results_table(root: Path) -> tuple[str, dict]:
    evaluation = json.loads((root / "evaluation" / "results.json").read_text())
    rm_summary = json.loads((root / "rm" / "summary.json").read_text())
    samples = root / "evaluation" / "samples.jsonl"
    rows = {name: {**r, "well_formed": well_formed_fraction(samples, name)} for name, r in evaluation.items()}
    numbers = {"reward_model_heldout_accuracy": rm_summary.get("eval_accuracy"),
               "reward_model_heldout_pairs": rm_summary.get("eval_accuracy_n"),
               "reward_model_heldout_ci95": rm_summary.get("eval_accuracy_ci95"), "models": rows}
    lines = [f"{'model':<6} {'well-formed':>11} {'ends (EOS)':>10} {'sentiment*':>10} {'RM score':>9} "
             f"{'win vs SFT':>10} {'KL to SFT':>9}"]
    for name, r in rows.items():
        lines.append(f"{name:<6} {r['well_formed']:>11.2f} {r['eos_fraction']:>10.2f} {r['ground_truth']:>10.3f} "
                     f"{r['reward_model_score']:>9.2f} {r['win_rate_vs_sft']:>10.2f} {r['kl_to_sft']:>9.2f}")
    lines.append(f"\nreward model: held-out pair accuracy "
                 f"{describe_accuracy(rm_summary.get('eval_accuracy'), rm_summary.get('eval_accuracy_n'))} "
                 f"on prompts it never trained on")
    lines.append(f"models answered {next(iter(rows.values()))['prompts']} held-out prompts each")
    lines.append("* ground truth: a fixed sentiment lexicon in [-1, 1], independent of the learned reward model")
    return "\n".join(lines), numbers


def prepare_folder(root: Path, resume: bool) -> None:
    """An empty or new folder, or one a previous demo made (its marker): starting over removes that
    demo's outputs (a second run with the same seed gives the same numbers) and keeps anything else."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--output-dir {root} is a file, not a folder")
    entries = sorted(root.iterdir()) if root.is_dir() else []
    refuse_foreign(root, entries, "write into it" if resume else "delete them", command="demo")
    if not resume:
        for p in (root / name for name in OUTPUTS):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    write_marker(root, "demo")


def run(cfg: DemoConfig) -> dict:
    from pocketrlhf.pipeline import Pipeline

    setup_logging()
    started = time.time()
    root = Path(cfg.output_dir)
    prepare_folder(root, cfg.resume)
    base = build_base(cfg, root)
    Pipeline(pipeline_config(cfg, root, base), source="demo").run()
    table, numbers = results_table(root)
    (root / "demo_results.json").write_text(json.dumps(numbers, indent=2))
    print("\n" + table)
    print(f"\nfinished in {time.time() - started:.0f} s")
    print(f"report and plots:  {root / 'report.md'} (and {root}/*/plots/*.png)")
    print(f"answers side by side: {root / 'evaluation' / 'evaluation.md'}")
    print(f"adapters:          {root}/sft/adapter, {root}/rm/adapter, {root}/ppo/adapter, {root}/dpo/adapter")
    print(f"chat with the PPO policy:  pocketrlhf chat {root / 'ppo' / 'adapter'}")
    return numbers
