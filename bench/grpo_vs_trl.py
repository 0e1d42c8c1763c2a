"""pocketrlhf `grpo` vs trl's GRPOTrainer (and RLOOTrainer) with peft: completions/s at the same work, one run.

    OMP_NUM_THREADS=1 python bench/grpo_vs_trl.py                  # 16 steps of 8 prompts x 8 completions (~8 min)
    OMP_NUM_THREADS=1 python bench/grpo_vs_trl.py --size small     # a few-minute check of the script
    OMP_NUM_THREADS=1 python bench/grpo_vs_trl.py --repeat 16      # long answers: 17-token completions
    OMP_NUM_THREADS=1 python bench/grpo_vs_trl.py --repeat 16 --context 2   # and 2 solved examples before each prompt
    OMP_NUM_THREADS=1 python bench/grpo_vs_trl.py --seeds 0,1,2,3,4,5 --sides pocketrlhf,trl-tuned  # reward curves over seeds

The task is the verifiable one in the package: a tiny llama pretrained (full weights, locally) on
noisy ``a b c : d`` lines names the first of three digits right about half the time; prompts
``a b c :`` with an ``answer`` column (synthetic.digits_split / digits_rows), exact-match reward
(synthetic.exact_match: pocketrlhf passes it the ``answer`` column as a keyword argument, trl
passes dataset columns as keyword arguments to ``(completions, answer, **kwargs)``).
With ``--repeat K`` the answer is that digit written K times (``a b c : d d ... d``, K tokens +
EOS): its own base, pretrained the same way on such lines, counts to K and stops, so completions
are K + 1 tokens long (``--max-new-tokens`` default K + 8): the same task at the length of a
short real answer, where the per-token work (generation, passes, update) outweighs the per-step
overhead of each trainer. The reward stays exact match of the whole answer.
With ``--context C`` every prompt starts with the same C solved examples (``a b c : a ... a ;``
lines, few-shot, as a real prompt starts with instructions or examples), so prompts are longer
than the bare 4 tokens (C x (K + 5) + 4 tokens); its base is pretrained on lines of C + 1 such
examples (all noisy, as above) so that the format is familiar.
With ``--seeds`` every side runs once per seed (LoRA initialisation, sampling and prompt order
on both sides; the two libraries draw them differently, so runs pair by seed, not by stream): the
later-half mean reward is then compared across seeds (mean and standard error over the seeds),
the run-to-run spread that one seed's binomial error leaves out.

Equal on every side:
  * the model: one llama built and pretrained once (cached in the work folder), fp32 weights on
    the CPU, the same torch threads; LoRA r=16, alpha=32, dropout 0 on every linear layer but the
    output head, fresh; the reference = the same base with the adapter disabled (beta 0.04 on both:
    trl's default beta 0 would skip the reference pass that pocketrlhf's default does);
  * prompts (the same 400 training triples, no chat template, the same tokenizer) and reward;
  * rollouts: ``--prompts`` prompts x ``--generations`` completions (G = trl ``num_generations``)
    per generation batch (trl ``generation_batch_size`` = prompts x G; pocketrlhf
    ``prompts_per_step`` x ``num_generations``, ``generation_batch_size`` = all of them), generated
    as ONE batch (trl: one generate() call; pocketrlhf: its own decoding loop,
    generation.seeded_decode, which samples what generate would with its seeded noise and drops
    finished answers from the batch), pure sampling at temperature 1 (top_k 0, top_p 1), at most
    ``--max-new-tokens`` (trl ``max_completion_length``), cut after EOS, no missing-EOS penalty;
  * updates: micro-batch ``--batch-size`` completions (trl ``per_device_train_batch_size``;
    a multiple of G, since pocketrlhf keeps groups whole), ``--grad-accum`` micro-batches per
    optimizer step (trl ``gradient_accumulation_steps``; ``steps_per_generation`` follows from
    the generation batch), one pass (``num_iterations`` 1): prompts x G / (batch x accum) optimizer
    steps per generation batch on both sides (default 1: neither side then needs the old-policy
    pass, both use the detached log-probs of the training forward as the old ones);
  * GRPO: group-normalised advantages (``scale_rewards`` "group"), k3 KL as a loss term, clip 0.2
    both ways, token-mean aggregation over the optimizer step's tokens (pocketrlhf
    ``--loss-aggregation token`` = trl ``loss_type="dapo"``); AdamW (weight decay 0, eps 1e-8) at
    the same constant learning rate, no warm-up, gradient clipping at 1.0;
  * RLOO sides: leave-one-out baseline, sequence KL (k1, from the old-policy pass) in the reward,
    both sides run the old-policy and the reference pass.

What cannot be equalized: the random streams (pocketrlhf answers each completion from its own
seeded stream, trl from torch's global generator) and the LoRA initialisation draws, so the reward
curves are equal only up to the noise of one seed (the prompts of each step are the same: both
shuffle them with a torch generator seeded 0). The per-step mean rewards of every side are
reported, with the difference of their later-half means and its binomial standard error (which
leaves out the run-to-run spread of the trajectory itself). trl computes the entropy in every
training forward; both RLOO losses clip one sequence-level ratio (sum of log-probs) and average
per answer (pocketrlhf ``--loss-aggregation answer``, its default for rloo since the figures in
bench/RESULTS.md were taken: those ran its per-token ``sequence`` aggregation); pocketrlhf runs each group's prompt once in the reference and
training passes, and the openings its answers have in common (a repeated answer: all of it) once too
(its own speed idea, same numbers; each run reports the share of answer tokens so saved); trl's AdamW is torch's fused one,
pocketrlhf's the default (same arithmetic); pocketrlhf steps its learning-rate schedule once per
generation batch, trl once per optimizer step (no difference at the constant rate used here).
Completions of this task are short (a digit and EOS), so the rates weigh the per-step overhead of
each trainer much more than a long-answer task would. On a shared machine the wall-time rates
follow the other jobs; the CPU-second rates are steadier (see bench/RESULTS.md).

Sides: pocketrlhf with its defaults (fp32 weights); trl-defaults (GRPOConfig defaults for what the
experiment does not fix: gradient_checkpointing=True, bf16=True: autocast on the CPU, LoRA and
master weights fp32); trl-tuned (no checkpointing, fp32: the same arithmetic as pocketrlhf);
pocketrlhf-bf16 (``--dtype bfloat16``: bf16 base, fp32 LoRA and log-probs); trl-tuned-bf16 (bf16
autocast, no checkpointing: trl loads the base in fp32 unless told otherwise, so it keeps fp32 weights and
generates in fp32); trl-tuned-bf16-base (the same work as pocketrlhf-bf16: the base loaded in bf16 with
``model_init_kwargs={"dtype": "bfloat16"}``, peft's fp32 LoRA, bf16 autocast, no checkpointing); pocketrlhf-rloo and trl-rloo-tuned (RLOO, fp32, no checkpointing).
Ratios compare each pocketrlhf side with each trl side of the same algorithm.

Speed: completions per second in steady state, between the ends of generation batches (each =
generation, scoring, reference pass and every optimizer step on it) after ``--timing-skip``
warm-up batches, in wall time and in CPU seconds of the process; each side's time per phase; peak
RSS (ru_maxrss) of each side's process.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_harness_args, chosen_sides, count_parameters, machine, markdown_table, now,  # noqa: E402
                     print_settings, ratios, run_rounds, run_worker, save_summary, steady_rate)
from ppo_vs_trl import PhaseClock, record_steps, train_timed  # noqa: E402

SIZES = {
    # ~1.1M parameters: 4 layers of 128 (MLP 512, 8 heads), vocabulary ~300 (a wider base did not learn to
    # copy the digit within a few minutes of pretraining); 64 completions per generation batch.
    "full": dict(hidden_size=128, layers=4, heads=8, intermediate_size=512, pretrain_steps=300, pretrain_lr=1e-3,
                 prompts=8, generations=8, max_new_tokens=8, steps=16, batch_size=16),
    # A quick check of the script: the base of tests/test_grpo.py (2 layers of 64).
    "small": dict(hidden_size=64, layers=2, heads=4, intermediate_size=256, pretrain_steps=300, pretrain_lr=3e-3,
                  prompts=4, generations=4, max_new_tokens=6, steps=4, batch_size=8),
}
SIDES = ("pocketrlhf", "trl-defaults", "trl-tuned", "pocketrlhf-bf16", "trl-tuned-bf16", "trl-tuned-bf16-base",
         "pocketrlhf-rloo", "trl-rloo-tuned")
TRL_SETUPS = {"trl-defaults": {}, "trl-tuned": dict(gradient_checkpointing=False, bf16=False),
              "trl-tuned-bf16": dict(gradient_checkpointing=False, bf16=True),
              "trl-tuned-bf16-base": dict(gradient_checkpointing=False, bf16=True,
                                          model_init_kwargs={"dtype": "bfloat16"}),
              "trl-rloo-tuned": dict(gradient_checkpointing=False, bf16=False)}
REWARD = "pocketrlhf.data.synthetic:exact_match"
LORA_R, LORA_ALPHA = 16, 32
BETA, EPSILON = 0.04, 0.2


def algorithm(side: str) -> str:
    return "rloo" if "rloo" in side else "grpo"


CONTEXT_SEPARATOR = " ; "


def context_lines(n: int, context: int, repeat: int, seed: int = 5) -> list[str]:
    """Pretraining texts for ``--context``: ``context`` + 1 noisy digit lines joined by the separator."""
    from pocketrlhf.data import synthetic

    lines = synthetic.digits_pretraining_texts(n * (context + 1), seed=seed, repeat=repeat)
    return [CONTEXT_SEPARATOR.join(lines[i:i + context + 1]) for i in range(0, len(lines), context + 1)]


def few_shot_prefix(context: int, repeat: int) -> str:
    """The solved examples every prompt starts with under ``--context`` (digit triples outside the
    training and held-out prompts)."""
    from pocketrlhf.data import synthetic

    train, held_out = synthetic.digits_split()
    used = set(train) | set(held_out)
    unused = [t for t in ((a, b, c) for a in range(10) for b in range(10) for c in range(10)) if t not in used]
    return "".join(f"{synthetic.digits_prompt(t)} {synthetic.digits_answer(t[0], repeat)}{CONTEXT_SEPARATOR}"
                   for t in random.Random(7).sample(unused, context))


def digits_llama(path: Path, hidden_size: int, layers: int, heads: int, intermediate_size: int,
                 pretrain_steps: int, pretrain_lr: float, seed: int = 0, repeat: int = 1, context: int = 0) -> Path:
    """The llama of the digits task, built and pretrained once and reused (as tests/test_grpo.py
    builds its base, at the bench's size)."""
    from pocketrlhf.data import synthetic
    from pocketrlhf.models.tiny import build_tiny_model, pretrain_tiny_model

    done = path / "bench_model.json"
    spec = dict(hidden_size=hidden_size, layers=layers, heads=heads, intermediate_size=intermediate_size,
                pretrain_steps=pretrain_steps, pretrain_lr=pretrain_lr, seed=seed)
    if repeat != 1:
        spec["repeat"] = repeat
    if context:
        spec["context"] = context
    if done.is_file() and json.loads(done.read_text()) == spec:
        return path
    shutil.rmtree(path, ignore_errors=True)
    def texts(n: int) -> list[str]:
        return context_lines(n, context, repeat) if context else synthetic.digits_pretraining_texts(n, repeat=repeat)

    build_tiny_model(path, "llama", texts=texts(500), vocab_size=300, hidden_size=hidden_size, layers=layers,
                     heads=heads, intermediate_size=intermediate_size, seed=seed)
    print(f"[bench] pretraining the base on digit lines for {pretrain_steps} steps ...", flush=True)
    # Windows as long as a text with its context (packed texts, EOS-separated).
    pretrain_tiny_model(path, texts(3000), steps=pretrain_steps, learning_rate=pretrain_lr, seed=seed,
                        seq_length=64 * (context + 1))
    done.write_text(json.dumps(spec))
    return path


def task_suffix(repeat: int, context: int) -> str:
    return (f"-repeat{repeat}" if repeat != 1 else "") + (f"-context{context}" if context else "")


def prepare(work: Path, size: str, repeat: int = 1, context: int = 0, pretrain_steps: int | None = None) -> dict:
    from pocketrlhf.data import synthetic

    spec = dict(SIZES[size], **({"pretrain_steps": pretrain_steps} if pretrain_steps else {}))
    suffix = task_suffix(repeat, context)
    model = digits_llama(work / f"llama-{size}{suffix}", spec["hidden_size"], spec["layers"], spec["heads"],
                         spec["intermediate_size"], spec["pretrain_steps"], spec["pretrain_lr"], repeat=repeat,
                         context=context)
    train, _ = synthetic.digits_split()
    prefix = few_shot_prefix(context, repeat)
    rows = [dict(r, prompt=prefix + r["prompt"]) for r in synthetic.digits_rows(train, repeat=repeat)]
    prompts = work / f"prompts{suffix}.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model), "prompts": str(prompts)}


def per_batch(a) -> int:
    """Optimizer steps per generation batch."""
    return a.prompts * a.generations // (a.batch_size * a.grad_accum)


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process).


def run_ours(a, files: dict, out: Path, dtype: str = "auto") -> dict:
    from pocketrlhf.models import generation
    from pocketrlhf.stages import common, grpo, online

    rloo = algorithm(a.worker) == "rloo"
    dtype = "bfloat16" if a.worker.endswith("-bf16") else dtype
    cfg = grpo.GRPOConfig(
        model=files["model"], dtype=dtype, prompts=files["prompts"], reward_function=[REWARD],
        output_dir=str(out / "run"), device="cpu", eval_fraction=0.0, eval_at_start=False, max_steps=a.steps,
        advantage="rloo" if rloo else "grpo", num_generations=a.generations, prompts_per_step=a.prompts,
        generation_batch_size=a.prompts * a.generations, batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, num_iterations=1, max_new_tokens=a.max_new_tokens,
        temperature=1.0, beta=BETA, scale_rewards="group", loss_aggregation="answer" if rloo else "token",
        epsilon_low=EPSILON, epsilon_high=EPSILON, missing_eos_penalty=0.0, learning_rate=a.lr,
        lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, lora_r=LORA_R,
        lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", logging_steps=1, progress=False, seed=a.seed)
    clock = PhaseClock()
    ends, recorded = record_steps("response_length", "score")
    lengths, rewards = recorded["response_length"], recorded["score"]
    generation.sample = clock.wrap("generation", generation.sample)
    online.generate_rollouts = clock.wrap("generation + scoring", online.generate_rollouts)
    online.reference_logprobs = clock.wrap("reference pass", online.reference_logprobs)
    grpo.GRPO._policy_pass = clock.wrap("old-policy pass", grpo.GRPO._policy_pass)
    grpo.GRPO._update = clock.wrap("update", grpo.GRPO._update)
    before_report: list[float] = []
    close = common.Run.close

    def close_after_measuring(run) -> None:  # the report's plots (matplotlib) come after training
        before_report.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        close(run)

    common.Run.close = close_after_measuring
    from pocketrlhf.models import forward

    layout_of, answer_tokens = forward.group_layout, [0, 0]  # in separate rows, in the group rows

    def counted_layout(ids, attn, prompt_lengths, group_size):
        layout = layout_of(ids, attn, prompt_lengths, group_size)
        answer_tokens[0] += int(attn.sum()) - int(prompt_lengths.sum())
        answer_tokens[1] += int((layout.slot_owner >= 0).sum())  # the tree's answer slots
        return layout

    forward.group_layout = counted_layout
    wall, cpu = now()
    grpo.train(cfg)
    wall2, cpu2 = now()
    t = clock.seconds
    zero = [0.0, 0.0]
    gen, rollout, ref, old = t["generation"], t["generation + scoring"], t.get("reference pass", zero), \
        t.get("old-policy pass", zero)
    phases = {"generation": gen,
              "scoring + old/ref pass": [rollout[i] - gen[i] + ref[i] + old[i] for i in (0, 1)],
              "update": t["update"], "of which scoring (reward function)": [rollout[i] - gen[i] for i in (0, 1)]}
    return {"ends": ends, "response_lengths": lengths, "rewards": rewards, "wall_s": wall2 - wall,
            "cpu_s": cpu2 - cpu, "phases": phases, "optimizer_steps": a.steps * per_batch(a),
            "max_rss_before_report_mb": before_report[0],
            "answer_tokens_in_passes": {"separate rows": answer_tokens[0], "group rows": answer_tokens[1]},
            "settings": {"dtype": dtype, "advantage": cfg.advantage, "loss_aggregation": cfg.loss_aggregation,
                         "share_prompt": cfg.share_prompt, "beta": cfg.beta}}


def run_trl(a, files: dict, out: Path, setup: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from pocketrlhf.data import synthetic
    from pocketrlhf.models.loading import load_tokenizer

    rloo = algorithm(setup) == "rloo"
    steps_per_batch = per_batch(a)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps_per_batch == 0:
                self.ends.append(now())

    def exact_match(completions, answer, **kwargs):
        return synthetic.exact_match(completions, answer)

    common = dict(
        output_dir=str(out / "run"), per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum,
        generation_batch_size=a.prompts * a.generations, num_generations=a.generations, num_iterations=1,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=BETA, epsilon=EPSILON,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=a.steps * steps_per_batch, logging_steps=steps_per_batch, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=a.seed, use_cpu=True, dataloader_num_workers=0, **TRL_SETUPS[setup])
    if rloo:
        args = RLOOConfig(**common)
    else:
        args = GRPOConfig(**common, loss_type="dapo", scale_rewards="group")
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in Path(files["prompts"]).read_text().splitlines()]
    clock = Clock()
    wall, cpu = now()
    tok = load_tokenizer(files["model"])  # pad token distinct from EOS, as pocketrlhf's
    trainer_cls = RLOOTrainer if rloo else GRPOTrainer
    trainer = trainer_cls(model=files["model"], reward_funcs=[exact_match], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_config,
                          callbacks=[clock])
    p = train_timed(trainer)
    wall2, cpu2 = now()
    gen, rollout, step, reward = p["generation"], p["rollout"], p["training step"], p["reward function"]
    history = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    reward_key = "rewards/exact_match/mean"
    names = ["gradient_checkpointing", "bf16", "num_generations", "num_iterations", "steps_per_generation",
             "generation_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps", "beta", "top_k",
             "top_p", "temperature", "epsilon", "epsilon_high", "disable_dropout", "optim", "model_init_kwargs"]
    names += ["normalize_advantages"] if rloo else ["loss_type", "scale_rewards"]
    base_dtype = str(trainer.model.get_input_embeddings().weight.dtype)
    return {"ends": clock.ends, "response_lengths": [h["completions/mean_length"] for h in history],
            "rewards": [h[reward_key] for h in history], "wall_s": wall2 - wall, "cpu_s": cpu2 - cpu,
            "optimizer_steps": trainer.state.global_step,
            "phases": {"generation": gen, "scoring + old/ref pass": [rollout[i] - gen[i] for i in (0, 1)],
                       "update": [step[i] - rollout[i] for i in (0, 1)], "of which scoring (reward function)": reward},
            "settings": {**{k: getattr(args, k) for k in names}, "base_dtype": base_dtype}}


def import_sides() -> None:
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: F401

    from pocketrlhf.stages import grpo, online  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Driver.


def rate_of(a, r: dict) -> dict:
    n = a.prompts * a.generations
    return steady_rate(r["ends"], [n] * len(r["ends"]), a.timing_skip)


def later_mean(rewards: list[float]) -> float:
    """Mean reward of the later half of the generation batches (the policy has moved)."""
    later = rewards[len(rewards) // 2:]
    return sum(later) / len(later) if later else float("nan")


def reward_gaps(a, rows: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """For each pocketrlhf side vs each trl side: the difference of later-half mean rewards, and
    one standard error of that difference from binomial sampling noise (exact match is 0 or 1)."""
    out = {}
    for ours in [s for s in rows if s.startswith("pocketrlhf")]:
        for theirs in [s for s in rows if s.startswith("trl")]:
            x, y = rows[ours], rows[theirs]
            n = a.prompts * a.generations * (len(x["rewards"]) - len(x["rewards"]) // 2)
            p = (x["later_reward"] + y["later_reward"]) / 2
            out[f"{ours} / {theirs}"] = (x["later_reward"] - y["later_reward"], math.sqrt(2 * p * (1 - p) / n))
    return out


def summarize(a, runs: list[dict]) -> dict:
    rate, r = max(((rate_of(a, x), x) for x in runs), key=lambda p: p[0]["per_s"])
    lengths, rewards = r["response_lengths"], r["rewards"]
    return {"completions_per_s": rate["per_s"], "completions_per_cpu_s": max(rate_of(a, x)["per_cpu_s"] for x in runs),
            "timed_batches": rate["events"],
            "mean_completion_length": sum(lengths) / len(lengths) if lengths else float("nan"),
            "rewards": [round(v, 4) for v in rewards], "mean_reward": sum(rewards) / len(rewards),
            "later_reward": later_mean(rewards),
            "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "optimizer_steps": r["optimizer_steps"],
            "phases_s": {k: [round(v[0], 1), round(v[1], 1)] for k, v in r["phases"].items()},
            "max_rss_mb": max(x["max_rss_mb"] for x in runs), "settings": r.get("settings"),
            **({"max_rss_before_report_mb": max(x["max_rss_before_report_mb"] for x in runs)}
               if "max_rss_before_report_mb" in r else {}),
            "each_round_completions_per_s": [round(rate_of(a, x)["per_s"], 3) for x in runs]}


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.mean(values), spread / math.sqrt(len(values))


def seed_sweep(a, sides: list[str], child_args: list[str], out_dir: Path, show) -> None:
    """Every side once per seed: later-half mean reward and rate per seed, then across seeds."""
    seeds = [int(x) for x in a.seeds.split(",")]
    a.rounds = 1
    later: dict[str, list[float]] = {s: [] for s in sides}
    per_cpu: dict[str, list[float]] = {s: [] for s in sides}
    lengths: dict[str, list[float]] = {s: [] for s in sides}
    rss: dict[str, list[float]] = {s: [] for s in sides}  # peak RSS, and pocketrlhf's before its report
    early_rss: dict[str, list[float]] = {s: [] for s in sides}
    for seed in seeds:
        args = child_args + ["--seed", str(seed)]
        print(f"[bench] seed {seed}", flush=True)
        runs = run_rounds(__file__, a, sides, args, out_dir / f"seed{seed}", show)
        for s in sides:
            later[s].append(later_mean(runs[s][0]["rewards"]))
            lengths[s].append(sum(runs[s][0]["response_lengths"]) / max(len(runs[s][0]["response_lengths"]), 1))
            per_cpu[s].append(rate_of(a, runs[s][0])["per_cpu_s"])
            rss[s].append(runs[s][0]["max_rss_mb"])
            early_rss[s].append(runs[s][0].get("max_rss_before_report_mb", runs[s][0]["max_rss_mb"]))
    print(f"\nlater-half mean reward over {len(seeds)} seeds {seeds} (mean +- standard error over seeds):")
    for s in sides:
        m, e = mean_and_error(later[s])
        print(f"  {s:<15} {m:.3f} +- {e:.3f}  (each seed: {[round(x, 3) for x in later[s]]}); completions per "
              f"CPU-s, median over seeds {statistics.median(per_cpu[s]):.1f}; mean completion tokens "
              f"{sum(lengths[s]) / len(seeds):.2f}; peak RSS, highest seed {max(rss[s]):.0f} MB"
              + (f" ({max(early_rss[s]):.0f} before its report)" if early_rss[s] != rss[s] else ""))
    gaps = {}
    for ours in [s for s in sides if s.startswith("pocketrlhf")]:
        for theirs in [s for s in sides if s.startswith("trl") and algorithm(s) == algorithm(ours)]:
            (m1, e1), (m2, e2) = mean_and_error(later[ours]), mean_and_error(later[theirs])
            gaps[f"{ours} / {theirs}"] = (m1 - m2, math.sqrt(e1 ** 2 + e2 ** 2))
            speed = sorted(x / y for x, y in zip(per_cpu[ours], per_cpu[theirs]))
            print(f"  {ours} - {theirs}: {m1 - m2:+.3f} +- {math.sqrt(e1 ** 2 + e2 ** 2):.3f}; completions per CPU-s, "
                  f"ours / theirs seed by seed: median {statistics.median(speed):.2f}x (range {speed[0]:.2f}-{speed[-1]:.2f}x); "
                  f"peak RSS {max(rss[ours]) / max(rss[theirs]):.2f} "
                  f"({max(early_rss[ours]) / max(rss[theirs]):.2f} up to pocketrlhf's report)")
    save_summary(out_dir / "seeds.json", {"seeds": seeds, "later_reward": later, "per_cpu_s": per_cpu,
                                          "completion_tokens": lengths, "gaps": gaps,
                                          "max_rss_mb": rss, "max_rss_before_report_mb": early_rss, "repeat": a.repeat,
                                          "context": a.context, "machine": machine(),
                                          "date": time.strftime("%Y-%m-%d %H:%M")})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--prompts", type=int, default=None, help="prompts per generation batch (default: full 8, small 4)")
    p.add_argument("--generations", type=int, default=None, help="completions per prompt, G (default: full 8, small 4)")
    p.add_argument("--repeat", type=int, default=1,
                   help="answer = the digit written this many times (completions of repeat + 1 tokens)")
    p.add_argument("--context", type=int, default=0,
                   help="solved examples before every prompt (the same for all; its own pretrained base)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: full 8, small 6; repeat + 8 with --repeat")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretraining steps of the base (default: full and small 300); a new value rebuilds it")
    p.add_argument("--steps", type=int, default=None, help="generation batches per run (default: full 16, small 4)")
    p.add_argument("--batch-size", type=int, default=None, help="completions per micro-batch, a multiple of G "
                                                                "(default: full 16, small 8)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimizer step (default: the whole generation batch in one step)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="seed of every side (LoRA initialisation, sampling, prompt order)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: every side runs once per seed (instead of --rounds), and the "
                        "reward curves are compared across seeds")
    add_harness_args(p, "grpo_vs_trl", SIDES, timing_skip=1, skip_unit="generation batches")
    a = p.parse_args()
    spec = SIZES[a.size]
    if a.repeat < 1 or a.context < 0:
        p.error("--repeat must be at least 1, --context at least 0")
    if a.max_new_tokens is None and a.repeat > 1:
        a.max_new_tokens = a.repeat + 8
    for key in ("prompts", "generations", "max_new_tokens", "steps", "batch_size"):
        if getattr(a, key) is None:
            setattr(a, key, spec[key])
    n = a.prompts * a.generations
    if a.grad_accum is None:
        a.grad_accum = max(1, n // a.batch_size)
    if a.batch_size % a.generations or n % (a.batch_size * a.grad_accum):
        p.error("--batch-size must be a multiple of --generations, and prompts x generations a multiple of "
                "batch x grad-accum")
    if a.worker:
        return run_worker(a, import_sides, run_ours, run_trl)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work, a.size, a.repeat, a.context, a.pretrain_steps)
    suffix = task_suffix(a.repeat, a.context)
    n_params = count_parameters(files["model"])
    context = f"{a.context} solved examples before each prompt; " if a.context else ""
    print(f"[bench] grpo: llama {n_params / 1e6:.2f}M params; answers of {a.repeat} digit(s); {context}"
          f"{a.steps} generation batches of {a.prompts} prompts x "
          f"{a.generations} completions x <= {a.max_new_tokens} new tokens; micro-batch {a.batch_size} x "
          f"{a.grad_accum} accumulation = {per_batch(a)} optimizer step(s) per batch; {a.threads} torch thread(s); "
          f"{machine()}", flush=True)
    sides = chosen_sides(a.sides, SIDES)
    child_args = ["--files", json.dumps(files), "--size", a.size, "--prompts", str(a.prompts),
                  "--generations", str(a.generations), "--max-new-tokens", str(a.max_new_tokens),
                  "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
                  "--lr", str(a.lr), "--timing-skip", str(a.timing_skip)]

    def show(r: int, side: str, res: dict) -> None:
        rate = rate_of(a, res)
        print(f"  round {r + 1} {side:<15} {rate['per_s']:.2f} completions/s ({rate['per_cpu_s']:.2f} per CPU-s), "
              f"{res['wall_s']:.0f} s wall / {res['cpu_s']:.0f} s CPU in all, max RSS {res['max_rss_mb']:.0f} MB"
              + (f" ({res['max_rss_before_report_mb']:.0f} before its report)" if "max_rss_before_report_mb" in res else "")
              + (f", {1 - t['group rows'] / t['separate rows']:.0%} of answer tokens shared in its passes"
                 if (t := res.get("answer_tokens_in_passes")) and t["separate rows"] else "")
              + f", rewards {[round(x, 2) for x in res['rewards']]}", flush=True)

    if a.seeds:
        return seed_sweep(a, sides, child_args, work / f"seeds-{a.size}{suffix}", show)
    runs = run_rounds(__file__, a, sides, child_args + ["--seed", str(a.seed)], work / f"run-{a.size}{suffix}", show)
    rows = {s: summarize(a, runs[s]) for s in sides}
    print()
    print(markdown_table(
        ["side", "completions/s (wall)", "per CPU-s", "mean completion tokens", "mean reward", "optimizer steps",
         "max RSS MB"],
        [[s, r["completions_per_s"], r["completions_per_cpu_s"], r["mean_completion_length"], r["mean_reward"],
          r["optimizer_steps"], r["max_rss_mb"]] for s, r in rows.items()]))
    versus, curves = {}, {}
    for algo in ("grpo", "rloo"):
        group = {s: r for s, r in rows.items() if algorithm(s) == algo}
        versus.update(ratios(group, ("completions_per_s", "completions_per_cpu_s", "max_rss_mb")))
        curves.update(reward_gaps(a, group))
    print("\nratios (ours / theirs): completions/s wall, per CPU-s; peak RSS (<= 1 is less memory):")
    for name, (wall, cpu, mem) in versus.items():
        ours, theirs = (rows[s] for s in name.split(" / "))
        early = ours.get("max_rss_before_report_mb")
        print(f"  {name}: {wall:.2f}x / {cpu:.2f}x; RSS {mem:.2f}"
              + (f" ({early / theirs['max_rss_mb']:.2f} up to pocketrlhf's report)" if early else ""))
    print("\nmean reward (exact match) per generation batch, in order (the first batch is sampled before any update):")
    for s, r in rows.items():
        print(f"  {s:<15} {r['rewards']} (mean {r['mean_reward']:.3f}, later half {r['later_reward']:.3f})")
    print("equal reward curves? later-half mean reward, ours - theirs, and the sampling noise of that difference "
          "(one standard error):")
    for name, (gap, noise) in curves.items():
        print(f"  {name}: {gap:+.3f} +- {noise:.3f}")
    print("\nseconds per phase over the whole run (wall / CPU), best round; the rest is set-up, data and logging:")
    for s, row in rows.items():
        known = sum(v[0] for k, v in row["phases_s"].items() if not k.startswith("of which"))
        phases = ", ".join(f"{k} {v[0]:.1f} / {v[1]:.1f}" for k, v in row["phases_s"].items())
        print(f"  {s:<15} {phases}; rest {row['wall_s'] - known:.1f} s wall")
    print_settings(rows)
    save_summary(work / f"results-{a.size}{suffix}.json",
                 {"size": a.size, "repeat": a.repeat, "context": a.context, "seed": a.seed, "params": n_params, "prompts": a.prompts, "generations": a.generations,
                  "max_new_tokens": a.max_new_tokens, "steps": a.steps, "batch_size": a.batch_size,
                  "grad_accum": a.grad_accum, "lr": a.lr, "beta": BETA, "threads": a.threads, "rounds": a.rounds,
                  "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "ratios": versus,
                  "reward_gaps": curves})


if __name__ == "__main__":
    main()
