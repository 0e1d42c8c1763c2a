"""Optimizers on the same SFT run: steps to a target loss and seconds per step, one run.

    OMP_NUM_THREADS=1 python bench/optimizers.py                  # every optimizer, ~5 minutes on 1 CPU thread
    OMP_NUM_THREADS=1 python bench/optimizers.py --steps 20 --optimizers adamw,sophia   # a quick check

Every optimizer trains the same LoRA (r=16 on every linear layer) of the same locally built llama
(random init, bench/_common.review_llama) on the same synthetic SFT rows, in the same order, with
the same seed, schedule (cosine, 5 warm-up steps), batch and clipping; only ``--optimizer`` and its
learning rate differ. Learning rates: AdamW's for every Adam-like optimizer and for SophiaH (whose
update is clipped at lr per element, like Adam's); Lion at a third of it (its sign updates are
larger: the Lion paper's advice is 3-10x smaller); both can be changed with --lr and --lion-lr.

paged_adamw_8bit pages its state through CUDA unified memory: on a machine without a GPU pocketrlhf
runs adamw_8bit instead (it says so), and so does this row.

Measured, from each run's metrics.jsonl:
  * steps to target: the first step at which the train loss averaged over the last 5 steps is at or
    below a target; two targets by default: AdamW's own 5-step average half-way and at its last
    step (so AdamW takes --steps/2 and --steps, a faster optimizer fewer); --target sets one instead;
    "-" when never reached;
  * seconds per step: wall time between logged steps after --skip warm-up steps, median (a typical
    step) and mean (SophiaH's Hessian steps, one in 10, included);
  * the optimizer's own step (optimizer.step(), median milliseconds): what the optimizer adds to a
    step, steady where the wall time per step moves with the machine's load;
  * the final 5-step train loss and the held-out loss of the saved adapter.

Each optimizer runs in its own child process (fresh interpreter, same threads), one after another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, add_harness_args, chosen_sides, machine, markdown_table, review_llama, run_child,  # noqa: E402
                     save_summary, start_worker, write_result)

OPTIMIZERS = ("adamw", "paged_adamw_8bit", "sophia", "lion", "adafactor", "schedulefree_adamw", "adam_mini")
MODEL = dict(hidden_size=256, layers=4, heads=4, intermediate_size=768)
WINDOW = 5


def smoothed(losses: list[float], window: int = WINDOW) -> list[float]:
    return [statistics.fmean(losses[max(0, i + 1 - window):i + 1]) for i in range(len(losses))]


def worker(a: argparse.Namespace) -> None:
    files, out = start_worker(a, lambda: __import__("pytorch_optimizer"))
    from pocketrlhf.stages import common, sft

    # The optimizer's own step (SophiaH's Hutchinson product included), timed apart from the rest.
    step_times: list[float] = []
    build = common.build_optimizer

    def timed_optimizer(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        inner = optimizer.step

        def step(self, *a, **k):
            start = time.perf_counter()
            out = inner(*a, **k)
            step_times.append(time.perf_counter() - start)
            return out

        optimizer.step = types.MethodType(step, optimizer)  # a bound method, as the LR scheduler expects
        return optimizer

    common.build_optimizer = timed_optimizer
    name = a.worker
    lr = a.lion_lr if name == "lion" else a.lr
    cfg = sft.SFTConfig(model=files["model"], data=files["data"], output_dir=str(out / "run"), device="cpu",
                        packing=False, completion_only=True, seq_length=64, batch_size=8, learning_rate=lr,
                        max_steps=a.steps, warmup_steps=5, lr_scheduler="cosine", lora_r=16, lora_alpha=32,
                        logging_steps=1, progress=False, seed=a.seed, optimizer=name, eval_fraction=0.1,
                        quantization=a.quantization, overwrite=True)
    summary = sft.train(cfg)
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    times = [r["time"] for r in train]
    gaps = [b - t for t, b in zip(times[a.skip:], times[a.skip + 1:])]
    write_result(out, {"optimizer": name, "lr": lr, "losses": [r["loss"] for r in train],
                       "s_per_step_median": statistics.median(gaps), "s_per_step_mean": statistics.fmean(gaps),
                       "optimizer_step_ms": 1000 * statistics.median(step_times[a.skip:]),
                       "eval_loss": summary.get("eval_loss")})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_harness_args(p, "optimizers", OPTIMIZERS, sides_flag="--optimizers", rounds_kept=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the time per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lion-lr", type=float, default=2e-3 / 3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    p.add_argument("--target", type=float, default=0.0,
                   help="target train loss (0: AdamW's 5-step average half-way and at the end)")
    a = p.parse_args()
    if a.worker:
        return worker(a)

    from pocketrlhf.data import synthetic

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = review_llama(work / "model", **MODEL)
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic.sft_rows(1200, seed=0)))
    names = chosen_sides(a.optimizers, OPTIMIZERS)
    files = json.dumps({"model": str(model), "data": str(data)})
    args = ["--files", files, "--steps", str(a.steps), "--skip", str(a.skip), "--lr", str(a.lr), "--lion-lr",
            str(a.lion_lr), "--seed", str(a.seed), "--quantization", a.quantization]
    results = {n: run_child(__file__, n, args, work / n, a.threads) for n in names}

    adamw = smoothed(results["adamw"]["losses"]) if "adamw" in results else []
    targets = [a.target] if a.target else ([adamw[len(adamw) // 2 - 1], adamw[-1]] if adamw else [])
    rows = []
    for n, r in results.items():
        curve = smoothed(r["losses"])
        reached = [next((i + 1 for i, v in enumerate(curve) if v <= t), None) for t in targets]
        r.update(steps_to_target=dict(zip(map(str, targets), reached)), final_loss=curve[-1])
        rows.append([n, r["lr"], *["-" if k is None else k for k in reached], r["s_per_step_median"],
                     r["s_per_step_mean"], r["optimizer_step_ms"], curve[-1], r["eval_loss"]])
    print(f"\nmachine: {machine()}; torch threads {a.threads}; {a.steps} steps; base {a.quantization}; "
          f"target losses (5-step average) {', '.join(f'{t:.3f}' for t in targets)}\n")
    print(markdown_table(["optimizer", "lr", *[f"steps to {t:.3f}" for t in targets], "s/step (median)",
                          "s/step (mean)", "optimizer.step ms", "final loss (5-step avg)", "held-out loss"], rows))
    save_summary(work / "summary.json", {"targets": targets, "machine": machine(), "steps": a.steps,
                                          "quantization": a.quantization, "results": results})


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
