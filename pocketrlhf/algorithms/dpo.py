"""Direct Preference Optimization losses, as pure functions of sequence log-probs.

Inputs are per pair: the policy's and the reference's summed completion log-probs of the chosen
(y_w) and rejected (y_l) answer. With log-ratios rho_w = log pi(y_w) - log pi_ref(y_w) (and rho_l
likewise) and h = rho_w - rho_l:

    sigmoid (DPO, cDPO)  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    robust (rDPO)        [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)
    hinge (SLiC)         max(0, 1 - beta h)
    ipo                  (h' - 1 / (2 beta))^2, h' = rho_w / |y_w| - rho_l / |y_l|

IPO divides each log-ratio by its answer's token count, as trl does (its authors' reading of the
IPO paper); the others use sums. eps is the label smoothing: the assumed chance that a pair's
label is flipped. The implicit reward of an answer is beta * rho (Rafailov et al. 2023, eq. 5).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "robust", "hinge", "ipo"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "hinge", "ipo")


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO; with label_smoothing > 0, conservative DPO (the target is 1 - eps, not 1)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """rDPO: an unbiased estimate of the clean-label loss when labels flip with probability eps."""
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    flipped = -label_smoothing * F.logsigmoid(-beta * h)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.relu(1 - beta * h)


def ipo_loss(h_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO regresses the (length-normalised) log-ratio gap onto 1 / (2 beta); beta plays tau."""
    return (h_per_token - 1 / (2 * beta)) ** 2


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss [B], chosen reward [B], rejected reward [B]); rewards are detached.

    ``*_lengths`` (answer token counts) are needed for IPO only.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = sigmoid_loss(h, beta, label_smoothing)
    elif loss_type == "robust":
        losses = robust_loss(h, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = hinge_loss(h, beta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the answers' token counts (chosen_lengths, rejected_lengths)")
        per_token = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = ipo_loss(per_token, beta)
    else:
        raise ValueError(f"unknown DPO loss type '{loss_type}' (one of {', '.join(LOSS_TYPES)})")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_metric_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Implicit-reward metrics summed over pairs (the caller divides by the pair count): the
    rewards, how often chosen beats rejected (a tie, e.g. policy == reference, is no win), and
    by how much."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "accuracy": (chosen_rewards > rejected_rewards).float().sum(),
        "margin": (chosen_rewards - rejected_rewards).sum(),
    }
