"""Critic-free online RL (spec section 7): advantages from groups of completions, and the losses.

Rewards are [N] with the G completions of a prompt next to each other (rows g*G .. g*G+G-1).
Per-token tensors are [N, T] and token-aligned like algorithms.ppo (mask: 1 on response tokens).
"""

from __future__ import annotations

from typing import Literal

import torch

from pocketrlhf.algorithms.ppo import Reduce, _local, masked_whiten

ScaleRewards = Literal["group", "batch", "none"]
Aggregation = Literal["sequence", "token", "constant"]
EPS = 1e-4  # added to the std, as GRPO's reference code and trl do


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std over the non-NaN entries (NaN where fewer than two)."""
    keep = dim is not None
    mean = torch.nanmean(x, dim=dim, keepdim=True) if keep else torch.nanmean(x)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if keep else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) if keep else torch.nansum((x - mean) ** 2)
    return (var / (count - 1)).sqrt()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group") -> torch.Tensor:
    """GRPO: A_i = (r_i - mean of its group) / (std + 1e-4), std of the group ("group"), of the
    whole batch ("batch"), or no scaling ("none", Dr. GRPO: the std divides easy and hard
    prompts unequally). Standard deviations are unbiased (Bessel), as torch.std and trl. A NaN
    reward (a completion that could not be scored) is left out of its group's statistics and gets
    advantage 0."""
    grouped = _grouped(rewards, group_size)
    centred = (grouped - torch.nanmean(grouped, 1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred.nan_to_num(0.0)
    if scale == "group":
        std = _nanstd(grouped, 1).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = _nanstd(rewards).expand_as(rewards)
    else:
        raise ValueError(f"unknown reward scaling '{scale}' (group, batch or none)")
    return (centred / (std.nan_to_num(0.0) + EPS)).nan_to_num(0.0)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: A_i = r_i - mean of the OTHER completions of its prompt (leave-one-out baseline),
    over the scored ones: a NaN reward is left out and gets advantage 0, as does a completion
    with no scored sibling."""
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 completions per prompt")
    grouped = _grouped(rewards, group_size)
    scored = (~torch.isnan(grouped)).sum(1, keepdim=True)
    baseline = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (scored - 1)
    return (grouped - baseline).reshape(-1).nan_to_num(0.0, posinf=0.0, neginf=0.0)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: the completion's group got the same reward everywhere (NaN, unscored, left
    out), so it carries no signal (DAPO's dynamic sampling drops such groups)."""
    grouped = _grouped(rewards, group_size)
    low = torch.where(torch.isnan(grouped), torch.inf, grouped).min(1, keepdim=True).values
    high = torch.where(torch.isnan(grouped), -torch.inf, grouped).max(1, keepdim=True).values
    same = (high <= low) | torch.isinf(low)
    return same.expand_as(grouped).reshape(-1)


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{s >= t} r_s over the response (gamma 1), 0 off the mask."""
    masked = token_rewards * mask
    return (masked.flip(1).cumsum(1).flip(1)) * mask


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, OpenRLHF): per-token returns-to-go of the KL-penalised rewards,
    whitened over every response token of the global batch (no critic, no group baseline)."""
    return masked_whiten(returns_to_go(token_rewards, mask), mask, reduce=reduce)


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(d) - d - 1 with d = log pi_ref - log pi (Schulman's k3: unbiased
    on pi's samples, never negative); GRPO's loss term."""
    d = reference_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) with the per-token
    ratio to the sampling policy; ``advantages`` is [N] (broadcast over tokens) or [N, T].
    Returns (loss [N, T], clipped [N, T] bool)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    return -torch.min(unclipped, clipped), clipped < unclipped


def sequence_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO as published (and trl's RLOOTrainer): one ratio per answer, of its summed log-probs,
    clipped; loss -min(ratio * A, clip(ratio) * A) per answer [N] and whether it clipped [N]."""
    ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(1))
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    return -torch.min(unclipped, clipped), clipped < unclipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation, sequences: float, tokens: float,
              max_length: int) -> torch.Tensor:
    """This micro-batch's share of a minibatch loss, so that summing the shares over the
    micro-batches (and processes) gives the minibatch's loss:

        sequence  mean over sequences of each sequence's token mean (GRPO as published)
        token     sum over all tokens / all tokens (DAPO: long answers weigh per token)
        constant  sum over all tokens / (sequences * max_length) (Dr. GRPO: no length bias)

    ``sequences`` and ``tokens`` are the minibatch's totals (all micro-batches, all processes)."""
    summed = per_token * mask
    if how == "sequence":
        return (summed.sum(1) / mask.sum(1).clamp(min=1)).sum() / max(sequences, 1.0)
    if how == "token":
        return summed.sum() / max(tokens, 1.0)
    if how == "constant":
        return summed.sum() / (max(sequences, 1.0) * max_length)
    raise ValueError(f"unknown loss aggregation '{how}' (sequence, token or constant)")
