"""PPO with a per-token KL penalty, every role on ONE frozen (16/8/4-bit) base.

    policy     adapter "policy" (a trainable copy of the SFT adapter, or fresh on a merged SFT base)
    reference  adapter "reference" (a frozen copy of the SFT adapter), or adapters disabled
    value      a scalar head on the policy's hidden states (one forward, as StackLLaMA), or with
               --value-model adapter a separate trainable "value" adapter + head (init: the RM)
    reward     frozen adapter "reward" + head from `pocketrlhf rm`, or a Python function

One step of ``train``, each detail with the function that does it:

 1. prompts of the step: a function of (seed, step) alone, reshuffled every epoch    step_prompts
 2. sample at temperature T from the full distribution, one counter-based random
    stream per rollout (N processes reproduce one), cut after the first EOS          generate_rollouts
 3. score with the reward adapter (normalised with the RM's saved mean/std) or the
    rule; minus the baseline, clipped, minus a penalty when no EOS came [N+] D23      generate_rollouts
 4. one no-grad pass, dropout off [N] Policy 4, logits / T [N] Policy 1: old
    log-probs, values, entropy, and reference log-probs (adapter switch)             old_policy_pass
 5. per-token rewards -beta * KL, the score added on the last token [N] Policy 8     penalized_rewards
 6. optional reward whitening without shifting the mean [N] Policy 9                 masked_whiten
 7. GAE with gamma 1 [N] Policy 6, returns taken BEFORE advantages are whitened       gae
 8. advantages whitened over the whole batch (all processes) [N+] D25                masked_whiten
 9. ppo_epochs over shuffled minibatches, micro-batches weighted by their tokens:
    clipped policy loss + vf_coef * clipped value loss [N] Policy 10                  ppo_update
10. beta adapted towards kl_target (Ziegler et al. 2019) or fixed                    AdaptiveKLController
11. the value head starts at zero [N] Policy 2; a value adapter starts as the RM
    [N+] D22; a different seed per process [N] General 6                             build_roles, train

References a newcomer can open:
    [N]  Huang, Liu, von Werra et al., "The N Implementation Details of RLHF with PPO",
         Hugging Face blog / ICLR blog track 2024 (details named by section and number).
    [N+] Huang, Noukhovitch, Hosseini et al., "The N+ Implementation Details of RLHF with PPO:
         A Case Study on TL;DR Summarization", COLM 2024, arXiv:2403.17031 (Detail N).
    Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from pocketrlhf.algorithms.ppo import (AdaptiveKLController, FixedKLController, explained_variance, gae,
                                       kl_per_token, masked_mean, masked_whiten, penalized_rewards, policy_loss,
                                       sequence_kl, value_loss)
from pocketrlhf.config import AdapterOptions, ModelOptions, TrainOptions, option
from pocketrlhf.data.formats import prompts as prompt_rows
from pocketrlhf.data.rows import read_rows
from pocketrlhf.data.templates import TemplateName
from pocketrlhf.data.tokenize import TokenExample, collate, encode
from pocketrlhf.diagnostics import reward_model_warnings
from pocketrlhf.errors import ConfigError, DataError, NonFiniteError, RewardFunctionError
from pocketrlhf.models.generation import row_seed
from pocketrlhf.models.policy import add_frozen_adapter, build_policy, cast_adapter, hidden_size, set_trainable
from pocketrlhf.models.roles import load_reward_adapter, load_reward_function, rule_reward, short_repr
from pocketrlhf.models.spec import BaseSpec
from pocketrlhf.stages import common
from pocketrlhf.stages.common import log

POLICY, REFERENCE, VALUE, REWARD = "policy", "reference", "value", "reward"


@dataclasses.dataclass
class PPOConfig(ModelOptions, AdapterOptions, TrainOptions):
    output_dir: str = option("runs/ppo", "run directory")
    prompts: str = option("", "prompts: a `prompt` column, Stack Exchange `question`, or `messages`")
    eval_prompts: str = option("", "held-out prompts for evaluation (default: eval_fraction of prompts)")
    eval_fraction: float = option(0.05, "fraction of prompts held out when no eval_prompts (0: none)")
    template: TemplateName = option("plain", "prompt format; the one SFT and RM used")
    max_prompt_length: int = option(256, "prompts longer than this many tokens are skipped (and counted)")
    sft_adapter: str = option("", "SFT adapter: the policy starts as a copy of it and the reference is a frozen copy")
    reference: Literal["sft", "base"] = option("sft", "reference model: the SFT model, or the raw base (adapters off)")
    reward_adapter: str = option("", "reward adapter + head from `pocketrlhf rm`")
    reward_function: str = option("", "rule-based reward instead: module:function or file.py:function (texts in, floats out)")
    reward_normalize: bool = option(True, "reward adapter: (r - mean) / std with the statistics saved by `rm`")
    reward_baseline: float = option(0.0, "subtracted from every score (StackLLaMA's reward_baseline)")
    reward_clip: float = option(0.0, "clip scores to [-c, c] (0: off)")
    missing_eos_penalty: float = option(1.0, "subtracted from the score of a response that never emitted EOS")
    value_model: Literal["head", "adapter"] = option("head", "value: a head on the policy, or a separate adapter + head")
    temperature: float = option(1.0, "sampling temperature; log-probs use logits / temperature everywhere")
    max_new_tokens: int = option(64, "response length limit")
    rollouts_per_step: int = option(64, "responses sampled per PPO step (all processes together)")
    generation_batch_size: int = option(32, "prompts per generate() call")
    ppo_epochs: int = option(4, "passes over each step's rollouts")
    kl_coef: float = option(0.2, "initial KL penalty coefficient beta")
    adaptive_kl: bool = option(True, "adapt beta towards kl_target (Ziegler et al.)")
    kl_target: float = option(6.0, "target sequence KL (nats) of the adaptive controller")
    kl_horizon: float = option(10000.0, "adaptive controller horizon")
    kl_estimator: Literal["kl", "abs", "mse"] = option("kl", "per-token KL estimate in the reward")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    cliprange: float = option(0.2, "policy ratio clip")
    cliprange_value: float = option(0.2, "value clip around the old values")
    vf_coef: float = option(0.1, "value loss weight")
    whiten_rewards: bool = option(False, "whiten the per-token rewards over the batch before GAE")
    target_kl: float = option(0.0, "stop a step's epochs early when its policy KL exceeds 1.5 x this (0: never)")
    learning_rate: float = option(1.41e-5, "peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = option("linear", "schedule (linear: decay to 0, N+)")
    adam_eps: float = option(1e-5, "Adam epsilon (N+)")
    batch_size: int = option(8, "rollouts per forward/backward micro-batch")
    gradient_accumulation_steps: int = option(2, "micro-batches per optimizer step (minibatch = both multiplied)")
    samples_to_log: int = option(4, "generations written to samples.jsonl at each eval")


# ---------------------------------------------------------------------------------------------
# Roles on one base


@dataclass
class Roles:
    model: torch.nn.Module  # the one PeftModel: every adapter lives on its single base
    adapters: object  # AdapterSet
    value_head: torch.nn.Module
    value_adapter: str | None  # None: the value head reads the policy's hidden states
    reference: str | None  # adapter name, or None for adapters disabled
    reward: Callable[[torch.Tensor, torch.Tensor, list[str], list[str]], torch.Tensor]
    trainable: list[torch.nn.Parameter]


def build_roles(cfg: PPOConfig, total_steps: int) -> Roles:
    from pocketrlhf.models.adapters import AdapterSet, load_adapter, make_peft_config
    from pocketrlhf.models.forward import disable_dropout
    from pocketrlhf.models.heads import ScalarHead

    if bool(cfg.reward_adapter) == bool(cfg.reward_function):
        raise ConfigError("ppo needs exactly one of --reward-adapter DIR or --reward-function module:function")
    model = build_policy(cfg, total_steps=total_steps, adapter_name=POLICY, init_adapter=cfg.sft_adapter)
    reference = None
    if cfg.reference == "sft" and cfg.sft_adapter:
        model = add_frozen_adapter(model, cfg.sft_adapter, REFERENCE)
        reference = REFERENCE
    device = next(p for p in model.parameters() if p.requires_grad).device
    if cfg.reward_adapter:
        model, scorer = load_reward_adapter(model, cfg.reward_adapter, name=REWARD)

        def reward(input_ids, attention_mask, prompts, responses):
            return scorer(input_ids, attention_mask, normalize=cfg.reward_normalize)
    else:
        reward = rule_reward(load_reward_function(cfg.reward_function), cfg.reward_function)
    value_adapter = None
    if cfg.value_model == "adapter":
        value_adapter = VALUE
        if cfg.reward_adapter:  # [N+] Detail 22: the critic starts as the reward model
            model = load_adapter(model, cfg.reward_adapter, name=VALUE, trainable=True)
            value_head = ScalarHead.load(cfg.reward_adapter, device=device)
        else:
            model.add_adapter(VALUE, make_peft_config(cfg.adapter, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.target_modules,
                                                      cfg.num_virtual_tokens, total_steps))
            value_head = ScalarHead(hidden_size(model), init="zero").to(device)
        cast_adapter(model, VALUE, cfg.adapter_dtype)
    else:
        value_head = ScalarHead(hidden_size(model), init="zero").to(device)  # [N] Policy 2: zero init
    model.set_adapter(POLICY)
    disable_dropout(model)  # [N] Policy 4, adapters' dropout too: the ratio is exactly 1 before the first update
    trainable = set_trainable(model, {POLICY} | ({VALUE} if value_adapter else set()))
    value_head.requires_grad_(True)
    return Roles(model, AdapterSet(model), value_head, value_adapter, reference, reward,
                 trainable + list(value_head.parameters()))


class ActorCritic(torch.nn.Module):
    """The trained module (what accelerate/DDP wraps). The caller activates the adapter of the
    role it asks for, and runs backward inside that context (recomputation under gradient
    checkpointing must see the same adapter)."""

    def __init__(self, model: torch.nn.Module, value_head: torch.nn.Module, shared_trunk: bool):
        super().__init__()
        self.model, self.value_head, self.shared_trunk = model, value_head, shared_trunk

    def forward(self, input_ids, attention_mask, response_mask, temperature: float, role: str = POLICY,
                return_entropy: bool = False) -> dict[str, torch.Tensor]:
        from pocketrlhf.models.forward import final_hidden_states, response_logprobs, token_aligned

        if role == VALUE:
            hidden = final_hidden_states(self.model, input_ids, attention_mask)
            return {"values": token_aligned(self.value_head(hidden))}
        out = response_logprobs(self.model, input_ids, attention_mask, response_mask, temperature,
                                return_hidden=self.shared_trunk, return_entropy=return_entropy)
        result = {"logprobs": out.logprobs}
        if out.entropy is not None:
            result["entropy"] = out.entropy
        if self.shared_trunk:
            result["values"] = token_aligned(self.value_head(out.hidden))
        return result


# ---------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [N, T] prompt + response, right-padded
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # 1 on response tokens (EOS included)
    scores: torch.Tensor  # [N] after baseline, clipping and the missing-EOS penalty
    raw_scores: torch.Tensor  # [N] as the reward model/function gave them
    has_eos: torch.Tensor  # [N] bool
    prompts: list[str]
    responses: list[str]
    kept: torch.Tensor | None = None  # [N] bool: False for rollouts dropped for a non-finite score (skip_nonfinite)


def generate_rollouts(cfg: PPOConfig, roles: Roles, tokenizer, prompt_ids: list[list[int]],
                      row_seeds: list[int], prompt_indices: list[int] | None = None) -> Rollout:
    """Sample, truncate at EOS and score one response per prompt; response i comes from its own
    random stream ``row_seeds[i]``, so rollouts do not depend on how prompts are batched or split
    over processes (N processes reproduce one process exactly).

    A non-finite score is a NonFiniteError naming the reward and the prompt (its index in
    ``prompt_indices``, else its position), or with ``skip_nonfinite`` drops that rollout: its
    response mask and score become 0, so it adds nothing to the update, and ``kept`` marks it."""
    from pocketrlhf.models.generation import sample

    responses = sample(roles.model, tokenizer, prompt_ids, cfg.max_new_tokens, cfg.temperature,
                       batch_size=cfg.generation_batch_size, row_seeds=row_seeds)
    eos = tokenizer.eos_token_id
    batch = collate([TokenExample(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompt_ids, responses)],
                    tokenizer.pad_token_id)
    device = next(roles.model.parameters()).device
    ids, attn, resp = batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["loss_mask"].to(device)
    has_eos = torch.tensor([bool(r) and r[-1] == eos for r in responses], device=device)
    prompt_texts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    response_texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    index = prompt_indices if prompt_indices is not None else list(range(len(prompt_ids)))
    source = f"reward function {cfg.reward_function}" if cfg.reward_function else f"reward adapter {cfg.reward_adapter}"
    parts = []
    for i in range(0, len(prompt_ids), cfg.batch_size):
        try:
            parts.append(roles.reward(ids[i:i + cfg.batch_size], attn[i:i + cfg.batch_size],
                                      prompt_texts[i:i + cfg.batch_size], response_texts[i:i + cfg.batch_size]))
        except RewardFunctionError as e:
            bad = getattr(e, "index", None)
            where = (f"the answer to prompt {index[i + bad]}, {short_repr(prompt_texts[i + bad])}" if bad is not None else
                     f"prompts {index[i]}..{index[min(i + cfg.batch_size, len(index)) - 1]}")
            raise RewardFunctionError(f"{e} ({where})") from e.__cause__
    raw = torch.cat(parts).float()
    kept = torch.isfinite(raw)
    if not kept.all():
        bad = int((~kept).nonzero()[0])
        if not cfg.skip_nonfinite:
            raise NonFiniteError(f"{source} returned {raw[bad].item()} for the answer to prompt {index[bad]}, "
                                 f"{short_repr(prompt_texts[bad])} ({int((~kept).sum())} of {len(raw)} scores non-finite)")
        resp = resp * kept[:, None].to(resp.dtype)
    scores = torch.where(kept, raw, 0.0) - cfg.reward_baseline
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    scores = (scores - cfg.missing_eos_penalty * (~has_eos).float()) * kept
    return Rollout(ids, attn, resp, scores, raw, has_eos, prompt_texts, response_texts, kept)


@torch.no_grad()
def old_policy_pass(cfg: PPOConfig, roles: Roles, module: ActorCritic, r: Rollout) -> dict[str, torch.Tensor]:
    """Log-probs, values, entropy of the sampling policy and reference log-probs (no grad)."""
    from pocketrlhf.models.forward import response_logprobs

    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "entropy": [], "ref_logprobs": []}
    for i in range(0, r.input_ids.shape[0], cfg.batch_size):
        ids, attn, resp = (t[i:i + cfg.batch_size] for t in (r.input_ids, r.attention_mask, r.response_mask))
        with roles.adapters.use(POLICY):
            out = module(ids, attn, resp, cfg.temperature, return_entropy=True)
        if roles.value_adapter:
            with roles.adapters.use(roles.value_adapter):
                out["values"] = module(ids, attn, resp, cfg.temperature, role=VALUE)["values"]
        with roles.adapters.use(roles.reference):
            ref = response_logprobs(roles.model, ids, attn, resp, cfg.temperature).logprobs
        for k in ("logprobs", "values", "entropy"):
            parts[k].append(out[k].float())
        parts["ref_logprobs"].append(ref)
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# The PPO update


def ppo_update(cfg: PPOConfig, roles: Roles, module, r: Rollout, old: dict, advantages, returns, optimizer,
               scheduler, accelerator, generator: torch.Generator) -> dict[str, float]:
    """ppo_epochs passes of shuffled minibatches. Each minibatch's losses are token means over the
    minibatch on ALL processes (micro-batches weighted by their tokens, DDP's averaging undone),
    so N processes take the same step as one process with the same global minibatch.

    A non-finite loss or gradient norm is a NonFiniteError, or with ``skip_nonfinite`` skips that
    micro-batch's backward or that minibatch's update; ``nonfinite_skipped`` counts them (this
    process's micro-batches plus the minibatch updates)."""
    mask = r.response_mask.float()
    n = mask.shape[0]
    world = accelerator.num_processes
    minibatch = cfg.batch_size * cfg.gradient_accumulation_steps
    sums: dict[str, float] = {}
    weight = 0.0
    first: dict[str, float] = {}
    stats: dict[str, float] = {}
    skipped = 0

    def finite(loss: torch.Tensor, what: str, epoch: int, start: int) -> bool:
        if torch.isfinite(loss.detach()).all():
            return True
        if not cfg.skip_nonfinite:
            raise NonFiniteError(f"the {what} loss is {loss.detach().float().item()} (PPO epoch {epoch + 1}, "
                                 f"minibatch {start // minibatch + 1})")
        common.skip_backward(accelerator, roles.trainable)
        return False

    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, minibatch):
            rows = order[start:start + minibatch]
            tokens = mask[rows].sum()
            if world > 1:
                tokens = accelerator.reduce(tokens, "sum") / world
            tokens = tokens.clamp(min=1)
            for m in range(0, len(rows), cfg.batch_size):
                idx = torch.tensor(rows[m:m + cfg.batch_size], device=mask.device)
                ids, attn, resp, mb_mask = r.input_ids[idx], r.attention_mask[idx], r.response_mask[idx], mask[idx]
                share = mb_mask.sum() / tokens  # this micro-batch's share of the minibatch's tokens
                ok = True
                with roles.adapters.use(POLICY):
                    out = module(ids, attn, resp, cfg.temperature)
                    pg = policy_loss(out["logprobs"], old["logprobs"][idx], advantages[idx], mb_mask, cfg.cliprange)
                    loss = pg.loss
                    if roles.value_adapter is None:
                        vf, vf_clip = value_loss(out["values"], old["values"][idx], returns[idx], mb_mask,
                                                 cfg.cliprange_value)
                        loss = loss + cfg.vf_coef * vf
                    # Backward inside the adapter's context: recomputation must see the same adapter.
                    if finite(loss, "policy" if roles.value_adapter else "policy + value", epoch, start):
                        accelerator.backward(loss * share)
                    else:
                        ok = False
                if roles.value_adapter is not None:
                    with roles.adapters.use(roles.value_adapter):
                        values = module(ids, attn, resp, cfg.temperature, role=VALUE)["values"]
                        vf, vf_clip = value_loss(values, old["values"][idx], returns[idx], mb_mask, cfg.cliprange_value)
                        if finite(vf, "value", epoch, start):
                            accelerator.backward(cfg.vf_coef * vf * share)
                        else:
                            ok = False
                if not ok:
                    skipped += 1
                    continue
                stats = {"pg_loss": pg.loss.item(), "vf_loss": vf.item(), "pg_clipfrac": pg.clipfrac.item(),
                         "vf_clipfrac": vf_clip.item(), "approxkl": pg.approxkl.item(), "policykl": pg.policykl.item(),
                         "ratio": pg.ratio.item()}
                if not first:
                    first = {"first_ratio": stats["ratio"], "first_approxkl": stats["approxkl"]}
                w = mb_mask.sum().item()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v * w
                weight += w
            norm = float(common.grad_norm(accelerator, roles.trainable, cfg.max_grad_norm))
            if math.isfinite(norm):
                optimizer.step()
            elif not cfg.skip_nonfinite:
                raise NonFiniteError(f"the gradient norm is {norm} (PPO epoch {epoch + 1}, minibatch "
                                     f"{start // minibatch + 1})")
            else:
                skipped += 1  # this minibatch's update is dropped
            optimizer.zero_grad(set_to_none=True)
        if cfg.target_kl > 0 and stats.get("policykl", 0.0) > 1.5 * cfg.target_kl:
            first["early_stopped_epoch"] = epoch + 1
            break
    scheduler.step()
    result = {**{k: v / max(weight, 1.0) for k, v in sums.items()}, **first}
    if cfg.skip_nonfinite:
        result["nonfinite_skipped"] = skipped
    return result


# ---------------------------------------------------------------------------------------------
# Data


def prepare_prompts(cfg: PPOConfig, tokenizer) -> tuple[list[list[int]], list[list[int]], dict]:
    rows = read_rows("prompt", prompt_rows, cfg.prompts, cfg.eval_prompts, cfg.eval_fraction, cfg.seed, cfg.template,
                     tokenizer)
    texts, eval_texts, skipped, template = rows.train, rows.held_out, rows.skipped, rows.template

    def tokenize(items: list[str], label: str) -> list[list[int]]:
        out = []
        for t in items:
            ids = encode(tokenizer, t, special=True)
            if len(ids) > cfg.max_prompt_length:
                skipped.add(f"{label}prompts longer than max_prompt_length")
                continue
            out.append(ids)
        return out

    train, evals = tokenize(texts, ""), tokenize(eval_texts, "eval ")
    if not train:
        raise DataError(f"{cfg.prompts}: no prompt fits max_prompt_length={cfg.max_prompt_length}")
    if skipped.total:
        log.info("prompts: %s", skipped.describe())
    return train, evals, {"template": template, "train_prompts": len(train), "eval_prompts": len(evals),
                          "skipped": dict(skipped.counts), "held_out": rows.split}


def reward_adapter_warnings(reward_adapter: str) -> list[str]:
    """The reward model's own held-out record, checked before any rollout is optimised against it."""
    from pocketrlhf.models.adapters import read_adapter_info

    info = read_adapter_info(reward_adapter)
    return reward_model_warnings(info.get("eval_accuracy"), info.get("eval_accuracy_n"), info.get("train_seen_accuracy"))


def step_prompts(cfg: PPOConfig, step: int, n: int, rank: int, world: int) -> list[int]:
    """This process's prompt indices for PPO step ``step``: a function of the step alone."""
    per_step = cfg.rollouts_per_step
    steps_per_epoch = max(n // per_step, 1)
    epoch, k = divmod(step, steps_per_epoch)
    order = common.epoch_order(n, cfg.seed, epoch)
    chosen = [order[(k * per_step + j) % n] for j in range(per_step)]
    share = per_step // world
    return chosen[rank * share:(rank + 1) * share]


@torch.no_grad()
def evaluate(cfg: PPOConfig, roles: Roles, module, tokenizer, prompt_ids: list[list[int]]) -> tuple[dict, list[dict]]:
    """Mean score and KL to the reference on held-out prompts, plus a few samples to look at.
    Prompt i is answered from the same random stream at every evaluation (less noisy curves)."""
    r = generate_rollouts(cfg, roles, tokenizer, prompt_ids, [row_seed(cfg.seed, -1, i) for i in range(len(prompt_ids))])
    old = old_policy_pass(cfg, roles, module, r)
    mask = r.response_mask.float()
    kept = r.kept if r.kept is not None else torch.ones_like(r.has_eos)  # --skip-nonfinite drops unscored answers
    seq_kl = sequence_kl(old["logprobs"], old["ref_logprobs"], mask)
    metrics = {"score": r.raw_scores[kept].mean().item(), "kl": seq_kl[kept].mean().item(),
               "eos_fraction": r.has_eos[kept].float().mean().item(), "response_length": mask.sum(1)[kept].mean().item()}
    samples = [{"prompt": p, "response": s, "score": float(x)}
               for p, s, x in zip(r.prompts, r.responses, r.raw_scores.tolist())][:cfg.samples_to_log]
    return metrics, samples


# ---------------------------------------------------------------------------------------------


def train(cfg: PPOConfig) -> dict:
    from pocketrlhf.models.adapters import load_adapter_weights, save_adapter, write_adapter_info
    from pocketrlhf.models.heads import ScalarHead
    from pocketrlhf.models.loading import load_tokenizer

    common.setup_logging()
    accelerator = common.make_accelerator(cfg.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.rollouts_per_step % world:
        raise ConfigError(f"--rollouts-per-step {cfg.rollouts_per_step} must be divisible by the {world} processes")
    run = common.Run(cfg, "ppo", accelerator.is_main_process)
    if run.finished is not None:  # --resume auto on a finished run: never trained again
        return run.finished
    common.set_seed(cfg.seed + rank * 100003)  # each process samples its own rollouts ([N] General 6)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train_prompts, eval_prompts, data_report = prepare_prompts(cfg, tokenizer)
    data_report["warnings"] = reward_adapter_warnings(cfg.reward_adapter) if cfg.reward_adapter else []
    for warning in data_report["warnings"]:
        log.warning("%s", warning)
    steps_per_epoch = max(len(train_prompts) // cfg.rollouts_per_step, 1)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    roles = build_roles(cfg, total_steps)
    device = roles.trainable[0].device
    optimizer = common.build_optimizer(roles.trainable, cfg, str(device))
    scheduler = common.build_scheduler(optimizer, cfg, total_steps)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    module = accelerator.prepare_model(ActorCritic(roles.model, roles.value_head, roles.value_adapter is None),
                                       device_placement=False)

    def save_weights(path: Path, tokenizer=None) -> None:
        save_adapter(roles.model, path / "adapter", name=POLICY, tokenizer=tokenizer)
        if roles.value_adapter:
            save_adapter(roles.model, path / "value", name=VALUE)
        roles.value_head.save(path / "value")

    def load_weights(path: Path) -> None:
        load_adapter_weights(roles.model, path / "adapter", name=POLICY)
        if roles.value_adapter:
            load_adapter_weights(roles.model, path / "value", name=VALUE)
        roles.value_head.load_state_dict(ScalarHead.load(path / "value", device=device).state_dict())

    start_step, state, extra = common.resume(run, optimizer, scheduler, load_weights)
    if extra:
        kl_ctl.load_state_dict(extra["kl_controller"])
    nonfinite_skipped = state.get("nonfinite_skipped", 0)  # rollouts, micro-batches, updates dropped (skip_nonfinite)

    reduce = (lambda x: accelerator.reduce(x, "sum")) if world > 1 else (lambda x: x)
    log.info("ppo: %d prompts, %d steps of %d rollouts, %d epochs; reference: %s; value: %s; reward: %s",
             len(train_prompts), total_steps, cfg.rollouts_per_step, cfg.ppo_epochs,
             f"frozen copy of the SFT adapter ({cfg.sft_adapter})" if roles.reference else "base (adapters off)",
             cfg.value_model, cfg.reward_adapter or cfg.reward_function)
    progress = common.Progress(total_steps, start_step, "ppo", cfg.progress and accelerator.is_main_process)
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        chosen = step_prompts(cfg, step, len(train_prompts), rank, world)
        prompt_ids = [train_prompts[i] for i in chosen]
        first = rank * len(prompt_ids)  # global position of this process's first rollout in the step
        try:
            r = generate_rollouts(cfg, roles, tokenizer, prompt_ids,
                                  [row_seed(cfg.seed, step, first + i) for i in range(len(prompt_ids))], chosen)
        except NonFiniteError as e:
            raise run.nonfinite(str(e), step + 1, "pass --skip-nonfinite to drop such rollouts") from None
        except RewardFunctionError as e:
            raise RewardFunctionError(f"ppo step {step + 1}: {e}") from e.__cause__
        old = old_policy_pass(cfg, roles, module, r)
        mask = r.response_mask.float()
        kl = kl_per_token(old["logprobs"], old["ref_logprobs"], cfg.kl_estimator) * mask
        rewards = penalized_rewards(r.scores, kl, mask, kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
        advantages, returns = gae(rewards, old["values"], mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, reduce=reduce)
        generator = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        try:
            stats = ppo_update(cfg, roles, module, r, old, advantages, returns, optimizer, scheduler, accelerator,
                               generator)
        except NonFiniteError as e:
            raise run.nonfinite(str(e), step + 1, "pass --skip-nonfinite to skip such updates") from None
        # Statistics of the whole step's rollouts, over every process (dropped rollouts left out).
        gather = accelerator.gather if world > 1 else (lambda x: x)
        kept = gather(r.kept)
        scores = gather(r.raw_scores)[kept]
        seq_kl = gather(sequence_kl(old["logprobs"], old["ref_logprobs"], mask))[kept]
        metrics = {
            "score": scores.mean().item(), "score_std": scores.std().item() if len(scores) > 1 else 0.0,
            "kl": seq_kl.mean().item(), "kl_coef": kl_ctl.value,
            "entropy": masked_mean(old["entropy"], mask, reduce).item(),
            "eos_fraction": gather(r.has_eos.float())[kept].mean().item(),
            "response_length": gather(mask.sum(1))[kept].mean().item(),
            "explained_variance": explained_variance(old["values"], returns, mask, reduce),
            "lr": scheduler.get_last_lr()[0], **stats,
            "samples_per_s": cfg.rollouts_per_step / (time.perf_counter() - started),
        }
        if cfg.skip_nonfinite:
            nonfinite_skipped += int((~kept).sum()) + stats.get("nonfinite_skipped", 0)
            metrics["nonfinite_skipped"] = nonfinite_skipped
        if len(scores):  # a step whose every rollout was dropped says nothing about the KL
            kl_ctl.update(metrics["kl"], cfg.rollouts_per_step)
        done = step + 1
        last = metrics
        if done % cfg.logging_steps == 0 or done == total_steps:
            run.log(done, metrics)
        progress.update(1, score=metrics["score"], kl=metrics["kl"], samples_s=round(metrics["samples_per_s"], 1))
        if eval_prompts and cfg.eval_steps and done % cfg.eval_steps == 0 and done != total_steps:
            _log_eval(cfg, run, roles, module, tokenizer, eval_prompts, done)
        if cfg.save_steps and done % cfg.save_steps == 0 and done != total_steps:
            run.save_checkpoint(done, lambda path: (save_weights(path), common.save_torch_state(
                path, optimizer, scheduler, {"kl_controller": kl_ctl.state_dict()})),
                {"total_steps": total_steps, "nonfinite_skipped": nonfinite_skipped})
    progress.close()

    summary = {"steps": total_steps, "final_score": last.get("score"), "final_kl": last.get("kl"), **data_report}
    if eval_prompts:
        summary.update({f"eval_{k}": v for k, v in _log_eval(cfg, run, roles, module, tokenizer, eval_prompts,
                                                              total_steps).items()})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_weights(run.dir, tokenizer)
        write_adapter_info(run.dir / "adapter", stage="ppo", template=data_report["template"], base=BaseSpec.from_config(cfg).record(),
                           sft_adapter=cfg.sft_adapter, reward_adapter=cfg.reward_adapter)
        summary["adapter"] = str(run.dir / "adapter")
    run.write_summary(summary)
    run.close()
    log.info("ppo done: score %.3f, KL %.3f; policy adapter in %s", summary["final_score"], summary["final_kl"],
             run.dir / "adapter")
    return summary


def _log_eval(cfg, run, roles, module, tokenizer, eval_prompts, step) -> dict:
    metrics, samples = evaluate(cfg, roles, module, tokenizer, eval_prompts)
    run.log(step, metrics, split="eval")
    if run.is_main:
        with (run.dir / "samples.jsonl").open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")
    return metrics
