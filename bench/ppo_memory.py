"""Peak memory of one PPO step: pocketrlhf's shared base vs a naive four-model setup, one run.

    OMP_NUM_THREADS=1 python bench/ppo_memory.py                  # ~196M-parameter llama, fp32 and 4-bit
    OMP_NUM_THREADS=1 python bench/ppo_memory.py --size small     # a quick check of the script

Setups (each in its own child process, one after another):
  * pocketrlhf (value head): ``stages.ppo.train`` for one PPO step, as shipped: ONE base, policy
    LoRA (trained), value head on the policy's hidden states (trained), reward LoRA + head
    (frozen, from a saved reward adapter), reference = the base with adapters disabled;
  * pocketrlhf (value adapter): the same with ``--value-model adapter`` (a second trained LoRA +
    head on the same base, its own forward and backward);
  * naive: four models, each doing its role, the way one would write PPO with separate models
    (OpenRLHF/DeepSpeed-Chat style): policy = base copy 1 + LoRA (trained); reference = base
    copy 2; value = base copy 3 + LoRA + head (trained, separate forward and backward after the
    policy's, like a separate critic); reward = base copy 4 + the same reward LoRA + head (frozen).
    It uses pocketrlhf's own building blocks for everything that is not the layout: the loading
    code, ``models.generation.sample``, ``models.forward.response_logprobs`` /
    ``final_hidden_states``, the PPO math of ``pocketrlhf.algorithms.ppo`` (KL penalty, GAE,
    whitening, clipped policy and value losses), one AdamW over both trained adapters and the head.

The same for every setup: the model, the prompts (the first PPO step's prompts), the rollout
(pure sampling at T=1, ``--max-new-tokens``; a random-init model rarely emits EOS, so every
response has the full length), micro-batch ``--batch-size``, ``--rollouts`` per step,
``--grad-accum`` micro-batches per optimizer step, ``--ppo-epochs`` (1) epochs of rollouts / (batch x
accum) optimizer steps (>= 2 in all, so that a backward runs while the AdamW state exists), no gradient
checkpointing unless ``--gradient-checkpointing``. Weights are fp32 (``--quantization none``) or
NF4 with double quantization and bf16 compute (``4bit``) on the CPU; every 4-bit base is loaded
for training (bitsandbytes' generic CPU kernel; pocketrlhf loads its one base that way too).

Memory, per child process, in MB (10^6 bytes) above the process's RSS after imports:
  * peak live tensors: every tensor storage created after the imports is tracked while it lives
    (a TorchDispatchMode with weakref finalizers, pocketrlhf.measure.LiveTensors); the peak of
    their sum is what a GPU would have to hold (torch.cuda.max_memory_allocated, less allocator
    rounding). The primary number.
  * peak RSS (/proc/self/status VmHWM): during the step (VmHWM reset once the models are loaded)
    and over the whole run (loading has transients of its own: the file's pages while weights are
    copied out of it, the fp32 weights before 4-bit quantization). The children run with glibc's
    mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the OS and
    RSS follows live memory; glibc's default raises the threshold up to 32 MiB after frees and
    keeps weight-sized blocks in its heap, which made RSS depend on allocation history
    (``--default-malloc`` restores it).
  * static tensor bytes: unique storages of parameters and buffers (with bitsandbytes'
    quantization constants), gradients (= the trained parameters' size), AdamW state after the step.
  * the live-tensor peak and RSS at the end of each phase (generation, scoring, old/ref/value
    pass, update), and each phase's own live-tensor peak.
transformers maps safetensors files lazily on the CPU: a tensor that stays a view of the file is
not private memory, and four models read from one file would share pages that four GPU copies
could not. Every setup therefore copies each loaded weight into private memory right after loading
(as a GPU load does); ``--no-materialize`` turns that off.

The plan of ``pocketrlhf plan --stage ppo`` for the same configuration (CUDA context 0) is printed
next to the measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_harness_args, chosen_sides, count_parameters, machine, now, proc_status,  # noqa: E402
                     reset_peak_rss, review_llama, run_child, save_summary, start_worker, write_result)

SIZES = {
    # ~196M parameters: 8 layers of 1536 (MLP 4096, 12 heads of 128, 2 KV heads), vocabulary 320.
    "full": dict(hidden_size=1536, layers=8, heads=12, intermediate_size=4096),
    # A quick check of the script (~25M parameters).
    "small": dict(hidden_size=512, layers=8, heads=8, intermediate_size=1536),
}
SETUPS = ("ours-head", "ours-adapter", "naive")
LABELS = {"ours-head": "pocketrlhf (value head)", "ours-adapter": "pocketrlhf (value adapter)",
          "naive": "naive (4 models)"}
MB = 1e6


def prepare(work: Path, size: str, lora_r: int) -> dict:
    from pocketrlhf.data import synthetic

    spec = SIZES[size]
    model = review_llama(work / f"llama-{size}", spec["hidden_size"], spec["layers"], spec["heads"],
                         spec["intermediate_size"])
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in synthetic.prompt_rows(256, seed=2)))
    reward = work / f"reward-{size}-r{lora_r}"
    if not (reward / "head.safetensors").is_file():
        write_reward_adapter(model, reward, lora_r)
    return {"model": str(model), "prompts": str(prompts), "reward": str(reward)}


def write_reward_adapter(model: Path, reward: Path, lora_r: int, quantization: str = "none") -> None:
    """A reward adapter + head as `pocketrlhf rm` saves them (its values do not matter here)."""
    from pocketrlhf.models.adapters import attach_adapter, make_peft_config, save_adapter, write_adapter_info
    from pocketrlhf.models.heads import ScalarHead
    from pocketrlhf.models.loading import load_base
    from pocketrlhf.models.policy import hidden_size

    base = load_base(str(model), quantization=quantization, device="cpu", training=True)
    peft_model = attach_adapter(base, make_peft_config("lora", lora_r, 2.0 * lora_r, 0.0, "all-linear"))
    save_adapter(peft_model, reward)
    ScalarHead(hidden_size(base), init="reward").save(reward, metadata={"reward_mean": 0.0, "reward_std": 1.0})
    write_adapter_info(reward, stage="rm", template="plain", base_model=str(model), quantization=quantization,
                       reward_mean=0.0, reward_std=1.0)


def ppo_config(a, files: dict, out: Path, value_model: str = "head"):
    from pocketrlhf.stages import ppo

    return ppo.PPOConfig(
        model=files["model"], prompts=files["prompts"], reward_adapter=files["reward"], output_dir=str(out / "run"),
        device=a.device, dtype=a.dtype, quantization=a.quantization, eval_fraction=0.0, value_model=value_model,
        reference="sft", max_steps=1, rollouts_per_step=a.rollouts, generation_batch_size=a.rollouts, batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, ppo_epochs=a.ppo_epochs, max_prompt_length=a.max_prompt_length,
        max_new_tokens=a.max_new_tokens, temperature=1.0, lora_r=a.lora_r, lora_alpha=2.0 * a.lora_r, lora_dropout=0.0, target_modules="all-linear",
        gradient_checkpointing=a.gradient_checkpointing, learning_rate=1e-5, progress=False, seed=0,
    )


# ---------------------------------------------------------------------------------------------
# Accounting.


def quant_state_bytes(p) -> int:
    """bitsandbytes' per-block constants of a 4-bit weight (absmax, nested absmax, code)."""
    qs = getattr(p, "quant_state", None)
    if qs is None:
        return 0
    total = 0
    for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
        if t is not None:
            total += t.numel() * t.element_size()
    nested = getattr(qs, "state2", None)
    if nested is not None:
        for t in (nested.absmax, nested.code):
            total += t.numel() * t.element_size()
    return total


def tensor_bytes(modules: list, trainable: list, optimizer) -> dict:
    """Unique storages of the modules' parameters and buffers; gradients and AdamW state."""
    seen: set[int] = set()
    weights = 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            weights += t.untyped_storage().nbytes() + quant_state_bytes(t)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if hasattr(v, "numel") and v.dim() > 0)
    return {"weights": weights, "grads": grads, "optimizer": state, "total": weights + grads + state}


def materialize_loads() -> None:
    """Make every base loaded through pocketrlhf's load_base own its weights (see the docstring)."""
    import torch

    from pocketrlhf.models import loading

    original = loading.load_base

    def load_base(*args, **kwargs):
        model = original(*args, **kwargs)
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and type(p) is torch.nn.Parameter:  # bitsandbytes' own types are fresh already
                    module._parameters[name] = torch.nn.Parameter(p.data.clone(), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.clone()
        return model

    loading.load_base = load_base


class Phases:
    """The process's peak RSS at the end of each phase of the step (cumulative)."""

    def __init__(self, baseline: int, tracker):
        self.baseline, self.tracker = baseline, tracker
        self.marks: dict[str, dict[str, float]] = {}
        self.load_peak_rss = 0.0

    def mark(self, name: str) -> None:
        import torch

        s = proc_status()
        self.marks[name] = {"peak_rss": (s["VmHWM"] - self.baseline) / MB, "rss": (s["VmRSS"] - self.baseline) / MB,
                            "live_peak": self.tracker.peak / MB, "live": self.tracker.current / MB,
                            "phase_live_peak": self.tracker.take_window() / MB}
        if torch.cuda.is_initialized():
            self.marks[name].update(cuda_peak=torch.cuda.max_memory_allocated() / MB,
                                    cuda_reserved_peak=torch.cuda.max_memory_reserved() / MB)
        if name == "before step":
            # Loading has transients of its own (the file's pages while weights are copied out of it,
            # fp32 weights before 4-bit quantization): the step's peak is measured from here.
            self.load_peak_rss = self.marks[name]["peak_rss"]
            reset_peak_rss()


# ---------------------------------------------------------------------------------------------
# Workers.


def run_ours(a, files: dict, out: Path, phases: Phases, value_model: str) -> dict:
    from pocketrlhf.models import generation
    from pocketrlhf.stages import ppo

    cfg = ppo_config(a, files, out, value_model)
    found: dict = {}
    generate, old_pass, update = ppo.generate_rollouts, ppo.old_policy_pass, ppo.ppo_update
    generate_tokens = generation.sample

    def generate_rollouts(*args, **kwargs):
        if "before step" not in phases.marks:
            phases.mark("before step")
        r = generate(*args, **kwargs)
        phases.mark("scoring")
        found["response_tokens"] = int(r.response_mask.sum())
        found["sequence_length"] = int(r.input_ids.shape[1])
        return r

    def old_policy_pass(*args, **kwargs):
        out_ = old_pass(*args, **kwargs)
        phases.mark("old/ref/value pass")
        return out_

    def ppo_update(cfg, roles, module, r, old, advantages, returns, optimizer, *rest, **kwargs):
        stats = update(cfg, roles, module, r, old, advantages, returns, optimizer, *rest, **kwargs)
        phases.mark("update")
        found["tensors"] = tensor_bytes([roles.model, roles.value_head], roles.trainable, optimizer)
        found["optimizer_steps"] = (cfg.rollouts_per_step // (cfg.batch_size * cfg.gradient_accumulation_steps)
                                    * cfg.ppo_epochs)
        return stats

    def sample(*args, **kwargs):  # generation alone: its KV cache is gone by the time the rollouts are scored
        tokens = generate_tokens(*args, **kwargs)
        phases.mark("generation")
        return tokens

    ppo.generate_rollouts, ppo.old_policy_pass, ppo.ppo_update = generate_rollouts, old_policy_pass, ppo_update
    generation.sample = sample
    ppo.train(cfg)
    return found


def run_naive(a, files: dict, out: Path, phases: Phases) -> dict:
    import torch

    from pocketrlhf.algorithms.ppo import gae, kl_per_token, masked_whiten, penalized_rewards, policy_loss, value_loss
    from pocketrlhf.data.tokenize import TokenExample, collate
    from pocketrlhf.models.adapters import load_adapter
    from pocketrlhf.models.forward import disable_dropout, final_hidden_states, response_logprobs, token_aligned
    from pocketrlhf.models.generation import row_seed, sample
    from pocketrlhf.models.heads import ScalarHead
    from pocketrlhf.models.loading import load_tokenizer
    from pocketrlhf.models.roles import read_at_last_token
    from pocketrlhf.stages import common, ppo
    from pocketrlhf.models.policy import hidden_size
    from pocketrlhf.models.policy import build_policy

    from pocketrlhf.models import loading

    cfg = ppo_config(a, files, out)
    common.set_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    train_prompts, _, _ = ppo.prepare_prompts(cfg, tok)
    prompt_ids = [train_prompts.ids[i] for i in ppo.step_prompts(cfg, 0, len(train_prompts), 0, 1, cfg.rollouts_per_step)]

    def frozen_base():
        # Loaded for training like the others: on the CPU, 4-bit eval-mode repacking is a bitsandbytes
        # detail that would make the comparison about kernels instead of layouts.
        m = loading.load_base(cfg.model, cfg.quantization, cfg.quant_type, cfg.double_quant, cfg.compute_dtype,
                              cfg.dtype, cfg.device, training=True)
        disable_dropout(m)
        return m.eval()

    policy = build_policy(cfg, total_steps=1)  # base copy 1 + trained LoRA
    reference = frozen_base()  # base copy 2
    value_model = build_policy(cfg, total_steps=1)  # base copy 3 + trained LoRA
    value_head = ScalarHead(hidden_size(value_model), init="zero")
    reward_model = load_adapter(frozen_base(), files["reward"], trainable=False).eval()  # base copy 4 + frozen LoRA
    reward_head = ScalarHead.load(files["reward"]).requires_grad_(False)
    for m in (policy, value_model):
        disable_dropout(m)
    trainable = ([p for p in policy.parameters() if p.requires_grad] + [p for p in value_model.parameters()
                                                                         if p.requires_grad]
                 + list(value_head.parameters()))
    optimizer = common.build_optimizer(trainable, cfg, cfg.device)
    phases.mark("before step")

    # Rollout and scoring.
    responses = sample(policy, tok, prompt_ids, cfg.max_new_tokens, cfg.temperature, batch_size=cfg.generation_batch_size,
                       row_seeds=[row_seed(cfg.seed, 0, i) for i in range(len(prompt_ids))])  # as stages/ppo.py samples
    phases.mark("generation")
    batch = collate([TokenExample(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompt_ids, responses)],
                    tok.pad_token_id)
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    has_eos = torch.tensor([bool(r) and r[-1] == tok.eos_token_id for r in responses])
    B = cfg.batch_size
    with torch.no_grad():
        scores = torch.cat([read_at_last_token(reward_head, final_hidden_states(reward_model, ids[i:i + B],
                                                                                attn[i:i + B]), attn[i:i + B])
                            for i in range(0, len(ids), B)]).float()
    scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
    phases.mark("scoring")

    # Old log-probs and values, reference log-probs.
    def values_of(i, j):
        return token_aligned(value_head(final_hidden_states(value_model, ids[i:j], attn[i:j])))

    with torch.no_grad():
        old_lp, old_v, ref_lp = [], [], []
        for i in range(0, len(ids), B):
            old_lp.append(response_logprobs(policy, ids[i:i + B], attn[i:i + B], resp[i:i + B], cfg.temperature,
                                            return_entropy=True).logprobs)
            old_v.append(values_of(i, i + B).float())
            ref_lp.append(response_logprobs(reference, ids[i:i + B], attn[i:i + B], resp[i:i + B],
                                            cfg.temperature).logprobs)
        old_lp, old_v, ref_lp = torch.cat(old_lp), torch.cat(old_v), torch.cat(ref_lp)
    mask = resp.float()
    kl = kl_per_token(old_lp, ref_lp, cfg.kl_estimator) * mask
    rewards = penalized_rewards(scores, kl, mask, cfg.kl_coef)
    advantages, returns = gae(rewards, old_v, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask)
    phases.mark("old/ref/value pass")

    # PPO epochs: the policy's forward + backward, then the critic's.
    generator = torch.Generator().manual_seed(cfg.seed)
    minibatch = B * cfg.gradient_accumulation_steps
    steps = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(ids), generator=generator).tolist()
        for start in range(0, len(ids), minibatch):
            rows = order[start:start + minibatch]
            tokens = mask[rows].sum().clamp(min=1)
            for m in range(0, len(rows), B):
                idx = torch.tensor(rows[m:m + B])
                share = mask[idx].sum() / tokens
                lp = response_logprobs(policy, ids[idx], attn[idx], resp[idx], cfg.temperature).logprobs
                pg = policy_loss(lp, old_lp[idx], advantages[idx], mask[idx], cfg.cliprange)
                (pg.loss * share).backward()
                v = token_aligned(value_head(final_hidden_states(value_model, ids[idx], attn[idx])))
                vf, _ = value_loss(v, old_v[idx], returns[idx], mask[idx], cfg.cliprange_value)
                (cfg.vf_coef * vf * share).backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    phases.mark("update")
    return {"tensors": tensor_bytes([policy, reference, value_model, value_head, reward_model, reward_head], trainable,
                                    optimizer),
            "optimizer_steps": steps, "response_tokens": int(resp.sum()), "sequence_length": int(ids.shape[1])}


def import_stage() -> None:
    from pocketrlhf.stages import ppo  # noqa: F401


def worker(a) -> None:
    import torch

    files, out = start_worker(a, import_stage)
    if not a.no_materialize:
        materialize_loads()
    # Every tensor storage created from here on (weights included: they are copied by materialize)
    # is tracked while it lives: the peak of their sum is what a GPU would have to hold.
    from pocketrlhf.measure import LiveTensors

    tracker = LiveTensors(ignore=set())
    baseline = proc_status()["VmRSS"]
    reset_peak_rss()
    phases = Phases(baseline, tracker)
    wall, cpu = now()
    with tracker:
        if a.worker == "naive":
            found = run_naive(a, files, out, phases)
        else:
            found = run_ours(a, files, out, phases, "adapter" if a.worker == "ours-adapter" else "head")
    wall2, cpu2 = now()
    status = proc_status()
    step_peak = (status["VmHWM"] - baseline) / MB
    if torch.cuda.is_initialized():  # what the GPU's allocator held: the number the GPU goals are about
        found.update(cuda_peak_mb=torch.cuda.max_memory_allocated() / MB,
                     cuda_reserved_peak_mb=torch.cuda.max_memory_reserved() / MB,
                     cuda_total_mb=torch.cuda.get_device_properties(0).total_memory / MB,
                     cuda_device=torch.cuda.get_device_name(0))
    write_result(out, {**found, "baseline_rss_mb": baseline / MB, "peak_mb": step_peak,
                       "load_peak_mb": phases.load_peak_rss, "run_peak_mb": max(step_peak, phases.load_peak_rss),
                       "live_peak_mb": tracker.peak / MB, "phases_mb": phases.marks, "wall_s": wall2 - wall,
                       "cpu_s": cpu2 - cpu})


# ---------------------------------------------------------------------------------------------
# Driver.


def planned(a, files: dict, sequence_length: int, value_model: str) -> dict:
    """pocketrlhf plan's static and peak bytes for pocketrlhf and the naive LoRA layout."""
    from pocketrlhf import plan

    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if a.device == "cuda" else "float32")  # as load_base has it
    cfg = plan.PlanConfig(model=files["model"], stage="ppo", quantization=a.quantization, dtype=dtype,
                          lora_r=a.lora_r, batch_size=a.batch_size, seq_length=sequence_length,
                          max_new_tokens=a.max_new_tokens, generation_batch_size=a.rollouts, value_model=value_model,
                          reference="base", gradient_checkpointing=a.gradient_checkpointing, cuda_context="0GB")
    result = plan.to_json(plan.plan_memory(plan.model_shape(plan.read_config(cfg.model)), cfg))
    return {s["name"]: {"static_mb": (s["static_bytes"] or 0) / MB, "peak_mb": (s["peak_bytes"] or 0) / MB}
            for s in result["setups"] if s["available"]}


def step_args(a) -> list[str]:
    """The worker options beyond the layout's (shared with bench/ppo_big_step.py)."""
    return ["--ppo-epochs", str(a.ppo_epochs), "--max-prompt-length", str(a.max_prompt_length), "--dtype", a.dtype,
            "--device", a.device]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--quantization", default="none,4bit", help="comma-separated: none (fp32), 4bit")
    p.add_argument("--rollouts", type=int, default=16, help="responses sampled in the step (one generate batch)")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch (forward/backward)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="weights/compute dtype of the unquantized parts (auto: fp32 on a CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-materialize", action="store_true", help="leave weights mapped from the safetensors file")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold (see the code)")
    add_harness_args(p, "ppo_memory", SETUPS, sides_flag="--setups", rounds_kept=None)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work, a.size, a.lora_r)
    n_params = count_parameters(files["model"])
    quantizations = [q.strip() for q in a.quantization.split(",") if q.strip()]
    setups = chosen_sides(a.setups, SETUPS)
    print(f"[bench] ppo memory: llama {n_params / 1e6:.1f}M params; {a.rollouts} rollouts x {a.max_new_tokens} new "
          f"tokens, micro-batch {a.batch_size} x {a.grad_accum} accumulation, {a.ppo_epochs} PPO epoch(s), "
          f"LoRA r={a.lora_r} all-linear, gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}; {a.threads} torch "
          f"thread(s); {machine()}", flush=True)
    results: dict[str, dict] = {}
    for q in quantizations:
        a.quantization = q
        for s in setups:
            args = ["--files", json.dumps(files), "--quantization", q, "--rollouts", str(a.rollouts),
                    "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
                    "--max-new-tokens", str(a.max_new_tokens), "--lora-r", str(a.lora_r)] + step_args(a)
            args += (["--gradient-checkpointing"] if a.gradient_checkpointing else [])
            args += (["--no-materialize"] if a.no_materialize else [])
            # A fixed mmap threshold: blocks >= 1 MiB are mapped and unmapped, so RSS follows the live
            # memory (glibc's default raises the threshold up to 32 MiB after frees and keeps
            # weight-sized blocks in its heap, which made RSS depend on allocation history).
            env = {} if a.default_malloc else {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            res = run_child(__file__, s, args, work / f"run-{a.size}" / f"{q}-{s}", a.threads, env=env)
            results[f"{q}/{s}"] = res
            print(f"  {q:<5} {LABELS[s]:<27} peak live tensors {res['live_peak_mb']:7.1f} MB, peak RSS +{res['peak_mb']:7.1f} "
                  f"MB in the step, +{res['run_peak_mb']:7.1f} MB with loading"
                  f" ({res['wall_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU)", flush=True)

    print("\n| weights | setup | peak live tensors MB | vs naive | peak RSS MB, step | vs naive | peak RSS MB, load + "
          "step | vs naive | static tensors MB: weights + grads + AdamW = total | vs naive | plan peak MB | plan / live |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = []
    for q in quantizations:
        a.quantization = q
        naive = results.get(f"{q}/naive")
        seq = next(iter(r["sequence_length"] for k, r in results.items() if k.startswith(q + "/")))
        plans = {"head": planned(a, files, seq, "head"), "adapter": planned(a, files, seq, "adapter")}
        for s in setups:
            r = results[f"{q}/{s}"]
            t = {k: v / MB for k, v in r["tensors"].items()}

            def versus(key: str, value: float, naive: dict | None = naive) -> str:
                if not naive:
                    return "-"
                base = naive["tensors"]["total"] / MB if key == "tensors" else naive[key]
                return f"{value / base:.2f}x"

            plan_peak = (plans["adapter"]["pocketrlhf"]["peak_mb"] if s == "ours-adapter" else
                         plans["head"]["pocketrlhf"]["peak_mb"] if s == "ours-head" else
                         plans["head"]["naive LoRA (4 bases)"]["peak_mb"])
            row = {"weights": "fp32" if q == "none" else "NF4", "setup": LABELS[s], "live_peak_mb": r["live_peak_mb"],
                   "live_vs_naive": versus("live_peak_mb", r["live_peak_mb"]), "peak_rss_mb": r["peak_mb"],
                   "rss_vs_naive": versus("peak_mb", r["peak_mb"]), "run_peak_rss_mb": r["run_peak_mb"],
                   "run_rss_vs_naive": versus("run_peak_mb", r["run_peak_mb"]), "tensor_mb": t,
                   "tensor_vs_naive": versus("tensors", t["total"]), "plan_peak_mb": plan_peak,
                   "phases_mb": r["phases_mb"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                   "response_tokens": r["response_tokens"], "sequence_length": r["sequence_length"],
                   "optimizer_steps": r["optimizer_steps"]}
            table.append(row)
            print(f"| {row['weights']} | {row['setup']} | {r['live_peak_mb']:.0f} | {row['live_vs_naive']} | "
                  f"{r['peak_mb']:.0f} | {row['rss_vs_naive']} | {r['run_peak_mb']:.0f} | {row['run_rss_vs_naive']} | "
                  f"{t['weights']:.0f} + {t['grads']:.1f} + "
                  f"{t['optimizer']:.1f} = {t['total']:.0f} | {row['tensor_vs_naive']} | {plan_peak:.0f} | "
                  f"{plan_peak / r['live_peak_mb']:.2f} |")
    print("\nby phase, MB above the post-import baseline: peak of live tensors so far / RSS now / peak RSS so far "
          "(from 'rollout' on: since the step began)")
    for row in table:
        marks = ", ".join(f"{k}: {v['live_peak']:.0f} / {v['rss']:.0f} / {v['peak_rss']:.0f}"
                          for k, v in row["phases_mb"].items())
        print(f"  {row['weights']:<5} {row['setup']:<27} {marks}")
    summary = {"size": a.size, "params": n_params, "rollouts": a.rollouts, "batch_size": a.batch_size,
               "grad_accum": a.grad_accum, "max_new_tokens": a.max_new_tokens, "lora_r": a.lora_r,
               "gradient_checkpointing": a.gradient_checkpointing, "materialize": not a.no_materialize,
               "threads": a.threads, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": table}
    save_summary(work / f"results-{a.size}-{'-'.join(quantizations)}{'-gc' if a.gradient_checkpointing else ''}.json",
                 summary)


if __name__ == "__main__":
    main()
