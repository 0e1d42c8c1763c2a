"""pocketrlhf `ppo` vs trl's RLOOTrainer with peft: samples/s at the same model, prompts and rollouts, one run.

    OMP_NUM_THREADS=1 python bench/ppo_vs_trl.py --rounds 2        # ~20M-parameter llama, 32 samples x 48 tokens
    OMP_NUM_THREADS=1 python bench/ppo_vs_trl.py --size small      # a few-minute check of the script

trl 1.16 has no PPO; its closest online trainer is RLOOTrainer (REINFORCE leave-one-out): like
pocketrlhf's PPO it samples, recomputes the sampling policy's log-probs, runs a reference pass
and puts the KL penalty into the reward, then takes clipped policy-gradient steps. pocketrlhf
does all of that AND trains a critic (value head on the policy's hidden states, clipped value
loss, GAE).

Equal on both sides:
  * the same llama built locally (pocketrlhf.models.tiny; random init unless --pretrain-steps),
    fp32 weights on the CPU, the same torch threads; LoRA r=16, alpha=32, dropout 0 on every
    linear layer but the output head; reference = the base with the adapter disabled;
  * the same prompts (pocketrlhf.data.synthetic.prompt_rows, same tokenizer, no chat template)
    and reward (pocketrlhf.data.synthetic.sentiment_reward, a rule: texts in, floats out);
  * rollouts: ``--samples`` sequences per step generated in ONE generate() call, pure sampling
    at temperature 1 (top_k 0, top_p 1), at most ``--max-new-tokens`` tokens, cut after EOS;
  * updates: micro-batch ``--batch-size``, ``--grad-accum`` micro-batches per optimizer step,
    ``--epochs`` passes over each step's samples (pocketrlhf ppo_epochs = trl num_iterations),
    so both take samples / (batch x accum) x epochs optimizer steps per batch of samples;
  * KL coefficient 0.05 (fixed), clip 0.2, AdamW at the same learning rate, clipping at 1.0.

What cannot be equalized: RLOO needs >= 2 samples per prompt (num_generations=2: samples/2
distinct prompts, each sampled twice; pocketrlhf samples one response per prompt); RLOO's loss
is per sequence, PPO's per token; trl computes the entropy in every training forward (its fused
LM head), pocketrlhf only in the no-grad pass. With a random-init base almost no response ends
before the token limit, so both sides generate the same number of tokens; the mean response
length of each side is reported (with --pretrain-steps they differ by chance).

Sides: pocketrlhf with its defaults (fp32 weights on the CPU); trl-defaults (RLOOConfig defaults
for what the experiment does not fix: gradient_checkpointing=True, bf16=True: autocast on the CPU,
LoRA and master weights fp32); trl-tuned (no gradient checkpointing, fp32: the same arithmetic as
pocketrlhf); pocketrlhf-bf16 (``--dtype bfloat16``: bf16 base weights, fp32 LoRA, fp32 log-probs:
pocketrlhf's counterpart of trl's bf16 default; on CPUs with AMX/AVX512-BF16 bf16 matmuls are
much faster).

Speed: samples per second (and response tokens per second) in steady state: between the ends of
batches of samples (each = generation, scoring, old/reference pass and every optimizer step on
it) after ``--timing-skip`` warm-up batches, in wall time and in CPU seconds of the process. Each
side's time per phase (generation; scoring + old/reference/value pass; update) is reported too.
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
    "full": dict(hidden_size=512, layers=9, heads=8, intermediate_size=1024, samples=32, max_new_tokens=48, steps=4),
    # A quick check of the script (~9M parameters).
    "small": dict(hidden_size=512, layers=4, heads=8, intermediate_size=1024, samples=16, max_new_tokens=24, steps=3),
}
TRL_SETUPS = {"trl-defaults": {}, "trl-tuned": dict(gradient_checkpointing=False, bf16=False)}
REWARD = "pocketrlhf.data.synthetic:sentiment_reward"
LORA_R, LORA_ALPHA = 16, 32
KL_COEF = 0.05


def prepare(work: Path, size: str, pretrain_steps: int) -> dict:
    from pocketrlhf.data import synthetic

    spec = SIZES[size]
    model = review_llama(work / f"llama-{size}-pt{pretrain_steps}", spec["hidden_size"], spec["layers"], spec["heads"],
                         spec["intermediate_size"], pretrain_steps)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in synthetic.prompt_rows(512, seed=2)))
    return {"model": str(model), "prompts": str(prompts)}


class PhaseClock:
    """Wall and CPU seconds spent in named phases (wrapped functions)."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            w, c = now()
            try:
                return fn(*args, **kwargs)
            finally:
                w2, c2 = now()
                acc = self.seconds.setdefault(name, [0.0, 0.0])
                acc[0] += w2 - w
                acc[1] += c2 - c

        return timed


def record_steps(*metric_names: str) -> tuple[list[tuple[float, float]], dict[str, list[float]]]:
    """Patch pocketrlhf's run log so that each training step's log records the time (wall, CPU),
    right after the step's update, and the named metrics; (times, {metric: values})."""
    from pocketrlhf.stages import common

    ends: list[tuple[float, float]] = []
    values: dict[str, list[float]] = {name: [] for name in metric_names}
    log = common.Run.log

    def clocked_log(self, step, metrics, split="train"):
        if split == "train":
            ends.append(now())
            for name in metric_names:
                values[name].append(metrics[name])
        return log(self, step, metrics, split)

    common.Run.log = clocked_log
    return ends, values


def train_timed(trainer) -> dict[str, list[float]]:
    """Run a trl online trainer with its generation, rollout, reward and training-step phases
    timed; the seconds of each phase (wall, CPU)."""
    phases = PhaseClock()
    trainer._generate_single_turn = phases.wrap("generation", trainer._generate_single_turn)
    trainer._generate_and_score_completions = phases.wrap("rollout", trainer._generate_and_score_completions)
    trainer._calculate_rewards = phases.wrap("reward function", trainer._calculate_rewards)
    trainer.training_step = phases.wrap("training step", trainer.training_step)
    trainer.train()
    return phases.seconds


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process).


def run_ours(a, files: dict, out: Path, dtype: str = "auto") -> dict:
    from pocketrlhf.models import generation
    from pocketrlhf.stages import online, ppo

    cfg = ppo.PPOConfig(
        model=files["model"], dtype=dtype, prompts=files["prompts"], reward_function=REWARD, output_dir=str(out / "run"), device="cpu",
        eval_fraction=0.0, max_steps=a.steps, rollouts_per_step=a.samples, generation_batch_size=a.samples,
        batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum, ppo_epochs=a.epochs,
        max_new_tokens=a.max_new_tokens, temperature=1.0, kl_coef=KL_COEF, adaptive_kl=False, cliprange=0.2,
        learning_rate=a.lr, lr_scheduler="constant", max_grad_norm=1.0, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
        lora_dropout=0.0, target_modules="all-linear", logging_steps=1, progress=False, seed=0)
    clock = PhaseClock()
    ends, recorded = record_steps("response_length")
    lengths = recorded["response_length"]
    generation.sample = clock.wrap("generation", generation.sample)
    # The online loop (stages/online.py) calls its own generate_rollouts: wrapping ppo's name would time nothing.
    online.generate_rollouts = clock.wrap("generation + scoring", online.generate_rollouts)
    ppo.old_policy_pass = clock.wrap("old/reference/value pass", ppo.old_policy_pass)
    ppo.ppo_update = clock.wrap("update", ppo.ppo_update)
    wall, cpu = now()
    ppo.train(cfg)
    wall2, cpu2 = now()
    t = clock.seconds
    gen, rollout, old, update = (t["generation"], t["generation + scoring"], t["old/reference/value pass"],
                                 t["update"])
    phases = {"generation": gen, "scoring + old/ref pass": [rollout[0] - gen[0] + old[0], rollout[1] - gen[1] + old[1]],
              "update": update, "of which scoring (reward function)": [rollout[0] - gen[0], rollout[1] - gen[1]]}
    return {"ends": ends, "response_lengths": lengths, "wall_s": wall2 - wall, "cpu_s": cpu2 - cpu,
            "phases": phases, "optimizer_steps": a.steps * a.samples // (a.batch_size * a.grad_accum) * a.epochs}


def run_trl(a, files: dict, out: Path, setup: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from pocketrlhf.data import synthetic
    from pocketrlhf.models.loading import load_tokenizer

    per_batch = a.samples // (a.batch_size * a.grad_accum) * a.epochs  # optimizer steps per batch of samples

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_batch == 0:
                self.ends.append(now())

    def sentiment(completions, **kwargs):
        return synthetic.sentiment_reward(completions)

    args = RLOOConfig(
        output_dir=str(out / "run"), per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum,
        generation_batch_size=a.samples, num_generations=2, num_iterations=a.epochs,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=KL_COEF, epsilon=0.2,
        learning_rate=a.lr, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=a.steps * per_batch,
        logging_steps=per_batch, report_to="none", save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True,
        dataloader_num_workers=0, **TRL_SETUPS[setup])
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    prompts = [json.loads(line) for line in Path(files["prompts"]).read_text().splitlines()]
    clock = Clock()
    wall, cpu = now()
    tok = load_tokenizer(files["model"])  # pad token distinct from EOS, as pocketrlhf's
    trainer = RLOOTrainer(model=files["model"], reward_funcs=[sentiment], args=args,
                          train_dataset=Dataset.from_list(prompts), processing_class=tok, peft_config=peft_config,
                          callbacks=[clock])
    p = train_timed(trainer)
    wall2, cpu2 = now()
    gen, rollout, step, reward = p["generation"], p["rollout"], p["training step"], p["reward function"]
    history = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    settings = {k: getattr(args, k) for k in ("gradient_checkpointing", "bf16", "num_generations", "num_iterations",
                                             "steps_per_generation", "generation_batch_size", "beta", "top_k", "top_p",
                                             "temperature", "epsilon", "normalize_advantages", "disable_dropout",
                                             "optim")}
    return {"ends": clock.ends, "response_lengths": [h["completions/mean_length"] for h in history],
            "wall_s": wall2 - wall, "cpu_s": cpu2 - cpu, "optimizer_steps": trainer.state.global_step,
            "phases": {"generation": gen, "scoring + old/ref pass": [rollout[0] - gen[0], rollout[1] - gen[1]],
                       "update": [step[0] - rollout[0], step[1] - rollout[1]],
                       "of which scoring (reward function)": reward},
            "settings": settings}


def import_sides() -> None:
    from trl import RLOOConfig, RLOOTrainer  # noqa: F401

    from pocketrlhf.stages import ppo  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Driver.


def summarize(a, runs: list[dict]) -> dict:
    best = None
    for r in runs:
        rate = steady_rate(r["ends"], [a.samples] * len(r["ends"]), a.timing_skip)
        if best is None or rate["per_s"] > best[0]["per_s"]:
            best = (rate, r)
    rate, r = best
    cpu_best = max(steady_rate(x["ends"], [a.samples] * len(x["ends"]), a.timing_skip)["per_cpu_s"] for x in runs)
    lengths = r["response_lengths"]
    return {"samples_per_s": rate["per_s"], "samples_per_cpu_s": cpu_best, "timed_batches": rate["events"],
            "mean_response_length": sum(lengths) / len(lengths) if lengths else float("nan"),
            "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "optimizer_steps": r["optimizer_steps"],
            "phases_s": {k: [round(v[0], 1), round(v[1], 1)] for k, v in r["phases"].items()},
            "max_rss_mb": max(x["max_rss_mb"] for x in runs), "settings": r.get("settings"),
            "each_round_samples_per_s": [round(steady_rate(x["ends"], [a.samples] * len(x["ends"]),
                                                           a.timing_skip)["per_s"], 3) for x in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--samples", type=int, default=None, help="sampled responses per batch (default: full 32, small 16)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: full 48, small 24")
    p.add_argument("--steps", type=int, default=None, help="batches of samples per run (default: full 4, small 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="pocketrlhf ppo_epochs = trl num_iterations")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--pretrain-steps", type=int, default=0, help="full-weight LM pretraining of the base on reviews")
    add_harness_args(p, "ppo_vs_trl", SIDES, timing_skip=1, skip_unit="batches")
    a = p.parse_args()
    spec = SIZES[a.size]
    for key in ("samples", "max_new_tokens", "steps"):
        if getattr(a, key) is None:
            setattr(a, key, spec[key])
    if a.samples % (a.batch_size * a.grad_accum) or a.samples % 2:
        p.error("--samples must be even and a multiple of --batch-size x --grad-accum")
    if a.worker:
        return run_worker(a, import_sides, run_ours, run_trl)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work, a.size, a.pretrain_steps)
    n_params = count_parameters(files["model"])
    per_batch = a.samples // (a.batch_size * a.grad_accum) * a.epochs
    print(f"[bench] ppo: llama {n_params / 1e6:.1f}M params (pretrain steps {a.pretrain_steps}); {a.steps} batches of "
          f"{a.samples} samples x <= {a.max_new_tokens} new tokens; micro-batch {a.batch_size} x {a.grad_accum} "
          f"accumulation x {a.epochs} epochs = {per_batch} optimizer steps per batch; {a.threads} torch thread(s); "
          f"{machine()}", flush=True)
    sides = chosen_sides(a.sides, SIDES)
    child_args = ["--files", json.dumps(files), "--size", a.size, "--samples", str(a.samples),
                  "--max-new-tokens", str(a.max_new_tokens), "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                  "--grad-accum", str(a.grad_accum), "--epochs", str(a.epochs), "--lr", str(a.lr)]

    def show(r: int, side: str, res: dict) -> None:
        rate = steady_rate(res["ends"], [a.samples] * len(res["ends"]), a.timing_skip)
        print(f"  round {r + 1} {side:<13} {rate['per_s']:.3f} samples/s ({rate['per_cpu_s']:.3f} per CPU-s), "
              f"{res['wall_s']:.0f} s wall / {res['cpu_s']:.0f} s CPU in all", flush=True)

    runs = run_rounds(__file__, a, sides, child_args, work / f"run-{a.size}", show)
    rows = {s: summarize(a, runs[s]) for s in sides}
    print("\n| side | samples/s (wall) | samples per CPU-s | mean response tokens | response tokens/s | "
          "optimizer steps | max RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for s in sides:
        row = rows[s]
        print(f"| {s} | {row['samples_per_s']:.3f} | {row['samples_per_cpu_s']:.3f} | "
              f"{row['mean_response_length']:.1f} | {row['samples_per_s'] * row['mean_response_length']:.1f} | "
              f"{row['optimizer_steps']} | {row['max_rss_mb']:.0f} |")
    print("\nratios of samples/s (wall / CPU):")
    versus = ratios(rows, ("samples_per_s", "samples_per_cpu_s"))
    for name, (wall, cpu) in versus.items():
        print(f"  {name}: {wall:.2f}x / {cpu:.2f}x")
    print("\nseconds per phase over the whole run (wall / CPU), best round; the rest is set-up, data and logging:")
    for s in sides:
        row = rows[s]
        known = sum(v[0] for k, v in row["phases_s"].items() if not k.startswith("of which"))
        phases = ", ".join(f"{k} {v[0]:.1f} / {v[1]:.1f}" for k, v in row["phases_s"].items())
        print(f"  {s:<13} {phases}; rest {row['wall_s'] - known:.1f} s wall")
    print_settings(rows)
    save_summary(work / f"results-{a.size}.json",
                 {"size": a.size, "params": n_params, "pretrain_steps": a.pretrain_steps, "samples": a.samples,
                  "max_new_tokens": a.max_new_tokens, "steps": a.steps, "batch_size": a.batch_size,
                  "grad_accum": a.grad_accum, "epochs": a.epochs, "lr": a.lr, "threads": a.threads,
                  "rounds": a.rounds, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows,
                  "ratios": versus})


if __name__ == "__main__":
    main()
