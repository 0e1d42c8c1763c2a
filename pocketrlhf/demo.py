"""``pocketrlhf demo``: the pipeline on the built-in review task with a tiny model built locally.

No network, no GPU: a tiny model and tokenizer are created from configs, then trained by the same
code a user runs on a real model. Measured against the task's ground-truth sentiment lexicon.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from pocketrlhf.config import option
from pocketrlhf.data import synthetic
from pocketrlhf.stages import common
from pocketrlhf.stages.common import log


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = option("runs/demo", "where the demo writes its model, data, runs and report")
    arch: str = option("llama", "tiny architecture: llama, mistral, qwen2, gpt_neox or gpt2")
    quantization: str = option("none", "base precision for every stage: none, 8bit or 4bit")
    seed: int = option(0, "seed for the model, the data and training")
    sft_steps: int = option(150, "SFT optimizer steps")
    samples: int = option(64, "generations per model for the evaluation table")
    progress: bool = option(True, "show progress bars")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_assets(cfg: DemoConfig) -> tuple[Path, dict[str, Path]]:
    from pocketrlhf.models.tiny import build_tiny_model

    root = Path(cfg.output_dir)
    base = root / "base"
    if not (base / "config.json").is_file():
        build_tiny_model(base, cfg.arch, texts=synthetic.corpus(), vocab_size=384, hidden_size=128, layers=2,
                         heads=4, seed=cfg.seed)
    data = {
        "sft": write_jsonl(root / "data" / "sft.jsonl", synthetic.sft_rows(2000, seed=cfg.seed)),
        "pairs": write_jsonl(root / "data" / "pairs.jsonl", synthetic.preference_rows(1200, seed=cfg.seed + 1)),
        "prompts": write_jsonl(root / "data" / "prompts.jsonl", synthetic.prompt_rows(512, seed=cfg.seed + 2)),
    }
    return base, data


def evaluate_policy(base: Path, adapter: Path | None, quantization: str, n: int, seed: int) -> dict:
    """Sample ``n`` reviews and score them with the ground-truth lexicon."""
    from pocketrlhf.models.adapters import load_adapter
    from pocketrlhf.models.generation import sample
    from pocketrlhf.models.loading import load_base, load_tokenizer

    tok = load_tokenizer(str(base))
    model = load_base(str(base), quantization=quantization, device="cpu", training=False)
    if adapter is not None:
        model = load_adapter(model, adapter)
    rng = random.Random(seed)
    prompts = [synthetic.prompt_for(rng) for _ in range(n)]
    common.set_seed(seed)
    outs = sample(model, tok, [tok(p)["input_ids"] for p in prompts], max_new_tokens=32, temperature=1.0)
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    ended = sum(bool(o) and o[-1] == tok.eos_token_id for o in outs)
    return {
        "score": sum(synthetic.sentiment_score(t) for t in texts) / n,
        "well_formed": sum(synthetic.well_formed(t.strip()) for t in texts) / n,
        "stops": ended / n,
        "example": f"{prompts[0]} -> {texts[0].strip()}",
    }


def run(cfg: DemoConfig) -> dict:
    from pocketrlhf.stages import sft

    common.setup_logging()
    base, data = build_assets(cfg)
    root = Path(cfg.output_dir)
    sft_cfg = sft.SFTConfig(model=str(base), data=str(data["sft"]), output_dir=str(root / "sft"),
                            quantization=cfg.quantization, device="cpu", packing=False, completion_only=True,
                            seq_length=64, batch_size=16, learning_rate=2e-3, max_steps=cfg.sft_steps,
                            warmup_steps=10, lora_r=16, lora_alpha=32, seed=cfg.seed, progress=cfg.progress,
                            logging_steps=10)
    sft_summary = sft.train(sft_cfg)
    rows = {
        "base": evaluate_policy(base, None, cfg.quantization, cfg.samples, cfg.seed),
        "sft": evaluate_policy(base, Path(sft_summary["adapter"]), cfg.quantization, cfg.samples, cfg.seed),
    }
    print()
    print(f"{'model':<8}{'well-formed':>13}{'stops (EOS)':>13}{'sentiment':>11}")
    for name, r in rows.items():
        print(f"{name:<8}{r['well_formed']:>13.2f}{r['stops']:>13.2f}{r['score']:>11.3f}")
    print(f"\nexample (sft): {rows['sft']['example']}")
    print(f"\nadapter: {sft_summary['adapter']}\nmetrics: {root / 'sft' / 'metrics.jsonl'}")
    (root / "results.json").write_text(json.dumps({"sft": sft_summary, "eval": rows}, indent=2, default=str))
    log.info("demo finished: results in %s", root / "results.json")
    return rows
