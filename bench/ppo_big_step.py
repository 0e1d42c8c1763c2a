"""Peak memory of one PPO step of a 20B- (or 33B-) shaped NF4 model: the "20B RLHF on a 24 GB GPU" goal.

    python bench/ppo_big_step.py --device cuda                      # on a GPU: the real 44-layer model
    OMP_NUM_THREADS=2 python bench/ppo_big_step.py                  # on a CPU: 2, 4, 6 layers, extrapolated
    OMP_NUM_THREADS=1 python bench/ppo_big_step.py --shape tiny     # a quick check of the script

The model is random-init with the shape of GPT-NeoX-20B (``--shape 20b``: 44 layers of 6144, MLP
24576, 64 heads, vocabulary 50432) or LLaMA-33B (``33b``: 60 layers of 6656, MLP 17920, 52 heads,
vocabulary 32000), written directly in NF4 with double quantization
(``pocketrlhf.models.random_init``: never 16-bit in memory or on disk, one layer at a time), with a
small BPE tokenizer (sampled ids it does not know decode to nothing; they still cost what real
tokens cost). The step is pocketrlhf's ``ppo`` as shipped, run by bench/ppo_memory.py's worker:
one base; policy LoRA (r=16, all linear layers) and value head trained; reward LoRA + head (frozen,
saved like `pocketrlhf rm` saves them); reference = the base with adapters disabled; ``--rollouts``
8 prompts of ``--prompt-tokens`` 128 tokens, ``--max-new-tokens`` 128 sampled at T=1 (a random model
never ends early, so every response is full length), micro-batch 8, 2 PPO epochs (the second
backward runs while the AdamW state exists), gradient checkpointing on, bf16 compute.

Memory:
  * on a GPU: ``torch.cuda.max_memory_allocated`` (and reserved) over the whole run, loading
    included, with the whole depth (``--layers full``);
  * on a CPU: the peak of live tensor storages (pocketrlhf.measure.LiveTensors), what a GPU's
    allocator must hold, less its rounding and the CUDA context. The CPU cannot run 44 layers of
    20B in reasonable time (bitsandbytes dequantizes every weight for every sampled token), so it
    measures a few depths of the real widths and fits peak = a + b x layers: every per-layer cost
    (NF4 weights, LoRA and its AdamW state, checkpointed layer inputs, KV cache) is linear in the
    depth, the rest (embeddings, output layer, logits, one layer's working set) is not. Each phase's
    peak (generation, scoring, old/reference/value pass, update) is fitted on its own, its residuals
    printed, and extrapolated to the full depth; the step's peak there is the largest of them.
The planner (``pocketrlhf plan --stage ppo``, CUDA context 0) is printed beside each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, markdown_table, run_child  # noqa: E402
from ppo_memory import MB, planned, step_args, write_reward_adapter  # noqa: E402

SHAPES = {
    "20b": dict(model_type="gpt_neox", vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                intermediate_size=24576, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
                tie_word_embeddings=False),
    "33b": dict(model_type="llama", vocab_size=32000, hidden_size=6656, num_hidden_layers=60, num_attention_heads=52,
                intermediate_size=17920, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # A quick check of the script.
    "tiny": dict(model_type="gpt_neox", vocab_size=1024, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                 intermediate_size=1024, rotary_pct=0.25, max_position_embeddings=512, use_parallel_residual=True,
                 tie_word_embeddings=False),
}
GPU_BUDGET_MB = 24e3  # the goal: a 24 GB consumer GPU


def build_model(path: Path, shape: str, layers: int, device: str) -> Path:
    """The random NF4 checkpoint and its tokenizer, built once per (shape, depth)."""
    from transformers import AutoConfig

    from pocketrlhf.models.random_init import write_random_checkpoint
    from pocketrlhf.models.tiny import train_tokenizer

    done = path / "bench_model.json"
    spec = {"shape": shape, "layers": layers}
    if done.is_file() and json.loads(done.read_text()) == spec:
        return path
    tok = train_tokenizer(words(200), vocab_size=300)
    kw = dict(SHAPES[shape], num_hidden_layers=layers)
    config = AutoConfig.for_model(kw.pop("model_type"), eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **kw)
    print(f"[bench] writing a random NF4 {shape} model with {layers} layers to {path} ...", flush=True)
    write_random_checkpoint(config, path, quantization="4bit", device=device)
    tok.save_pretrained(str(path))
    done.write_text(json.dumps(spec))
    return path


def words(n: int, seed: int = 0) -> list[str]:
    import random

    vocab = "the quick brown fox jumps over a lazy dog while seven small birds sing in green trees".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(n)]


def write_prompts(path: Path, tokenizer_dir: Path, n: int, tokens: int) -> Path:
    """``n`` prompts of exactly ``tokens`` tokens each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = []
    for i, text in enumerate(words(n * 8, seed=1)):
        ids = tok(" ".join([text] * 8))["input_ids"][:tokens]
        prompt = tok.decode(ids)
        if len(tok(prompt)["input_ids"]) == tokens:
            rows.append({"prompt": prompt})
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def extrapolate(a, work: Path, rows: list[dict], full: int) -> dict:
    """Fit each phase's peak (generation, scoring, old/reference/value pass, update) to a + b x layers and
    take the largest at the full depth: which phase peaks may change with the depth."""
    xs = [r["layers"] for r in rows]
    fits = {}
    for phase in rows[0]["phases_mb"]:
        if phase == "before step":  # loading: the weights alone, every phase holds them too
            continue
        ys = [r["phases_mb"][phase]["phase_live_peak"] for r in rows]
        intercept, slope = fit_line(xs, ys)
        fits[phase] = {"intercept_mb": intercept, "per_layer_mb": slope, "estimate_full_mb": intercept + slope * full,
                       "max_residual_mb": max(abs(y - (intercept + slope * x)) for x, y in zip(xs, ys))}
        print(f"  {phase:<20} peak = {intercept:7.0f} MB + {slope:6.1f} MB x layers (largest residual "
              f"{fits[phase]['max_residual_mb']:.1f} MB) -> {fits[phase]['estimate_full_mb'] / 1e3:.2f} GB at {full}")
    top = max(fits, key=lambda k: fits[k]["estimate_full_mb"])
    estimate = fits[top]["estimate_full_mb"]
    # The planner at the full depth, from a config-only copy (it reads no weights).
    config_only = work / f"{a.shape}-config-{full}"
    config_only.mkdir(exist_ok=True)
    config = json.loads((work / f"{a.shape}-{xs[0]}" / "config.json").read_text())
    (config_only / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=full)))
    plan_full = planned(a, {"model": str(config_only)}, rows[0]["sequence_length"], "head")["pocketrlhf"]["peak_mb"]
    print(f"at the full depth ({full} layers) the step peaks in '{top}': {estimate / 1e3:.2f} GB of live tensors "
          f"(measured at {xs} layers, extrapolated); the planner says {plan_full / 1e3:.2f} GB (plan / estimate "
          f"{plan_full / estimate:.2f}); the goal: < {GPU_BUDGET_MB / 1e3:.0f} GB with the CUDA context (0.5-1 GB) on top")
    return {"phases": fits, "peak_phase": top, "estimate_full_mb": estimate, "plan_full_mb": plan_full}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="20b")
    p.add_argument("--layers", default="", help="comma-separated depths, or 'full' (default: full on cuda, 2,4,6 on "
                   "a CPU; tiny: 2,4,6)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--work", default=str(ROOT / "bench" / "_work" / "ppo_big_step"))
    a = p.parse_args()
    full = SHAPES[a.shape]["num_hidden_layers"]
    spec = a.layers or ("full" if a.device == "cuda" and a.shape != "tiny" else "2,4,6")
    depths = [full if d.strip() == "full" else int(d) for d in spec.split(",") if d.strip()]
    # What bench/ppo_memory.py's worker and planner read.
    a.quantization, a.dtype, a.gradient_checkpointing = "4bit", "bfloat16", not a.no_gradient_checkpointing
    a.max_prompt_length = a.prompt_tokens

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] one PPO step, {a.shape} shape in NF4 on {a.device}: depths {depths} (full {full}); "
          f"{a.rollouts} prompts of {a.prompt_tokens} tokens, {a.max_new_tokens} new tokens, micro-batch "
          f"{a.batch_size} x {a.grad_accum}, {a.ppo_epochs} PPO epochs, LoRA r={a.lora_r}, gradient checkpointing "
          f"{'on' if a.gradient_checkpointing else 'off'}, bf16 compute; {a.threads} torch thread(s); {machine()}",
          flush=True)
    rows = []
    for layers in depths:
        model = build_model(work / f"{a.shape}-{layers}", a.shape, layers, a.device)
        reward = work / f"{a.shape}-{layers}-reward-r{a.lora_r}"
        if not (reward / "head.safetensors").is_file():
            write_reward_adapter(model, reward, a.lora_r, quantization="4bit")
        prompts = write_prompts(work / f"prompts-{a.prompt_tokens}.jsonl", model, a.rollouts, a.prompt_tokens)
        files = {"model": str(model), "prompts": str(prompts), "reward": str(reward)}
        args = ["--files", json.dumps(files), "--quantization", "4bit", "--rollouts", str(a.rollouts),
                "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
                "--max-new-tokens", str(a.max_new_tokens), "--lora-r", str(a.lora_r)] + step_args(a)
        args += ["--gradient-checkpointing"] if a.gradient_checkpointing else []
        res = run_child(str(ROOT / "bench" / "ppo_memory.py"), "ours-head", args, work / f"run-{a.shape}-{layers}",
                        a.threads, env={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
        plan = planned(a, files, res["sequence_length"], "head")["pocketrlhf"]["peak_mb"]
        row = {"layers": layers, "live_peak_mb": res["live_peak_mb"], "cuda_peak_mb": res.get("cuda_peak_mb"),
               "cuda_reserved_peak_mb": res.get("cuda_reserved_peak_mb"), "plan_peak_mb": plan,
               "static_mb": {k: v / MB for k, v in res["tensors"].items()}, "sequence_length": res["sequence_length"],
               "response_tokens": res["response_tokens"], "phases_mb": res["phases_mb"], "wall_s": res["wall_s"]}
        rows.append(row)
        cuda = f", GPU allocated {row['cuda_peak_mb']:.0f} MB (reserved {row['cuda_reserved_peak_mb']:.0f})" \
            if row["cuda_peak_mb"] else ""
        print(f"  {layers:>3} layers: peak live tensors {row['live_peak_mb']:.0f} MB{cuda}; plan {plan:.0f} MB; "
              f"{row['sequence_length']}-token sequences; {row['wall_s']:.0f} s", flush=True)

    print()
    print(markdown_table(["layers", "peak live tensors MB", "GPU allocated MB", "plan MB", "plan / measured",
                          "weights + grads + AdamW MB"],
                         [[r["layers"], f"{r['live_peak_mb']:.0f}",
                           f"{r['cuda_peak_mb']:.0f}" if r["cuda_peak_mb"] else "-", f"{r['plan_peak_mb']:.0f}",
                           f"{r['plan_peak_mb'] / (r['cuda_peak_mb'] or r['live_peak_mb']):.2f}",
                           "{weights:.0f} + {grads:.0f} + {optimizer:.0f}".format(**r["static_mb"])] for r in rows]))
    summary = {"shape": a.shape, "full_layers": full, "device": a.device, "rollouts": a.rollouts,
               "prompt_tokens": a.prompt_tokens, "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size,
               "grad_accum": a.grad_accum, "ppo_epochs": a.ppo_epochs, "lora_r": a.lora_r,
               "gradient_checkpointing": a.gradient_checkpointing, "threads": a.threads, "machine": machine(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    if len({r["layers"] for r in rows}) >= 2 and full not in {r["layers"] for r in rows}:
        summary["fit"] = extrapolate(a, work, rows, full)
    path = work / f"results-{a.shape}-{a.device}.json"
    path = work / f"results-{a.shape}-{a.device}.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n[bench] results in {path}")


if __name__ == "__main__":
    main()
