"""pocketrlhf `rm` vs trl's RewardTrainer with peft: same model, same pairs, same LoRA, one run.

    OMP_NUM_THREADS=1 python bench/rm_vs_trl.py --rounds 2          # ~20M-parameter llama, 512 pairs x 2 epochs
    OMP_NUM_THREADS=1 python bench/rm_vs_trl.py --size small        # a few-minute check of the script

Fixed for every side:
  * the same llama built locally by pocketrlhf.models.tiny (tokenizer trained on the review task;
    ``--pretrain-steps N`` first trains all its weights on unlabelled reviews), fp32 weights on the
    CPU, the same number of torch threads;
  * the same synthetic preference pairs (pocketrlhf.data.synthetic.preference_rows: chosen = the
    more positive review) and THE SAME TOKEN IDS: both sides get ``prompt + answer + EOS`` as
    pocketrlhf tokenizes it (trl receives them pre-tokenized as chosen_ids/rejected_ids, a
    documented input of RewardTrainer; its tokenization is inside its clock too);
  * LoRA r=16, alpha=32, dropout 0 on q/k/v/o/gate/up/down; a trained scalar head on the last
    hidden state of each sequence's last real token (the EOS: pad is a separate token, and both
    sides read the reward there); loss -log sigmoid(r_chosen - r_rejected), no margin, no reward
    centering; AdamW, the same learning rate, linear decay, no warm-up, clipping at 1.0, batch 8
    pairs (chosen and rejected in one padded batch of 16 rows on both sides), the same epochs.

Sides:
  * pocketrlhf with its defaults (dropout off, no gradient checkpointing, fp32 on the CPU); its
    end-to-end time includes what ``rm.train`` always does after training: the reward statistics
    pass (forward over 256 pairs) and saving adapter + head;
  * trl-defaults: RewardTrainer with trl 1.16's defaults for what the experiment does not fix:
    gradient_checkpointing=True, bf16=True (autocast on the CPU), disable_dropout=True,
    center_rewards_coefficient=None, max_length=1024 (filters longer pairs: none here),
    pad_to_multiple_of=None on CPU; optim adamw_torch_fused (transformers' default);
  * trl-tuned: the same with gradient_checkpointing=False and bf16=False (fp32), i.e. the same
    arithmetic as pocketrlhf. RewardTrainer has no padding-free mode; nothing else differs;
  * pocketrlhf-bf16: pocketrlhf with ``--dtype bfloat16`` (bf16 base weights, fp32 LoRA and head),
    its counterpart of trl's bf16 default (on CPUs with AMX/AVX512-BF16, bf16 matmuls are much
    faster than fp32). Its held-out accuracy is computed on the bf16 base it was trained on.

Speed: trained pairs per second, (a) end to end, from "model folder + data file" to "trained
adapter" (model load, tokenization, every step; imports and evaluation outside the clock) and (b)
steady state, between the ends of optimizer steps after ``--timing-skip`` warm-up steps. Both in
wall time and in CPU seconds of the process (the steadier measure on a shared machine).

Quality: held-out accuracy (chosen scored above rejected; chance 0.5) on the same held-out pairs,
computed by ONE function from each side's scores on the same padded batches: pocketrlhf's saved
adapter + head reloaded on the base, trl's trained model in memory (fp32, eval mode).

``--rounds 2`` repeats every side in alternating order; the best round of each side is reported
(the accuracy of its first round: every round trains identically).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SIDES, add_harness_args, chosen_sides, count_parameters, machine, now,  # noqa: E402
                     print_settings, ratios, review_llama, run_rounds, run_worker, save_summary, steady_rate)

SIZES = {
    # ~20M parameters: 9 layers of 512 (MLP 1024, 8 heads, 2 KV heads), vocabulary 320.
    "full": dict(hidden_size=512, layers=9, heads=8, intermediate_size=1024, train_pairs=512, eval_pairs=256, epochs=2),
    # A quick check of the script (~9M parameters).
    "small": dict(hidden_size=512, layers=4, heads=8, intermediate_size=1024, train_pairs=128, eval_pairs=128, epochs=1),
}
TRL_SETUPS = {"trl-defaults": {}, "trl-tuned": dict(gradient_checkpointing=False, bf16=False)}
BATCH_PAIRS = 8
LORA_R, LORA_ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LENGTH = 512


def prepare(work: Path, size: str, pretrain_steps: int) -> dict:
    from pocketrlhf.data import synthetic

    spec = SIZES[size]
    model = review_llama(work / f"llama-{size}-pt{pretrain_steps}", spec["hidden_size"], spec["layers"], spec["heads"],
                         spec["intermediate_size"], pretrain_steps)
    rows = synthetic.preference_rows(spec["train_pairs"] + spec["eval_pairs"], seed=1)
    data = work / f"data-{size}"
    data.mkdir(parents=True, exist_ok=True)
    files = {"model": str(model), "train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")}
    Path(files["train"]).write_text("".join(json.dumps(r) + "\n" for r in rows[:spec["train_pairs"]]))
    Path(files["eval"]).write_text("".join(json.dumps(r) + "\n" for r in rows[spec["train_pairs"]:]))
    return files


def tokenized_pairs(tokenizer, path: str):
    """pocketrlhf's tokenization of a pairs file (prompt, chosen + EOS, rejected + EOS)."""
    from pocketrlhf.data.formats import preference_pairs
    from pocketrlhf.data.loading import load_records
    from pocketrlhf.data.tokenize import tokenize_preferences

    pairs, skipped = preference_pairs(load_records(path), path, "plain", tokenizer)
    return tokenize_preferences(tokenizer, pairs, MAX_LENGTH, skipped)


def held_out_accuracy(score, examples, pad_id: int) -> float:
    """Fraction of pairs whose chosen answer scores higher; ``score(input_ids, attention_mask) -> [rows]``."""
    import torch

    from pocketrlhf.data.tokenize import collate_preferences

    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), BATCH_PAIRS):
            batch = collate_preferences(examples[start:start + BATCH_PAIRS], pad_id)
            chosen, rejected = score(batch["input_ids"], batch["attention_mask"]).float().chunk(2)
            correct += int((chosen > rejected).sum())
    return correct / len(examples)


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process).


def run_ours(a, files: dict, out: Path, dtype: str = "auto") -> dict:
    from pocketrlhf.models.loading import load_base, load_tokenizer
    from pocketrlhf.models.roles import load_reward_adapter
    from pocketrlhf.stages import common, rm

    cfg = rm.RMConfig(model=files["model"], dtype=dtype, data=files["train"], eval_fraction=0.0, output_dir=str(out / "run"),
                      device="cpu", batch_size=BATCH_PAIRS, epochs=a.epochs, learning_rate=a.lr, lr_scheduler="linear",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                      lora_dropout=0.0, target_modules=",".join(TARGETS), max_length=MAX_LENGTH, progress=False,
                      logging_steps=1, seed=0)
    ends: list[tuple[float, float]] = []
    log = common.Run.log

    def clocked_log(self, step, metrics, split="train"):  # the loop logs each step right after optimizer.step()
        if split == "train":
            ends.append(now())
        return log(self, step, metrics, split)

    common.Run.log = clocked_log
    wall, cpu = now()
    start = (wall, cpu)
    summary = rm.train(cfg)
    wall2, cpu2 = now()
    common.Run.log = log

    tok = load_tokenizer(files["model"])
    model, scorer = load_reward_adapter(load_base(files["model"], device="cpu", dtype=dtype, training=False),
                                        summary["adapter"])
    model.eval()
    accuracy = held_out_accuracy(scorer, tokenized_pairs(tok, files["eval"]), tok.pad_token_id)
    return {"wall_s": wall2 - wall, "cpu_s": cpu2 - cpu, "start": start, "end": (wall2, cpu2), "ends": ends, "steps": summary["steps"],
            "pairs": summary["train_pairs"], "eval_accuracy": accuracy, "train_loss": summary["train_loss"]}


def run_trl(a, files: dict, out: Path, setup: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from pocketrlhf.models.loading import load_tokenizer

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(now())

    clock = Clock()
    args = RewardConfig(output_dir=str(out / "run"), per_device_train_batch_size=BATCH_PAIRS, num_train_epochs=a.epochs,
                        learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                        max_grad_norm=1.0, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
                        seed=0, use_cpu=True, dataloader_num_workers=0, **TRL_SETUPS[setup])
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="SEQ_CLS")
    wall, cpu = now()
    start = (wall, cpu)
    tok = load_tokenizer(files["model"])  # the same pad token (distinct from EOS) as pocketrlhf
    rows = [{"chosen_ids": e.prompt_ids + e.chosen_ids, "rejected_ids": e.prompt_ids + e.rejected_ids}
            for e in tokenized_pairs(tok, files["train"])]
    trainer = RewardTrainer(model=files["model"], args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tok, peft_config=peft_config, callbacks=[clock])
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    wall2, cpu2 = now()

    model = trainer.model.eval()
    accuracy = held_out_accuracy(lambda ids, attn: model(input_ids=ids, attention_mask=attn).logits.squeeze(-1),
                                 tokenized_pairs(tok, files["eval"]), tok.pad_token_id)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    settings = {k: getattr(args, k) for k in ("gradient_checkpointing", "bf16", "disable_dropout", "max_length",
                                             "center_rewards_coefficient", "pad_to_multiple_of", "optim")}
    settings["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    settings["dtype"] = str(next(model.parameters()).dtype)
    return {"wall_s": wall2 - wall, "cpu_s": cpu2 - cpu, "start": start, "end": (wall2, cpu2), "ends": clock.ends,
            "steps": trainer.state.global_step,
            "pairs": len(rows), "eval_accuracy": accuracy, "train_loss": losses[-1] if losses else None,
            "settings": settings}


def import_sides() -> None:
    from trl import RewardConfig, RewardTrainer  # noqa: F401

    from pocketrlhf.stages import rm  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Driver.


def summarize(runs: list[dict], skip: int) -> dict:
    """Best round by wall and (separately) by CPU time, end to end and in steady state."""
    pairs_per_step = BATCH_PAIRS
    steady = [steady_rate(r["ends"], [pairs_per_step] * len(r["ends"]), skip) for r in runs]
    return {
        "e2e_pairs_per_s": max(r["pairs"] * r["epochs"] / r["wall_s"] for r in runs),
        "e2e_pairs_per_cpu_s": max(r["pairs"] * r["epochs"] / r["cpu_s"] for r in runs),
        "e2e_wall_s": min(r["wall_s"] for r in runs), "e2e_cpu_s": min(r["cpu_s"] for r in runs),
        "steady_pairs_per_s": max(s["per_s"] for s in steady),
        "steady_pairs_per_cpu_s": max(s["per_cpu_s"] for s in steady),
        "eval_accuracy": runs[0]["eval_accuracy"], "steps": runs[0]["steps"], "train_loss": runs[0]["train_loss"],
        "max_rss_mb": max(r["max_rss_mb"] for r in runs), "settings": runs[0].get("settings"),
        # Wall seconds from the clock's start to the end of the first step, and after the last step
        # (pocketrlhf: reward statistics pass, saving, run report; trl: saving), best round.
        "to_first_step_end_s": min(r["ends"][0][0] - r["start"][0] for r in runs),
        "after_last_step_s": min(r["end"][0] - r["ends"][-1][0] for r in runs),
        "each_round_steady_pairs_per_s": [round(s["per_s"], 2) for s in steady],
        "each_round_steady_pairs_per_cpu_s": [round(s["per_cpu_s"], 2) for s in steady],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--epochs", type=int, default=None, help="default: 2 (full), 1 (small)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pretrain-steps", type=int, default=0, help="full-weight LM pretraining of the base on reviews")
    add_harness_args(p, "rm_vs_trl", SIDES, timing_skip=2)
    a = p.parse_args()
    if a.epochs is None:
        a.epochs = SIZES[a.size]["epochs"]
    if a.worker:
        return run_worker(a, import_sides, run_ours, run_trl)

    work = Path(a.work)
    files = prepare(work, a.size, a.pretrain_steps)
    spec = SIZES[a.size]
    n_params = count_parameters(files["model"])
    print(f"[bench] rm: llama {n_params / 1e6:.1f}M params (pretrain steps {a.pretrain_steps}), {spec['train_pairs']} "
          f"train pairs x {a.epochs} epochs, batch {BATCH_PAIRS} pairs, {spec['eval_pairs']} held out; lr {a.lr}; "
          f"{a.threads} torch thread(s); {machine()}", flush=True)
    sides = chosen_sides(a.sides, SIDES)

    def show(r: int, side: str, res: dict) -> None:
        res["epochs"] = a.epochs
        print(f"  round {r + 1} {side:<13} {res['pairs'] * a.epochs / res['wall_s']:6.2f} pairs/s end to end "
              f"({res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU), held-out accuracy "
              f"{res['eval_accuracy']:.3f}", flush=True)

    runs = run_rounds(__file__, a, sides, ["--files", json.dumps(files), "--epochs", str(a.epochs), "--lr", str(a.lr)],
                      work / f"run-{a.size}", show)
    rows = {s: summarize(runs[s], a.timing_skip) for s in sides}
    print("\n| side | pairs/s steady (wall) | pairs per CPU-s steady | pairs/s end-to-end (wall) | "
          "pairs per CPU-s end-to-end | end-to-end wall s / CPU s | held-out accuracy | max RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for s in sides:
        row = rows[s]
        print(f"| {s} | {row['steady_pairs_per_s']:.2f} | {row['steady_pairs_per_cpu_s']:.2f} | "
              f"{row['e2e_pairs_per_s']:.2f} | {row['e2e_pairs_per_cpu_s']:.2f} | {row['e2e_wall_s']:.1f} / "
              f"{row['e2e_cpu_s']:.1f} | {row['eval_accuracy']:.3f} | {row['max_rss_mb']:.0f} |")
    print("\nratios of pairs/s: steady state (wall / CPU); end to end (wall / CPU):")
    versus = ratios(rows, ("steady_pairs_per_s", "steady_pairs_per_cpu_s", "e2e_pairs_per_s", "e2e_pairs_per_cpu_s"))
    for name, r in versus.items():
        print(f"  {name}: {r[0]:.2f}x / {r[1]:.2f}x; {r[2]:.2f}x / {r[3]:.2f}x")
    for s in sides:
        print(f"{s}: {rows[s]['to_first_step_end_s']:.1f} s wall to the end of the first step, "
              f"{rows[s]['after_last_step_s']:.1f} s after the last step")
    print_settings(rows)
    save_summary(work / f"results-{a.size}.json",
                 {"size": a.size, "params": n_params, "pretrain_steps": a.pretrain_steps, "epochs": a.epochs,
                  "lr": a.lr, "train_pairs": spec["train_pairs"], "eval_pairs": spec["eval_pairs"],
                  "threads": a.threads, "rounds": a.rounds, "machine": machine(),
                  "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "ratios": versus})

if __name__ == "__main__":
    main()
