"""The published memory headlines, re-planned (and, at reduced depth, measured) with pocketrlhf.

    OMP_NUM_THREADS=1 python bench/published_setups.py                 # planner + CPU measurement at 1, 2 layers
    OMP_NUM_THREADS=1 python bench/published_setups.py --no-measure    # the planner's figures only (seconds)
    python bench/published_setups.py --device cuda --depths full       # on a GPU: the whole models

Setups (published figures: /work/shared/ANCHORS-performance.md, sections 1.3-1.4 and 2):
  * QLoRA 7B/13B/33B/65B, the paper's appendix memory figure: LLaMA in NF4 + double quantization,
    LoRA r=64 on every linear layer in bf16, paged AdamW (32-bit state), gradient checkpointing,
    batch 1 x 512 tokens. Totals as transcribed from the figure: 6.9, 11.3, 24.7, 45.0 GB; 33B
    "does not quite fit into a 24 GB" GPU without paging, 65B fits "<48GB".
  * trl+peft, "20B RLHF on a 24 GB consumer GPU", tested on an RTX 4090 (24 GiB), with the PPO script
    the post links (trl examples/sentiment/scripts/gpt-neox-20b_peft/, March 2023): gpt-neox-20b in
    8-bit (fp16 elsewhere), LoRA r=16 on query_key_value, value head on the policy, reference =
    adapters disabled; ``forward_batch_size=16``, which then set PPO's mini-batch to 16 sequences;
    prompts of 2-8 tokens, responses of 4-16 generated one query at a time; checkpointing for the
    update; torch Adam (fp32 state on fp32 LoRA weights). peft's prepare_model_for_int8_training of
    the time upcast only parameters named "layer_norm" (GPT-NeoX: the final norm), and the script
    cast those back to fp16: no k-bit upcast (``kbit_upcast=False``). Published: it fits (no
    figure). Its reward model, a DistilBERT classifier, is not part of pocketrlhf's plan (which
    holds a frozen reward adapter instead).
  * StackLLaMA's rule of thumb for 8-bit LoRA: 1.2-1.4 GB per billion parameters "depending on the
    batch size and sequence length", for LLaMA-7B (6.74B) 8.1-9.4 GB. No stage or setting is
    attached to it; its SFT script (trl examples/stack_llama/scripts/supervised_finetuning.py,
    April 2023): 8-bit, LoRA r=16 on q_proj, v_proj, packed 16 x 1024 (4 x 1024 from May 2023),
    checkpointing on, no k-bit upcast (peft's upcast matched no LLaMA norm name). Planned at 16, 4
    and 1 x 1024.

GPU capacities are the cards' own: GPU memory comes in binary sizes, a "24 GB" card holds 24 GiB
(25.8 x 10^9 bytes). The planner runs pocketrlhf's path at each setup's published settings
(``--adapter-dtype bfloat16 --optimizer paged_adamw`` for QLoRA, ``--kbit-upcast false`` for the
8-bit setups of 2023); its figure is the peak of tensors (CUDA context 0, as the published
figures count tensors) and, for paged state, the peak with the state evicted to CPU memory. The
fit column adds a 1 GB CUDA context.

Measured (CPU, ``--depths 1,2``): the model is random-init with the real widths (NF4 written
directly, pocketrlhf.models.random_init; 8-bit quantized on load), and one real SFT step of
pocketrlhf's path runs through ``pocketrlhf.measure.measure_steps`` (exact live-tensor tracking, the
second of two optimizer steps measured). Every per-layer cost is linear in the depth, so the
peak at the full depth is extrapolated from the depths measured (peak = a + b x layers), as
bench/ppo_big_step.py does. Paged optimizers run unpaged on a CPU; the evicted peak is measured
as the step's peak less the optimizer state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, markdown_table, run_child, write_result  # noqa: E402

sys.path.insert(0, str(ROOT))

LLAMA = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
             tie_word_embeddings=False, hidden_act="silu")
SHAPES = {
    "llama-7b": dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
    "llama-13b": dict(LLAMA, hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_hidden_layers=40),
    "llama-33b": dict(LLAMA, hidden_size=6656, intermediate_size=17920, num_attention_heads=52, num_hidden_layers=60),
    "llama-65b": dict(LLAMA, hidden_size=8192, intermediate_size=22016, num_attention_heads=64, num_hidden_layers=80),
    "gpt-neox-20b": dict(model_type="gpt_neox", vocab_size=50432, hidden_size=6144, num_hidden_layers=44,
                         num_attention_heads=64, intermediate_size=24576, rotary_pct=0.25, max_position_embeddings=2048,
                         use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu_fast"),
}
QLORA = dict(stage="sft", quantization="4bit", lora_r=64, target_modules="all-linear", batch_size=1, seq_length=512,
             packing=True, gradient_checkpointing=True, optimizer="paged_adamw", adapter_dtype="bfloat16")
# The 8-bit setups of 2023 ran transformers' checkpointing of the time (reentrant) and peft's
# prepare_model_for_int8_training before 0.3, which upcast only parameters named "layer_norm".
# trl examples/sentiment/scripts/gpt-neox-20b_peft/s03_gpt-neo-20b_sentiment_peft.py as the trl-peft
# post links it (trl 1eb7e7715 / 688ce576b, 2023-03-09): fp16, LoRA r=16 on query_key_value,
# forward_batch_size=16 (which set trl's mini_batch_size to 16), prompts of 2-8 tokens, responses of
# 4-16 generated one query at a time, GPT-NeoX's final norm cast back to fp16.
TRL_PEFT_20B = dict(stage="ppo", quantization="8bit", dtype="float16", kbit_upcast=False, lora_r=16,
                    target_modules="query_key_value", batch_size=16, seq_length=24, max_new_tokens=16,
                    generation_batch_size=1, gradient_checkpointing=True, reentrant_checkpointing=True,
                    value_model="head", reference="base")
# trl examples/stack_llama/scripts/supervised_finetuning.py (trl 704671e0f, 2023-04-05): packed x
# 1024 tokens, 8-bit, LoRA r=16 (peft's LLaMA default: q_proj, v_proj), checkpointing always on (its
# --no_gradient_checkpointing flag stores False either way); batch 16, 4 from May 2023.
STACKLLAMA_SFT = dict(stage="sft", quantization="8bit", kbit_upcast=False, lora_r=16, target_modules="q_proj,v_proj",
                      seq_length=1024, packing=True, gradient_checkpointing=True, reentrant_checkpointing=True)
SETUPS = [
    # name, shape, plan options, published GB (a number, a (low, high) range or None), published GPU, source
    ("QLoRA 7B", "llama-7b", QLORA, 6.9, None, "QLoRA appendix figure (transcribed)"),
    ("QLoRA 13B", "llama-13b", QLORA, 11.3, None, "QLoRA appendix figure (transcribed)"),
    ("QLoRA 33B", "llama-33b", QLORA, 24.7, "24GiB", "QLoRA: 'does not quite fit into a 24 GB', paging needed"),
    ("QLoRA 65B", "llama-65b", QLORA, 45.0, "48GiB", "QLoRA: 65B '<48GB'"),
    ("trl+peft 20B PPO (8-bit)", "gpt-neox-20b", TRL_PEFT_20B, None, "24GiB",
     "trl-peft blog + its script: fits a 24 GB RTX 4090"),
    ("StackLLaMA 7B SFT 8-bit 16x1024 GC", "llama-7b", dict(STACKLLAMA_SFT, batch_size=16), (8.1, 9.4), "80GiB",
     "StackLLaMA blog: 1.2-1.4 GB per billion parameters; its SFT script as published"),
    ("StackLLaMA 7B SFT 8-bit 4x1024 GC", "llama-7b", dict(STACKLLAMA_SFT, batch_size=4), (8.1, 9.4), "80GiB",
     "StackLLaMA blog: 1.2-1.4 GB per billion parameters; the SFT script's batch from May 2023"),
    ("StackLLaMA 7B SFT 8-bit 1x1024 GC", "llama-7b", dict(STACKLLAMA_SFT, batch_size=1), (8.1, 9.4), "80GiB",
     "StackLLaMA blog: 1.2-1.4 GB per billion parameters"),
]


def write_config(work: Path, shape: str, layers: int | None = None) -> Path:
    folder = work / f"config-{shape}" if layers is None else work / f"config-{shape}-{layers}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[shape]) if layers is None else dict(SHAPES[shape], num_hidden_layers=layers)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def plan_setup(work: Path, shape: str, options: dict, layers: int | None = None, context: str = "0GB"):
    from pocketrlhf import plan as P

    model = write_config(work, shape, layers)
    cfg = P.PlanConfig(model=str(model), cuda_context=context, **options)
    return P.plan_memory(P.model_shape(P.read_config(str(model))), cfg)


def build_model(work: Path, shape: str, layers: int, quantization: str, device: str) -> Path:
    """A random checkpoint of ``shape`` at ``layers`` depth: NF4 for 4-bit setups, bf16 otherwise."""
    from transformers import AutoConfig

    from pocketrlhf.models.random_init import write_random_checkpoint

    stored = "4bit" if quantization == "4bit" else "none"
    path = work / f"model-{shape}-{layers}-{stored}"
    done = path / "bench_model.json"
    if done.is_file():
        return path
    kw = dict(SHAPES[shape], num_hidden_layers=layers)
    config = AutoConfig.for_model(kw.pop("model_type"), bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    print(f"[bench] writing a random {stored} {shape} model with {layers} layers to {path} ...", flush=True)
    write_random_checkpoint(config, path, quantization=stored, device=device)
    done.write_text(json.dumps({"shape": shape, "layers": layers, "stored": stored}))
    return path


def worker(a) -> None:
    """One measured training step (pocketrlhf's path) of setup ``a.worker`` at ``a.layers`` layers:
    SFT, or PPO's update (policy with the value head on it, stages.ppo.ActorCritic)."""
    import torch

    from pocketrlhf import measure
    from pocketrlhf.models.forward import LMWithHeads
    from pocketrlhf.models.heads import ScalarHead
    from pocketrlhf.models.policy import build_policy
    from pocketrlhf.stages import common
    from pocketrlhf.stages.ppo import ActorCritic
    from pocketrlhf.stages.sft import SFTConfig

    torch.set_num_threads(a.threads)
    name, shape, options, *_ = next(s for s in SETUPS if s[0] == a.worker)
    model_dir = build_model(Path(a.work), shape, a.layers, options["quantization"], a.device)
    keys = {f.name for f in dataclasses.fields(SFTConfig)}
    dtype = options.get("dtype", "bfloat16")
    if a.device == "cpu" and dtype == "float16":
        # torch's CPU backward of a float16 matmul falls back to a reference gemm (~50x slower than
        # bfloat16 here: the 20B update at one layer did not finish in 35 CPU-minutes). bfloat16 has
        # the same element size, so every live tensor has the same bytes: measure with it.
        dtype = "bfloat16"
    cfg = SFTConfig(model=str(model_dir), device=a.device, dtype=dtype,
                    **{k: v for k, v in options.items() if k in keys and k not in ("stage", "dtype")})
    started = time.time()
    model = build_policy(cfg)
    B, T = options["batch_size"], options["seq_length"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPES[shape]["vocab_size"] - 1, (B, T), generator=g).to(a.device)
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    if options["stage"] == "ppo":
        # PPO batches are padded (the planner counts the mask) and the loss reads the answer tokens.
        mask[-1, :4] = 0
        response = torch.zeros_like(mask)
        response[:, T - options["max_new_tokens"]:] = 1
        response *= mask
        head = ScalarHead(SHAPES[shape]["hidden_size"], init="zero").to(a.device)
        actor_critic = ActorCritic(model, head, shared_trunk=True)
        params += list(head.parameters())

        def loss():
            out = actor_critic(ids, mask, response, 1.0)
            return -(out["logprobs"] * response).sum() + (out["values"] * response).pow(2).sum()
    else:
        lm = LMWithHeads(model)

        def loss():
            return -(lm(ids, mask, mask)["logprobs"] * mask).sum() / mask.sum()

    step = measure.measure_steps(model, common.build_optimizer(params, cfg, a.device), loss)
    result = {"layers": a.layers, "static": step["static"], "optimizer": step["optimizer"], "peak": step["peak"],
              "total": step["static"] + step["peak"], "evicted": step["static"] - step["optimizer"] + step["peak"],
              "wall_s": time.time() - started, "measured_dtype": dtype}
    if a.device == "cuda":
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    write_result(Path(a.out), result)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def measured(a, work: Path, setup: tuple, depths: list[int | str]) -> dict | None:
    """The full-depth peak (and evicted peak) of one setup, measured at ``depths`` and extrapolated."""
    name, shape, options, *_ = setup
    full = SHAPES[shape]["num_hidden_layers"]
    rows = []
    for d in depths:
        layers = full if d == "full" else int(d)
        upcast = ("" if options.get("kbit_upcast", True) else "-noupcast") + \
            ("-reentrant" if options.get("reentrant_checkpointing") else "")
        res = run_child(str(Path(__file__).resolve()), name,
                        ["--layers", str(layers), "--work", str(work), "--device", a.device],
                        work / f"run-{shape}-{options['quantization']}-{layers}-{options['batch_size']}{upcast}",
                        a.threads)
        planned = plan_setup(work, shape, options, layers).setups[0]
        # PPO: the update measured holds no reward adapter and no rollouts; compare it with the plan less those.
        unmeasured = sum(x.bytes for x in planned.lines if x.key.startswith("reward")) \
            if options["stage"] == "ppo" else 0.0
        res["plan_total"], res["plan_evicted"] = planned.peak - unmeasured, planned.peak_evicted - unmeasured
        rows.append(res)
        print(f"  {name}, {layers} layers: measured {res['total'] / 1e9:.3f} GB (evicted {res['evicted'] / 1e9:.3f}); "
              f"plan {planned.peak / 1e9:.3f} GB ({planned.peak_evicted / 1e9:.3f}); {res['wall_s']:.0f} s", flush=True)
    out = {"rows": rows}
    if any(r["layers"] == full for r in rows):
        top = next(r for r in rows if r["layers"] == full)
        out.update(total=top.get("cuda_max_allocated", top["total"]), evicted=top["evicted"], how="full depth")
    elif len(rows) >= 2:
        xs = [r["layers"] for r in rows]
        for key in ("total", "evicted"):
            intercept, slope = fit_line(xs, [r[key] for r in rows])
            out[key] = intercept + slope * full
        out["how"] = f"{', '.join(map(str, xs))} layers, extrapolated"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default="")
    p.add_argument("--out", default="")
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--depths", default="1,2", help="comma-separated depths to measure ('full': the whole model)")
    p.add_argument("--no-measure", action="store_true", help="the planner's figures only")
    p.add_argument("--only", default="", help="comma-separated setup names (default: all)")
    p.add_argument("--work", default=str(ROOT / "bench" / "_work" / "published_setups"))
    a = p.parse_args()
    if a.worker:
        return worker(a)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    depths = [d.strip() for d in a.depths.split(",") if d.strip()]
    chosen = [s for s in SETUPS if not a.only or s[0] in a.only.split(",")]
    print(f"[bench] published setups; measure: {'no' if a.no_measure else a.depths} on {a.device}; {a.threads} "
          f"thread(s); {machine()}", flush=True)
    table, results = [], []
    for setup in chosen:
        name, shape, options, published, gpu, source = setup
        plan = plan_setup(work, shape, options)
        ours = plan.setups[0]
        in_gpu = plan_setup(work, shape, dict(options, gpu_memory=gpu or "80GB"), context="1GB")
        ours_gpu = in_gpu.setups[0]
        meas = None if a.no_measure else measured(a, work, setup, depths)
        if published is None:
            pub, ratio = "-", "-"
        elif isinstance(published, tuple):
            pub = f"{published[0]}-{published[1]}"
            ratio = "in range" if published[0] <= ours.peak / 1e9 <= published[1] else \
                f"{ours.peak / 1e9 / (published[1] if ours.peak / 1e9 > published[1] else published[0]):.2f} of the bound"
        else:
            pub, ratio = f"{published}", f"{ours.peak / 1e9 / published:.3f}"
        paged = f"{ours.peak_evicted / 1e9:.2f} ({ours.paged / 1e9:.2f} on CPU)" if ours.paged else "-"
        if gpu:
            fits = in_gpu.fits(ours_gpu)
            verdict = ("yes" if ours_gpu.peak <= in_gpu.gpu_memory else "yes, paging") if fits else "no"
        else:
            verdict = "-"
        meas_text = "-" if not meas else f"{meas['total'] / 1e9:.2f}" + (
            f" ({meas['evicted'] / 1e9:.2f} evicted)" if ours.paged else "")
        table.append([name, gpu or "-", pub, f"{ours.peak / 1e9:.2f}", ratio, paged, meas_text, verdict])
        results.append({"name": name, "shape": shape, "options": options, "published_gb": published, "gpu": gpu,
                        "source": source, "plan_peak": ours.peak, "plan_evicted": ours.peak_evicted,
                        "plan_paged": ours.paged, "fits_gpu": verdict, "measured": meas})
    print()
    print(markdown_table(["setup", "published GPU", "published GB", "plan GB", "plan / published",
                          "plan, paged state evicted GB", "measured GB (CPU)", "fits the GPU (plan + 1 GB context)"],
                         table))
    slug = "-".join(s[0].split()[0].lower() + s[0].split()[1].lower() for s in chosen) if a.only else "all"
    path = work / f"results-{a.device}-{slug}.json"
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "depths": depths,
                                "setups": results}, indent=2, default=str))
    print(f"\n[bench] results in {path}")


if __name__ == "__main__":
    main()
