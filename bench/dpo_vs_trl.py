"""pocketrlhf DPO vs trl's DPOTrainer with peft: same model, same pairs, same LoRA, one run.

    OMP_NUM_THREADS=1 python bench/dpo_vs_trl.py                  # ~20M-parameter llama, 512 pairs x 2 epochs
    OMP_NUM_THREADS=1 python bench/dpo_vs_trl.py --size small     # a few-minute check of the script

What is fixed for every side:
  * the same random-init llama built locally by pocketrlhf.models.tiny (tokenizer trained on the
    review task), fp32 weights on the CPU, the same number of torch threads;
  * the same synthetic preference pairs (pocketrlhf.data.synthetic: chosen = the more positive
    review), the same prompt/answer token ids (both sides tokenize prompt and answers apart);
  * LoRA r=16, alpha=32, dropout 0 on every linear layer but the output head; reference = the
    base with the adapter disabled; sigmoid loss, beta 0.1; AdamW, the same learning rate, linear
    schedule, no warm-up, clipping at 1.0, batch 8, the same number of epochs.

Sides:
  * pocketrlhf with its defaults: the prompt computed once for both answers (one row per pair),
    reference log-probs computed once before training (in length-sorted batches) and reused;
  * trl-defaults: trl's defaults for what the experiment does not fix (gradient checkpointing on,
    bf16 autocast, reference forward in every step);
  * trl-tuned: trl set up as close to pocketrlhf as its options allow (no gradient checkpointing,
    fp32, precompute_ref_log_probs=True). trl always computes entropy, mean logits and top-1
    accuracy in its fused LM head; no setting turns that off;
  * pocketrlhf-bf16: pocketrlhf with ``--dtype bfloat16`` (bf16 base weights, fp32 LoRA), its
    counterpart of trl's bf16-autocast default. Its held-out accuracy is computed on the bf16
    base it was trained on.

Speed: trained pairs (train pairs x epochs) per second of wall time from "model folder and data
file" to "trained adapter in memory": model load, tokenization, the reference pass where there is
one, and every training step. Imports and evaluation are outside the clock. CPU seconds of the
process are reported too (less sensitive to other load on a shared machine).

Quality: the held-out implicit-reward accuracy of each saved adapter (chance: 0.5), computed THE
SAME WAY for all sides by pocketrlhf's evaluation code (stages/loop.evaluate with the DPO loss,
reference = adapters disabled) on the same held-out pairs.

Each side runs in its own child process (fresh interpreter, same environment), one after another;
``--rounds 2`` repeats them in alternating order and keeps each side's best round (the held-out
accuracy reported is the first round's; every round trains the same way).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, SIDES, add_harness_args, chosen_sides, count_parameters, machine, now,  # noqa: E402
                     ratios, run_rounds, run_worker)

sys.path.insert(0, str(ROOT))
SIZES = {
    # ~20M parameters: 9 layers of 512 (MLP 1024, 8 heads, 2 KV heads).
    "full": dict(hidden_size=512, layers=9, heads=8, intermediate_size=1024, train_pairs=512, eval_pairs=128, epochs=2),
    # For checking the script quickly (~9M parameters, 64 pairs, 1 epoch).
    "small": dict(hidden_size=512, layers=4, heads=8, intermediate_size=1024, train_pairs=64, eval_pairs=32, epochs=1),
}
BATCH_SIZE = 8
LORA_R, LORA_ALPHA = 16, 32
BETA = 0.1


def prepare(work: Path, size: str) -> dict:
    from pocketrlhf.data import synthetic
    from pocketrlhf.models.tiny import build_tiny_model

    spec = SIZES[size]
    model = build_tiny_model(work / "model", "llama", texts=synthetic.corpus(), vocab_size=320,
                             hidden_size=spec["hidden_size"], layers=spec["layers"], heads=spec["heads"],
                             intermediate_size=spec["intermediate_size"], seed=0)
    rows = synthetic.preference_rows(spec["train_pairs"] + spec["eval_pairs"], seed=1)
    files = {"model": str(model), "train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl")}
    Path(files["train"]).write_text("".join(json.dumps(r) + "\n" for r in rows[:spec["train_pairs"]]))
    Path(files["eval"]).write_text("".join(json.dumps(r) + "\n" for r in rows[spec["train_pairs"]:]))
    return files


def run_ours(a, files: dict, out: Path, dtype: str) -> dict:
    from pocketrlhf.stages import dpo

    cfg = dpo.DPOConfig(model=files["model"], data=files["train"], eval_fraction=0.0, output_dir=str(out), device="cpu",
                        batch_size=BATCH_SIZE, epochs=a.epochs, learning_rate=a.lr, lr_scheduler="linear",
                        warmup_steps=0, max_grad_norm=1.0, beta=BETA, loss_type="sigmoid", lora_r=LORA_R,
                        lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", progress=False,
                        logging_steps=10 ** 9, dtype=dtype)
    wall, cpu = now()
    summary = dpo.train(cfg)
    wall2, cpu2 = now()
    return {"seconds": wall2 - wall, "cpu_seconds": cpu2 - cpu, "adapter": summary["adapter"], "steps": summary["steps"],
            "dtype": dtype}


def run_trl(a, files: dict, out: Path, setup: str) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from pocketrlhf.models.loading import load_tokenizer

    tuned = dict(gradient_checkpointing=False, bf16=False, precompute_ref_log_probs=True) if setup == "trl-tuned" else {}
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=BATCH_SIZE, num_train_epochs=a.epochs,
                     learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, beta=BETA,
                     loss_type=["sigmoid"], max_length=512, report_to="none", save_strategy="no", eval_strategy="no",
                     logging_steps=10 ** 9, disable_tqdm=True, seed=0, use_cpu=True, dataloader_num_workers=0,
                     **tuned)
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    wall, cpu = now()
    tokenizer = load_tokenizer(files["model"])  # the same pad token (distinct from EOS) as pocketrlhf
    # A fresh datasets cache: trl caches precomputed reference log-probs there and must not reuse them.
    train = load_dataset("json", data_files=files["train"], split="train", cache_dir=str(out / "datasets_cache"))
    trainer = DPOTrainer(model=files["model"], args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    wall2, cpu2 = now()
    trainer.save_model(str(out / "adapter"))
    return {"seconds": wall2 - wall, "cpu_seconds": cpu2 - cpu, "adapter": str(out / "adapter"),
            "steps": trainer.state.global_step}


def held_out_accuracy(files: dict, adapter: str, dtype: str = "auto") -> float:
    """Implicit-reward accuracy on the held-out pairs, reference = adapters disabled."""
    from accelerate import Accelerator

    from pocketrlhf.data.formats import Skipped, preference_pairs
    from pocketrlhf.data.loading import load_records
    from pocketrlhf.models.adapters import AdapterSet, load_adapter
    from pocketrlhf.models.loading import load_base, load_tokenizer
    from pocketrlhf.stages import dpo, loop

    cfg = dpo.DPOConfig(model=files["model"], beta=BETA, batch_size=BATCH_SIZE)
    tok = load_tokenizer(files["model"])
    model = load_adapter(load_base(files["model"], device="cpu", dtype=dtype, training=True), adapter)
    pairs, _ = preference_pairs(load_records(files["eval"]), files["eval"], "plain", tok)
    examples = dpo.tokenize(tok, pairs, cfg.max_length, Skipped())
    logps = dpo.PairLogps(model)
    stage = dpo.DPOLoss(cfg, tok.pad_token_id, logps, AdapterSet(model), None, share_prompt=False)
    return loop.evaluate(logps, stage, examples, BATCH_SIZE, "cpu", Accelerator(cpu=True))["accuracy"]


def import_sides() -> None:
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    from pocketrlhf.stages import dpo  # noqa: F401


def evaluate(files: dict, result: dict) -> dict:
    """After a side's run (outside its clock): the held-out accuracy of the adapter it saved."""
    return {"eval_accuracy": held_out_accuracy(files, result["adapter"], result.get("dtype", "auto"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--epochs", type=int, default=None, help="default: 2 (full), 1 (small)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--json", default="", help="also write the summary to this file")
    add_harness_args(p, "dpo", SIDES)
    a = p.parse_args()
    if a.epochs is None:
        a.epochs = SIZES[a.size]["epochs"]
    if a.worker:
        return run_worker(a, import_sides, run_ours, run_trl, then=evaluate)

    import shutil

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    files = prepare(work, a.size)
    n_params = count_parameters(files["model"])
    spec = SIZES[a.size]
    pairs = spec["train_pairs"] * a.epochs
    print(f"dpo bench: llama {n_params / 1e6:.1f}M params, {spec['train_pairs']} train pairs x {a.epochs} epochs, "
          f"batch {BATCH_SIZE}, {spec['eval_pairs']} held out; {a.threads} torch thread(s); {machine()}", flush=True)
    sides = chosen_sides(a.sides, SIDES)

    def show(r: int, side: str, res: dict) -> None:
        print(f"  round {r + 1} {side:<15} {pairs / res['seconds']:6.2f} pairs/s ({res['seconds']:.1f} s wall, "
              f"{res['cpu_seconds']:.1f} s CPU), held-out accuracy {res['eval_accuracy']:.3f}", flush=True)

    runs = run_rounds(__file__, a, sides, ["--files", json.dumps(files), "--epochs", str(a.epochs), "--lr", str(a.lr)],
                      work, show)
    # Each side's best round, by wall time and (separately) by CPU time.
    wall = {s: min(r["seconds"] for r in runs[s]) for s in sides}
    cpu = {s: min(r["cpu_seconds"] for r in runs[s]) for s in sides}
    rows = {s: {"pairs_per_s": pairs / wall[s], "pairs_per_cpu_s": pairs / cpu[s], "wall_s": wall[s], "cpu_s": cpu[s],
                "eval_accuracy": runs[s][0]["eval_accuracy"], "steps": runs[s][0]["steps"]} for s in sides}
    print(f"\n{'side':<16}{'pairs/s':>9}{'wall s':>9}{'CPU s':>9}{'held-out acc':>14}")
    for s in sides:
        row = rows[s]
        print(f"{s:<16}{row['pairs_per_s']:>9.2f}{row['wall_s']:>9.1f}{row['cpu_s']:>9.1f}{row['eval_accuracy']:>14.3f}")
    speedups = {}
    for name, (faster, faster_cpu) in ratios(rows, ("pairs_per_s", "pairs_per_cpu_s"), joiner=" vs ").items():
        speedups[name] = {"wall": faster, "cpu": faster_cpu}
        print(f"{name}: {faster:.2f}x wall, {faster_cpu:.2f}x CPU")
    summary = {"size": a.size, "params": n_params, "train_pairs": spec["train_pairs"], "epochs": a.epochs,
               "eval_pairs": spec["eval_pairs"], "lr": a.lr, "threads": a.threads, "rounds": a.rounds,
               "machine": machine(), "rows": rows,
               "speedups": speedups}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
