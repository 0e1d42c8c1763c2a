"""Critic-free online RL (GRPO, RLOO, REINFORCE++) on the online loop shared with PPO.

    policy     adapter "policy" (a trainable copy of the SFT adapter, or fresh on the base)
    reference  adapter "reference" (a frozen copy of the SFT adapter), or adapters disabled;
               not run at all with --beta 0
    reward     rule functions (weighted; they get the dataset's other columns as keyword
               arguments) and/or the frozen adapter "reward" + head from `pocketrlhf rm`

One step, after the shared rollouts (G completions per prompt, online.generate_rollouts):

 1. no-grad passes: the sampling policy's log-probs when the batch is used for more than one
    optimizer step (else the ratio is 1 and its detached log-probs serve), the reference's
    log-probs when beta > 0; each group's prompt computed once                 online.rows_logprobs
 2. advantages from the scores of each group:                                 algorithms.grpo
      grpo          (r - group mean) / (std + 1e-4), std of the group or batch, or none
                    (Dr. GRPO); KL as a loss term (k3 estimator)               group_advantages
      rloo          r - mean of the other G-1 completions, sequence KL in r   rloo_advantages
      reinforce_pp  per-token returns of score - beta * KL, whitened over the
                    global batch                                              reinforce_pp_advantages
 3. optional masks: completions that never ended (--mask-truncated-completions), groups whose
    rewards are all equal (--mask-zero-variance-groups, DAPO); both are counted in the metrics
 4. num_iterations passes over shuffled minibatches of whole groups: clipped surrogate with
    clip-higher (epsilon_low, epsilon_high; DAPO) + beta * k3 KL, aggregated per sequence,
    per token (DAPO) or with a constant (Dr. GRPO)                            grpo_update

References: Shao et al. 2024 (DeepSeekMath, GRPO), Ahmadian et al. 2024 (RLOO), Hu 2025
(REINFORCE++), Yu et al. 2025 (DAPO), Liu et al. 2025 (Dr. GRPO); spec section 7.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import torch

from pocketrlhf.algorithms.grpo import (aggregate, clipped_surrogate, group_advantages, k3_kl, reinforce_pp_advantages,
                                        rloo_advantages, sequence_surrogate, zero_variance_groups)
from pocketrlhf.algorithms.ppo import kl_per_token, masked_mean, penalized_rewards, sequence_kl
from pocketrlhf.config import AdapterOptions, ModelOptions, TrainOptions, option
from pocketrlhf.errors import ConfigError, NonFiniteError
from pocketrlhf.stages import common, online
from pocketrlhf.stages.online import POLICY, Roles, Rollout, micro_batches, rows_logprobs


@dataclasses.dataclass
class GRPOConfig(ModelOptions, AdapterOptions, TrainOptions, online.OnlineOptions):
    output_dir: str = option("runs/grpo", "run directory")
    reward_function: list[str] = option([], "rule reward(s): module:function or file.py:function, called with "
                                            "prompts=, completions= and the data's other columns; repeat for several")
    reward_weights: list[float] = option([], "one weight per reward: the functions in order, then the reward adapter "
                                             "(default: 1 each)")
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = option("grpo", "advantage estimator")
    num_generations: int = option(8, "completions per prompt (G)")
    prompts_per_step: int = option(8, "prompts per step, all processes together (rollouts = this x G)")
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "grpo: divide by the std of the group, of the batch, or not at all (Dr. GRPO)")
    loss_aggregation: Literal["auto", "sequence", "token", "constant", "answer"] = option(
        "auto", "sequence: mean of per-answer token means (GRPO paper); token: token mean over the minibatch (DAPO); "
                "constant: sum / (answers x max_new_tokens) (Dr. GRPO); answer: one ratio per answer of its summed "
                "log-probs, mean over answers (RLOO as published); auto: answer for rloo, token otherwise")
    beta: float = option(0.04, "KL coefficient (0: no reference pass at all)")
    kl_in: Literal["auto", "loss", "reward"] = option(
        "auto", "where the KL goes: a k3 loss term (auto for grpo) or the reward (auto for rloo, reinforce_pp)")
    epsilon_low: float = option(0.2, "ratio clip below 1")
    epsilon_high: float = option(0.2, "ratio clip above 1 (DAPO's clip-higher: 0.28)")
    num_iterations: int = option(1, "passes over each step's rollouts (mu); > 1 uses the importance ratio")
    mask_truncated_completions: bool = option(False, "leave completions without EOS out of the loss")
    mask_zero_variance_groups: bool = option(False, "leave groups whose rewards are all equal out of the loss (DAPO)")
    eval_at_start: bool = option(True, "evaluate on the held-out prompts before the first step too (step 0)")
    missing_eos_penalty: float = option(0.0, "subtracted from the score of a completion that never emitted EOS")
    learning_rate: float = option(1e-5, "peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = option("linear", "schedule after warm-up")
    batch_size: int = option(8, "completions per forward/backward micro-batch (rounded to whole groups)")
    gradient_accumulation_steps: int = option(
        8, "micro-batches per optimizer step; the default covers the whole step's rollouts in one update")


def check_config(cfg: GRPOConfig) -> None:
    if cfg.advantage in ("grpo", "rloo") and cfg.num_generations < 2:
        raise ConfigError(f"--advantage {cfg.advantage} compares completions of one prompt: --num-generations must be "
                          f"at least 2 (got {cfg.num_generations})")
    if cfg.num_generations < 1 or cfg.prompts_per_step < 1 or cfg.num_iterations < 1:
        raise ConfigError("--num-generations, --prompts-per-step and --num-iterations must be at least 1")
    if cfg.beta < 0 or cfg.epsilon_low < 0 or cfg.epsilon_high < 0:
        raise ConfigError("--beta, --epsilon-low and --epsilon-high cannot be negative")


def kl_placement(cfg: GRPOConfig) -> str:
    if cfg.kl_in != "auto":
        return cfg.kl_in
    return "loss" if cfg.advantage == "grpo" else "reward"


class PolicyLogprobs(torch.nn.Module):
    """The trained module (what accelerate/DDP wraps): token log-probs of rollout rows under the
    active adapter, each group's prompt computed once when ``share``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, attn, resp, prompt_lengths, temperature: float, group_size: int, share: bool):
        return rows_logprobs(self.model, ids, attn, resp, prompt_lengths, temperature, group_size, share).logprobs


def advantages_of(cfg: GRPOConfig, scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None,
                  reduce) -> torch.Tensor:
    """[N] or [N, T] advantages of one process's rollouts. ``scores`` are the GLOBAL batch's
    scores when the estimator needs the batch (grpo with batch scaling), else this process's; NaN
    marks a completion that could not be scored (left out, advantage 0). ``kl`` is the per-token
    KL (k1, masked) when it goes into the reward: grpo and rloo subtract beta x the sequence KL
    from the score, reinforce_pp puts it on every token."""
    G = cfg.num_generations
    if cfg.advantage == "reinforce_pp":
        token_kl = kl if kl is not None else torch.zeros_like(mask)
        return reinforce_pp_advantages(penalized_rewards(scores.nan_to_num(0.0), token_kl, mask, cfg.beta), mask,
                                       reduce)
    if kl is not None:
        scores = scores - cfg.beta * kl.sum(1)
    if cfg.advantage == "rloo":
        return rloo_advantages(scores, G)
    return group_advantages(scores, G, cfg.scale_rewards)


def loss_kind(cfg: GRPOConfig) -> str:
    if cfg.loss_aggregation != "auto":
        return cfg.loss_aggregation
    return "answer" if cfg.advantage == "rloo" else "token"


class GRPO:
    """Critic-free advantages and the clipped surrogate on the rollouts of ``online.train``."""

    stage = "grpo"

    def __init__(self, cfg: GRPOConfig):
        check_config(cfg)
        self.cfg = cfg
        self.completions_per_prompt = cfg.num_generations
        self.prompts_per_step = cfg.prompts_per_step

    def describe(self) -> str:
        c = self.cfg
        kl = f"beta {c.beta:g} in the {kl_placement(c)}" if c.beta > 0 else "no KL term (beta 0: no reference pass)"
        return (f"advantage: {c.advantage}" + (f" (scale: {c.scale_rewards})" if c.advantage == "grpo" else "")
                + f"; {kl}; loss: {loss_kind(c)}; {c.num_iterations} iteration(s)")

    def reward_functions(self, cfg: GRPOConfig) -> list[str]:
        return cfg.reward_function

    def build_roles(self, cfg: GRPOConfig, total_steps: int) -> Roles:
        roles = online.build_shared_roles(cfg, total_steps, cfg.reward_function, cfg.reward_weights)
        return online.finish_roles(roles, {POLICY})

    def trained_module(self, roles: Roles) -> torch.nn.Module:
        return PolicyLogprobs(roles.model)

    def learn(self, step: int, r: Rollout, ctx: online.StepContext) -> dict[str, float]:
        cfg, roles = self.cfg, ctx.roles
        world, rank = ctx.accelerator.num_processes, ctx.accelerator.process_index
        n, G = r.input_ids.shape[0], r.group_size
        minibatch = max(1, cfg.batch_size * cfg.gradient_accumulation_steps // G) * G
        kl_where = kl_placement(cfg)
        need_reference = cfg.beta > 0
        # The batch's own log-probs are needed when the policy moves before the batch is used up,
        # or when the KL goes into the rewards (computed before any update).
        need_old = (cfg.num_iterations > 1 or math.ceil(n / minibatch) > 1
                    or (need_reference and kl_where == "reward"))
        old = self._policy_pass(r, ctx) if need_old else None
        reference = online.reference_logprobs(cfg, roles, r) if need_reference else None
        mask = r.response_mask.float()
        token_kl = kl_per_token(old, reference, "kl") * mask if need_reference and kl_where == "reward" else None
        kept = r.kept if r.kept is not None else torch.ones_like(r.has_eos)
        scores = torch.where(kept, r.scores, torch.nan)  # dropped (--skip-nonfinite): out of the group statistics
        if cfg.advantage == "grpo" and cfg.scale_rewards == "batch" and world > 1:
            gathered_kl = ctx.gather(token_kl) if token_kl is not None else None
            advantages = advantages_of(cfg, ctx.gather(scores), ctx.gather(mask), gathered_kl,
                                       ctx.reduce)[rank * n:(rank + 1) * n]
        else:
            advantages = advantages_of(cfg, scores, mask, token_kl, ctx.reduce)
        zero_var = zero_variance_groups(scores, G) if G > 1 else torch.zeros_like(r.has_eos)
        loss_mask = mask.clone()
        if cfg.mask_truncated_completions:
            loss_mask = loss_mask * r.has_eos[:, None].float()
        if cfg.mask_zero_variance_groups:
            loss_mask = loss_mask * (~zero_var)[:, None].float()
        stats = self._update(step, r, ctx, old, reference, advantages, loss_mask, kl_where)
        sampling = stats.pop("sampling_logprobs")
        metrics = {**stats, "zero_variance_groups": ctx.gather(zero_var[::G].float()).mean().item(),
                   "advantage_abs": masked_mean(advantages.abs() if advantages.dim() == 2 else
                                                advantages.abs()[:, None].expand_as(mask), mask, ctx.reduce).item()}
        if reference is not None:  # KL of the sampling policy: its own pass, or the first pass's log-probs
            sampling = old if old is not None else sampling
            metrics["kl"] = ctx.gather(sequence_kl(sampling, reference, mask))[ctx.gather(kept)].mean().item()
        if cfg.mask_truncated_completions:
            metrics["truncated_masked"] = ctx.gather((~r.has_eos).float()).mean().item()
        return metrics

    @torch.no_grad()
    def _policy_pass(self, r: Rollout, ctx: online.StepContext) -> torch.Tensor:
        cfg, parts = self.cfg, []
        for s in micro_batches(r.input_ids.shape[0], cfg.batch_size, r.group_size):
            with ctx.roles.adapters.use(POLICY):
                parts.append(ctx.module(r.input_ids[s], r.attention_mask[s], r.response_mask[s], r.prompt_lengths[s],
                                        cfg.temperature, r.group_size, cfg.share_prompt))
        return torch.cat(parts)

    def _update(self, step: int, r: Rollout, ctx: online.StepContext, old, reference, advantages, loss_mask,
                kl_where: str) -> dict[str, float]:
        """grpo_update: num_iterations passes over shuffled minibatches of whole groups. Each
        micro-batch's loss is its share of the minibatch loss over ALL processes (DDP's
        averaging undone), so N processes take the step one process takes."""
        cfg, roles, accelerator = self.cfg, ctx.roles, ctx.accelerator
        world = accelerator.num_processes
        G = r.group_size
        groups = r.input_ids.shape[0] // G
        per_minibatch = max(1, cfg.batch_size * cfg.gradient_accumulation_steps // G)
        per_micro = max(1, cfg.batch_size // G)
        how = loss_kind(cfg)
        generator = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        device = loss_mask.device
        # Summed over micro-batches (and processes at the end): loss shares, response tokens, ratio x tokens, clipped.
        totals = torch.zeros(4, dtype=torch.float64, device=device)
        skipped, first_ratio = 0, None
        sampling = torch.zeros_like(loss_mask)
        response = r.response_mask.float()
        for iteration in range(cfg.num_iterations):
            order = torch.randperm(groups, generator=generator).tolist()
            for start in range(0, groups, per_minibatch):
                chosen = order[start:start + per_minibatch]
                rows = [g * G + k for g in chosen for k in range(G)]
                counts = torch.stack([torch.tensor(float(len(rows)), device=device), loss_mask[rows].sum()])
                if world > 1:
                    counts = ctx.reduce(counts) / world
                sequences, tokens = counts.tolist()
                for m in range(0, len(chosen), per_micro):
                    idx = torch.tensor([g * G + k for g in chosen[m:m + per_micro] for k in range(G)], device=device)
                    mb_mask = loss_mask[idx]
                    with roles.adapters.use(POLICY):
                        logprobs = ctx.module(r.input_ids[idx], r.attention_mask[idx], r.response_mask[idx],
                                              r.prompt_lengths[idx], cfg.temperature, G, cfg.share_prompt)
                        behaviour = old[idx] if old is not None else logprobs.detach()
                        if old is None:  # the batch's only pass: these are the sampling policy's log-probs
                            sampling[idx] = behaviour
                        kl = cfg.beta * k3_kl(logprobs, reference[idx]) if (
                            reference is not None and kl_where == "loss") else None
                        if how == "answer":
                            per_answer, clipped = sequence_surrogate(logprobs, behaviour, advantages[idx], mb_mask,
                                                                     cfg.epsilon_low, cfg.epsilon_high)
                            if kl is not None:
                                per_answer = per_answer + (kl * mb_mask).sum(1)
                            per_answer = per_answer * (mb_mask.sum(1) > 0)  # a fully masked answer adds nothing
                            loss = per_answer.sum() / max(sequences, 1.0)
                            clipped = clipped[:, None].expand_as(mb_mask)
                        else:
                            per_token, clipped = clipped_surrogate(logprobs, behaviour, advantages[idx],
                                                                   cfg.epsilon_low, cfg.epsilon_high)
                            if kl is not None:
                                per_token = per_token + kl
                            loss = aggregate(per_token, mb_mask, how, sequences, tokens, cfg.max_new_tokens)
                        if not common.finite_everywhere(accelerator, loss):
                            if not cfg.skip_nonfinite:
                                raise NonFiniteError(f"the policy loss is not finite (iteration {iteration + 1}, "
                                                     f"minibatch {start // per_minibatch + 1})")
                            common.skip_backward(accelerator, roles.trainable)
                            skipped += 1
                            continue
                        accelerator.backward(loss)
                    with torch.no_grad():
                        resp = response[idx]
                        ratio = torch.exp(logprobs.detach() - behaviour)
                        part = torch.stack([loss.detach().double(), resp.sum().double(), (ratio * resp).sum().double(),
                                            (clipped.float() * resp).sum().double()])
                    totals += part
                    if first_ratio is None and resp.sum() > 0:
                        first_ratio = (part[2] / part[1]).item()
                common.sync_gradients(accelerator, ctx.module, roles.trainable)  # FSDP; DDP did it in backward
                norm = float(common.grad_norm(accelerator, roles.trainable, cfg.max_grad_norm))
                if math.isfinite(norm):
                    ctx.optimizer.step()
                elif not cfg.skip_nonfinite:
                    raise NonFiniteError(f"the gradient norm is {norm} (iteration {iteration + 1}, minibatch "
                                         f"{start // per_minibatch + 1})")
                else:
                    skipped += 1
                ctx.optimizer.zero_grad(set_to_none=True)
        ctx.scheduler.step()
        if world > 1:
            totals = ctx.reduce(totals)
        updates = cfg.num_iterations * math.ceil(groups / per_minibatch)
        tokens_seen = max(totals[1].item(), 1.0)
        result = {"sampling_logprobs": sampling,
                  # each process's shares sum to world x its part: the global minibatch loss, averaged over updates
                  "loss": totals[0].item() / world / updates, "ratio": totals[2].item() / tokens_seen,
                  "clipfrac": totals[3].item() / tokens_seen, "first_ratio": first_ratio if first_ratio is not None else 1.0}
        if cfg.skip_nonfinite:
            result["nonfinite_skipped"] = skipped
        return result

    def after_step(self, metrics: dict[str, float], rollouts: int) -> None:
        pass

    def save_extra(self, roles: Roles, path: Path) -> None:
        pass

    def load_extra(self, roles: Roles, path: Path) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train(cfg: GRPOConfig) -> dict:
    return online.train(cfg, GRPO(cfg))
