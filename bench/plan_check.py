"""How close is `pocketrlhf plan` to the memory a real training step uses? One run, a markdown table.

    OMP_NUM_THREADS=1 python bench/plan_check.py            # tiny and small models, CPU, ~2 minutes
    OMP_NUM_THREADS=1 python bench/plan_check.py --quick    # the tiny models only

For each case a model is built locally (random init, pocketrlhf.models.tiny), loaded through the
real loading code (16-bit, LLM.int8 or NF4), and one real training step of pocketrlhf's own path
runs: SFT (stages.sft.build_policy + models.forward.LMWithHeads), the reward model
(models.roles.ScoreModel) or PPO's policy update with the value head on the policy
(stages.ppo.ActorCritic). Two optimizer steps run; the second is measured.

Measured, exactly, by watching every tensor storage the step creates (a TorchDispatchMode with
weakref finalizers), with the static bytes (weights with their quantization constants, buffers,
optimizer state) counted from the live objects:
  held  = bytes still alive at the end of the forward pass (what autograd keeps for backward);
  peak  = static bytes + the highest live bytes during forward + backward.
The planner's numbers for the same configuration: held = activations + log-probs lines; peak =
static lines + the training-step lines (cuda_context set to 0). On a GPU (not done yet: no GPU
here) the same comparison would use torch.cuda.max_memory_allocated, which also sees allocator
rounding.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pocketrlhf import plan as P
from pocketrlhf.models.tiny import build_tiny_model

SIZES = {
    "tiny": dict(hidden_size=64, layers=2, heads=4, intermediate_size=128),
    "small": dict(hidden_size=256, layers=4, heads=8, intermediate_size=688),
}


def measure(model, params, cfg, loss_fn) -> dict:
    from pocketrlhf.measure import measure_steps
    from pocketrlhf.stages import common

    step = measure_steps(model, common.build_optimizer(params, cfg, "cpu"), loss_fn)
    return {"held": step["held"], "peak": step["static"] + step["peak"]}


def run_case(model_dir: Path, case: dict) -> tuple[dict, dict]:
    from pocketrlhf.models import forward
    from pocketrlhf.models.forward import LMWithHeads
    from pocketrlhf.models.heads import ScalarHead
    from pocketrlhf.models.policy import build_policy
    from pocketrlhf.stages.sft import SFTConfig

    stage, B, T = case["stage"], case["batch"], case["seq"]
    forward._RECOMPUTE_LOGITS_ABOVE, forward._CHUNK_ROWS = (0, 64) if case.get("recompute") else (1 << 25, 2048)
    cfg = SFTConfig(model=str(model_dir), device="cpu", dtype=case["dtype"], quantization=case["quant"], lora_r=8,
                    gradient_checkpointing=case["gc"], target_modules=case.get("targets", "all-linear"),
                    optimizer=case.get("optimizer", "adamw"), adapter_dtype=case.get("adapter_dtype", "float32"))
    torch.manual_seed(0)
    model = build_policy(cfg)
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    hidden = model.get_base_model().config.hidden_size
    rows = 2 * B if stage == "rm" else B
    ids = torch.randint(1, vocab - 1, (rows, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if case["padded"]:
        mask[-1, -5:] = 0
    params = [p for p in model.parameters() if p.requires_grad]
    if stage == "sft":
        lm = LMWithHeads(model)

        def loss():
            return -(lm(ids, mask, mask)["logprobs"] * mask).sum() / mask.sum()
    elif stage == "rm":
        from pocketrlhf.models.roles import ScoreModel

        head = ScalarHead(hidden)
        scorer = ScoreModel(model, head)
        params += list(head.parameters())

        def loss():
            chosen, rejected = scorer(ids, mask).chunk(2)
            return -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    else:
        from pocketrlhf.stages.ppo import ActorCritic

        head = ScalarHead(hidden, init="zero")
        actor_critic = ActorCritic(model, head, shared_trunk=True)
        params += list(head.parameters())
        response = torch.zeros_like(mask)
        response[:, T - case["new"]:] = 1
        response *= mask

        def loss():
            out = actor_critic(ids, mask, response, 1.0)
            return -(out["logprobs"] * response).sum() + (out["values"] * response).pow(2).sum()

    measured = measure(model, params, cfg, loss)
    plan_cfg = P.PlanConfig(model=str(model_dir), stage=stage, quantization=case["quant"], dtype=case["dtype"],
                            lora_r=8, target_modules=case.get("targets", "all-linear"), batch_size=B, seq_length=T,
                            packing=not case["padded"], gradient_checkpointing=case["gc"],
                            optimizer=case.get("optimizer", "adamw"), max_new_tokens=case.get("new", 1),
                            value_model="head", reference="base", cuda_context="0GB",
                            adapter_dtype=case.get("adapter_dtype", "float32"))
    ours = P.plan_memory(P.model_shape(P.read_config(str(model_dir))), plan_cfg).setups[0]
    get = lambda key: sum(x.bytes for x in ours.lines if x.key == key)
    held = get("activations") + get("logits")
    if stage == "ppo":  # the training step only (not the rollouts), without the frozen reward model
        peak = ours.static - get("reward_weights") - get("reward_head") + ours.phase_total("train")
    else:
        peak = ours.peak
    return measured, {"held": held, "peak": peak}


def cases(quick: bool) -> list[tuple[str, str, dict]]:
    base = dict(stage="sft", batch=4, seq=64, dtype="bfloat16", quant="none", gc=False, padded=False)
    out = []
    for arch in ("llama", "mistral", "qwen2", "gpt2", "gpt_neox"):
        out.append(("tiny", arch, base))
    out += [
        ("tiny", "llama", dict(base, dtype="float32")),
        ("tiny", "llama", dict(base, gc=True, padded=True)),
        ("tiny", "llama", dict(base, quant="4bit", padded=True)),
        ("tiny", "llama", dict(base, quant="8bit", targets="q_proj,v_proj", recompute=True)),
        ("tiny", "gpt2", dict(base, dtype="float32", gc=True, padded=True)),
        ("tiny", "gpt_neox", dict(base, quant="4bit", padded=True, recompute=True)),
        ("tiny", "llama", dict(base, stage="rm", batch=3, seq=48, padded=True)),
        ("tiny", "llama", dict(base, stage="ppo", padded=True, new=24)),
        # 16-bit adapters (QLoRA's setting): on a 16-bit stream and on the fp32 stream of a k-bit base.
        ("tiny", "llama", dict(base, adapter_dtype="bfloat16")),
        ("tiny", "llama", dict(base, quant="4bit", gc=True, adapter_dtype="bfloat16", optimizer="paged_adamw")),
    ]
    if not quick:
        out += [
            ("small", "llama", dict(base, batch=4, seq=128)),
            ("small", "llama", dict(base, batch=4, seq=128, quant="4bit", gc=True)),
            ("small", "qwen2", dict(base, batch=2, seq=256, padded=True, optimizer="adamw_8bit")),
            ("small", "gpt_neox", dict(base, batch=4, seq=128, quant="8bit")),
            ("small", "llama", dict(base, stage="ppo", batch=4, seq=128, padded=True, new=64, quant="4bit")),
            ("small", "llama", dict(base, batch=1, seq=512, quant="4bit", gc=True, adapter_dtype="bfloat16",
                                    optimizer="paged_adamw")),
            ("small", "gpt_neox", dict(base, batch=4, seq=128, dtype="float32", adapter_dtype="bfloat16",
                                       optimizer="paged_adamw_8bit")),
        ]
    return out


def describe(case: dict) -> str:
    bits = [case["stage"], case["quant"] if case["quant"] != "none" else case["dtype"],
            f"{case['batch']}x{case['seq']}"]
    if case["gc"]:
        bits.append("checkpointing")
    if case["padded"]:
        bits.append("padded")
    if case.get("targets"):
        bits.append(case["targets"])
    if case.get("optimizer"):
        bits.append(case["optimizer"])
    if case.get("recompute"):
        bits.append("chunked log-probs")
    if case.get("adapter_dtype"):
        bits.append(f"{case['adapter_dtype']} adapters")
    return ", ".join(bits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models only")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pocketrlhf.stages.common import setup_logging

    setup_logging()
    start = time.time()
    rows = []
    worst = {"held": 0.0, "peak": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[tuple[str, str], Path] = {}
        for size, arch, case in cases(args.quick):
            if (size, arch) not in built:
                built[size, arch] = build_tiny_model(Path(tmp) / f"{size}-{arch}", arch, vocab_size=320, **SIZES[size])
            measured, planned = run_case(built[size, arch], case)
            ratios = {k: planned[k] / measured[k] for k in ("held", "peak")}
            for k, r in ratios.items():
                worst[k] = max(worst[k], abs(r - 1))
            rows.append(f"| {size} {arch} | {describe(case)} | {measured['held'] / 1e6:.2f} | {planned['held'] / 1e6:.2f} "
                        f"| {ratios['held']:.3f} | {measured['peak'] / 1e6:.2f} | {planned['peak'] / 1e6:.2f} "
                        f"| {ratios['peak']:.3f} |")
            print(rows[-1], flush=True)
    print()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {time.time() - start:.0f} s")
    print("| model | case | held MB (measured) | held MB (plan) | plan/measured | peak MB (measured) | peak MB (plan) "
          "| plan/measured |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nlargest deviation: held {worst['held']:.1%}, peak {worst['peak']:.1%}")


if __name__ == "__main__":
    main()
