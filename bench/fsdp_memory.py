"""Per-process memory of one SFT step and one PPO step under DDP and under FSDP (2 CPU processes, gloo).

    OMP_NUM_THREADS=1 python bench/fsdp_memory.py                 # a ~37M-parameter fp32 llama (16 layers)
    OMP_NUM_THREADS=1 python bench/fsdp_memory.py --size small    # a quick check of the script

Each setup is a real ``accelerate launch`` of this file with examples/accelerate/cpu_ddp.yaml or
cpu_fsdp.yaml; each process builds the policy the way ``pocketrlhf sft`` does (frozen base + LoRA,
``stages.common.prepare``: DDP, or FSDP2 per decoder layer), then takes two optimizer steps on a
fixed batch and reports, for the second (pocketrlhf.measure's tracker with ``follow_resizes``: FSDP2
frees a gathered layer by resizing its storage to 0, which the default count would miss; MB = 10^6 bytes):
  * static: this process's weights (its shard under FSDP, adapters included), buffers and optimizer state;
  * peak: the highest sum of tensors alive during forward + backward + gradient sync above static
    (under FSDP it includes the layer weights gathered for the forward and again for the backward).
The PPO rows build the roles the way ``pocketrlhf ppo`` does (policy adapter, value head, the
reference = adapters off, a rule reward; ``stages.online.wrap``: DDP, or FSDP2 with every role's
forward through the sharded root) and take two steps; for the second, the peak of the rollout
phase (sampling ``--max-new-tokens`` tokens with the KV cache, on FSDP one all-gather per layer per
token) and of the learning phase (old/value/reference passes + one PPO epoch) are reported apart.
The base is fp32 so that nothing but the layout differs. A GPU adds the CUDA context and allocator
rounding; the DDP bucket buffers (gradients of the trained adapter only) are in both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"small": dict(hidden_size=64, layers=2, vocab_size=512, seq=32),
         "default": dict(hidden_size=512, layers=16, vocab_size=2000, seq=128)}


def child(model_dir: str, out: str, seq: int, batch: int) -> None:
    import torch

    from pocketrlhf.measure import LiveTensors, static_bytes, storage_bytes
    from pocketrlhf.models.forward import LMWithHeads
    from pocketrlhf.models.loading import load_tokenizer
    from pocketrlhf.models.policy import build_policy
    from pocketrlhf.stages import common
    from pocketrlhf.stages.sft import SFTConfig

    cfg = SFTConfig(model=model_dir, quantization="none", device="cpu", lora_r=16, lora_dropout=0.0, progress=False)
    accelerator = common.make_accelerator("cpu", "sft", common.OFFLINE_STRATEGIES)
    common.set_seed(0)
    model = build_policy(cfg, load_tokenizer(model_dir), total_steps=10)
    module, params, optimizer, _ = common.prepare(accelerator, LMWithHeads(model), cfg, 10)
    g = torch.Generator().manual_seed(accelerator.process_index)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)

    result = {}
    for _ in range(2):
        static = static_bytes(module, optimizer)
        tracker = LiveTensors(set(static), follow_resizes=True)
        with tracker:
            logps = module(ids, mask, mask)
            loss = -logps["logprobs"].sum() / mask.sum()
            loss.backward()
            common.sync_gradients(accelerator, module, params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result = {"static": sum(static.values()), "peak": tracker.peak,
                  "weights": sum(storage_bytes(module.parameters()).values())}
    result.update(common.strategy(accelerator), rank=accelerator.process_index)
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


def new_tokens_for(seq: int) -> int:
    return min(32, seq // 2)  # sampled per rollout; the prompt takes the rest of seq


def child_ppo(model_dir: str, out: str, seq: int, batch: int) -> None:
    import torch

    from pocketrlhf.measure import LiveTensors, static_bytes, storage_bytes
    from pocketrlhf.models.generation import row_seed
    from pocketrlhf.models.loading import load_tokenizer
    from pocketrlhf.stages import common, online, ppo

    new_tokens = new_tokens_for(seq)
    cfg = ppo.PPOConfig(model=model_dir, quantization="none", device="cpu", lora_r=16, lora_dropout=0.0,
                        progress=False, reward_function="pocketrlhf.data.synthetic:sentiment_reward",
                        rollouts_per_step=2 * batch, batch_size=batch, gradient_accumulation_steps=1, ppo_epochs=1,
                        max_new_tokens=new_tokens, generation_batch_size=batch, reference="base", adaptive_kl=False)
    accelerator = common.make_accelerator("cpu", "ppo", common.ONLINE_STRATEGIES)
    common.set_seed(0)
    tokenizer = load_tokenizer(model_dir)
    algorithm = ppo.PPO(cfg)
    roles = algorithm.build_roles(cfg, 10)
    module = online.wrap(accelerator, algorithm.trained_module(roles), roles)
    optimizer = common.build_optimizer(roles.trainable, cfg, "cpu")
    scheduler = common.build_scheduler(optimizer, cfg, 10)
    rank = accelerator.process_index
    ctx = online.StepContext(roles, accelerator, module, optimizer, scheduler, lambda x: accelerator.reduce(x, "sum"),
                             accelerator.gather)
    g = torch.Generator().manual_seed(rank)
    prompts = online.Prompts([torch.randint(3, 100, (seq - new_tokens,), generator=g).tolist() for _ in range(batch)],
                             [{} for _ in range(batch)])

    result = {}
    for step in range(2):
        static = static_bytes(module, optimizer)
        tracker = LiveTensors(set(static), follow_resizes=True)
        with tracker:
            r = online.generate_rollouts(cfg, roles, tokenizer, prompts,
                                         [row_seed(0, step, rank * batch + i) for i in range(batch)])
            rollout_peak = tracker.take_window()
            algorithm.learn(step, r, ctx)
            learn_peak = tracker.take_window()
        result = {"static": sum(static.values()), "peak": tracker.peak, "rollout_peak": rollout_peak,
                  "learn_peak": learn_peak, "weights": sum(storage_bytes(module.parameters()).values())}
    result.update(common.strategy(accelerator), rank=rank)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def launch(config: str, model_dir: Path, out: Path, seq: int, batch: int, stage: str = "sft") -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / config), "--num_processes", "2", "--main_process_port", "0",
           "--num_cpu_threads_per_process", "1", __file__, f"--child-{stage}", str(model_dir), str(out), str(seq), str(batch)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--child-sft", "--child-ppo"):
        (child if sys.argv[1] == "--child-sft" else child_ppo)(sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                                               int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="default")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    size = dict(SIZES[args.size])
    seq = size.pop("seq")
    sys.path.insert(0, str(ROOT))
    from pocketrlhf.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", "llama", heads=8 if size["hidden_size"] >= 512 else 4,
                                     **size)
        rows = {name: launch(f"cpu_{name}.yaml", model_dir, Path(tmp) / name, seq, args.batch_size)
                for name in ("ddp", "fsdp")}
        ppo_rows = {name: launch(f"cpu_{name}.yaml", model_dir, Path(tmp) / f"ppo_{name}", seq, args.batch_size,
                                 "ppo") for name in ("ddp", "fsdp")}
    mb = 1e6
    print(f"{args.size}: llama hidden {size['hidden_size']}, {size['layers']} layers, vocab {size['vocab_size']}, "
          f"fp32; LoRA r=16; batch {args.batch_size} x {seq} tokens per process; 2 processes")
    print(f"{'setup':6} {'rank':>4} {'weights MB':>11} {'static MB':>10} {'step peak MB':>13} {'total MB':>9}")
    for name, ranks in rows.items():
        for r in ranks:
            print(f"{name:6} {r['rank']:>4} {r['weights'] / mb:>11.1f} {r['static'] / mb:>10.1f} "
                  f"{r['peak'] / mb:>13.1f} {(r['static'] + r['peak']) / mb:>9.1f}")
        assert all(r["strategy"] == name for r in ranks), ranks
    new = new_tokens_for(seq)
    print(f"\nppo: {2 * args.batch_size} rollouts per step ({args.batch_size} per process), prompts of {seq - new} "
          f"tokens + {new} sampled, value head, reference = adapters off")
    print(f"{'setup':6} {'rank':>4} {'weights MB':>11} {'static MB':>10} {'rollout peak':>13} {'learn peak':>11} "
          f"{'total MB':>9}")
    for name, ranks in ppo_rows.items():
        for r in ranks:
            print(f"{name:6} {r['rank']:>4} {r['weights'] / mb:>11.1f} {r['static'] / mb:>10.1f} "
                  f"{r['rollout_peak'] / mb:>13.1f} {r['learn_peak'] / mb:>11.1f} {(r['static'] + r['peak']) / mb:>9.1f}")
        assert all(r["strategy"] == name for r in ranks), ranks


if __name__ == "__main__":
    main()
