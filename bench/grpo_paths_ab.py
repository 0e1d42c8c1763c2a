"""The GRPO speed paths of issue 16 on and off in ONE process, alternating: CPU ms per phase.

    OMP_NUM_THREADS=1 python bench/grpo_paths_ab.py [--repeat 16] [--reps 16]

On a loaded machine a bench run's rate moves by tens of percent between rounds; switching the
code paths inside one process, back and forth, compares them under the same load. "before" turns
off what issue 16's follow-up added: the fused LoRA forward (adapters.fuse_lora_layers), one
prefill per distinct prompt in rollouts (generation.distinct_prompts) and the linear-work term
of the prompt-sharing rule (online.linear_cost_per_pair). The prefix-tree layout of a group's answers
(forward.group_layout), added after these, is on in both. Uses the model and prompts of
bench/grpo_vs_trl.py (run it once first) with its settings: 8 prompts x 8 completions, micro-batch
16, fp32, one thread. Phases: generation of one batch, the reference pass, the training forward
and backward of its 4 micro-batches; min and median over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="the grpo_vs_trl task with answers this many digits long")
    p.add_argument("--reps", type=int, default=16)
    p.add_argument("--work", default=str(ROOT / "bench" / "_work" / "grpo_vs_trl"))
    a = p.parse_args()
    import torch

    from pocketrlhf.models import generation
    from pocketrlhf.models.loading import load_tokenizer
    from pocketrlhf.stages import grpo, online

    work, suffix = Path(a.work), (f"-repeat{a.repeat}" if a.repeat != 1 else "")
    if not (work / f"llama-full{suffix}" / "bench_model.json").is_file():
        sys.exit(f"no bench model in {work}: run bench/grpo_vs_trl.py{' --repeat %d' % a.repeat if suffix else ''} first")
    new_tokens = a.repeat + 8 if a.repeat > 1 else 8
    cfg = grpo.GRPOConfig(
        model=str(work / f"llama-full{suffix}"), prompts=str(work / f"prompts{suffix}.jsonl"), device="cpu",
        reward_function=["pocketrlhf.data.synthetic:exact_match"], output_dir=str(work / "ab-run"), eval_fraction=0.0,
        num_generations=8, prompts_per_step=8, generation_batch_size=64, batch_size=16, gradient_accumulation_steps=4,
        max_new_tokens=new_tokens, beta=0.04, loss_aggregation="token", lora_r=16, lora_alpha=32, progress=False,
        seed=0)
    algo = grpo.GRPO(cfg)
    roles = algo.build_roles(cfg, 16)  # finish_roles installs the fused forward
    tok = load_tokenizer(cfg.model)
    train, _, _ = online.prepare_prompts(cfg, tok)
    chosen = online.step_prompts(cfg, 0, len(train), 0, 1, cfg.prompts_per_step)
    seeds = [generation.row_seed(0, 0, i) for i in range(64)]
    r = online.generate_rollouts(cfg, roles, tok, train.take(chosen), seeds, chosen, 8)
    prompt_ids = [q for q in train.take(chosen).ids for _ in range(8)]
    module = algo.trained_module(roles)
    layers = [m for m in roles.model.modules() if "forward" in m.__dict__]
    fused = {id(m): m.forward for m in layers}
    distinct, cost = generation.distinct_prompts, online.linear_cost_per_pair

    def use(after: bool) -> None:
        for m in layers:
            if after:
                m.forward = fused[id(m)]
            else:
                m.__dict__.pop("forward", None)
        generation.distinct_prompts = distinct if after else (lambda c: (c, torch.arange(len(c))))
        online.linear_cost_per_pair = cost if after else (lambda m: 0.0)

    def train_pass() -> None:
        for s in online.micro_batches(64, cfg.batch_size, 8):
            with roles.adapters.use(online.POLICY):
                lp = module(r.input_ids[s], r.attention_mask[s], r.response_mask[s], r.prompt_lengths[s], 1.0, 8, True)
                lp.sum().backward()
        roles.model.zero_grad(set_to_none=True)

    phases = {"generation": lambda: generation.sample(roles.model, tok, prompt_ids, new_tokens, 1.0, batch_size=64,
                                                      row_seeds=seeds),
              "reference pass": lambda: online.reference_logprobs(cfg, roles, r), "training fwd+bwd": train_pass}
    times: dict[tuple[str, bool], list[float]] = {}
    answers = {}
    for rep in range(a.reps):
        for after in ((False, True) if rep % 2 == 0 else (True, False)):
            use(after)
            total = 0.0
            for name, fn in phases.items():
                start = time.process_time()
                out = fn()
                spent = time.process_time() - start
                total += spent
                times.setdefault((name, after), []).append(spent)
                if name == "generation":
                    answers.setdefault(after, out)
            times.setdefault(("whole step", after), []).append(total)
    print(f"{a.reps} alternations, {len(layers)} fused LoRA layers; same answers before and after: "
          f"{answers[False] == answers[True]}")
    for name in list(phases) + ["whole step"]:
        x, y = times[(name, False)], times[(name, True)]
        print(f"  {name}: before {min(x) * 1e3:.0f} ms (median {statistics.median(x) * 1e3:.0f}), after "
              f"{min(y) * 1e3:.0f} ms (median {statistics.median(y) * 1e3:.0f}): {min(y) / min(x):.2f}x / "
              f"{statistics.median(y) / statistics.median(x):.2f}x")


if __name__ == "__main__":
    main()
