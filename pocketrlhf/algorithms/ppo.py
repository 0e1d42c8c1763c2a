"""PPO with a per-token KL penalty (spec section 4): pure functions of [B, T] tensors.

Conventions: tensors are token-aligned, index t holds the quantity of response token t (its
log-prob, the value of the state before it, its reward). ``mask`` is 1 on response tokens (up
to and including EOS) and 0 on prompt and padding. Masked means and variances are over all
masked entries of the batch, never per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


Reduce = Callable[[torch.Tensor], torch.Tensor]


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local) -> torch.Tensor:
    """Mean over the masked entries; ``reduce`` sums across processes for a global mean."""
    return reduce(masked_sum(x, mask)) / reduce(mask.sum()).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local) -> torch.Tensor:
    """Biased variance over the masked entries (N+ code; TF's moments are biased too)."""
    mean = masked_mean(x, mask, reduce)
    return masked_mean((x - mean) ** 2, mask, reduce)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce = _local) -> torch.Tensor:
    """(x - mean) / std over the masked entries of the whole batch (all processes with
    ``reduce``); ``shift_mean=False`` adds the mean back. Masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask, reduce), masked_var(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL to the reference of each sampled response [N]: sum over its tokens of
    log pi(y_t) - log pi_ref(y_t), an unbiased estimate of KL(pi || pi_ref) on pi's own samples."""
    return ((logprobs - ref_logprobs) * mask).sum(1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "kl") -> torch.Tensor:
    """Per-token KL estimate on the sampled tokens: kl = d, abs = |d|, mse = d^2 / 2, with
    d = log pi(y_t) - log pi_ref(y_t) (trl's ``kl_penalty`` options)."""
    d = logprobs - ref_logprobs
    if estimator == "kl":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "mse":
        return 0.5 * d.square()
    raise ValueError(f"unknown KL estimator '{estimator}' (kl, abs or mse)")


def last_masked_index(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).max(dim=1).values


def penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """reward_t = -kl_coef * kl_t on every response token, plus the sequence score on the last one."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_masked_index(mask)] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response positions.

    delta_t = r_t + gamma * V_{t+1} - V_t (V past the last response token is 0);
    A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t, computed BEFORE any
    whitening of A ("The N+ Implementation Details of RLHF with PPO", Details 24-25). Both come back zero outside the mask.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # masked mean of the clipped surrogate
    clipfrac: torch.Tensor
    approxkl: torch.Tensor  # 0.5 * mean((logp - logp_old)^2)
    policykl: torch.Tensor  # mean(logp_old - logp)
    ratio: torch.Tensor  # mean ratio


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2) -> PolicyLoss:
    """Clipped surrogate: mean_m(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return PolicyLoss(
        loss=masked_mean(torch.maximum(unclipped, clipped), mask),
        clipfrac=masked_mean((clipped > unclipped).float(), mask).detach(),
        approxkl=(0.5 * masked_mean(log_ratio.square(), mask)).detach(),
        policykl=masked_mean(-log_ratio, mask).detach(),
        ratio=masked_mean(ratio, mask).detach(),
    )


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean_m(max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)), and the clipped fraction."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _local) -> float:
    """1 - Var(R - V) / Var(R) over the masked entries (1: perfect value function)."""
    var_returns = masked_var(returns, mask, reduce)
    if var_returns.item() == 0:
        return float("nan")
    return (1.0 - masked_var(returns - values, mask, reduce) / var_returns).item()


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: float):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
