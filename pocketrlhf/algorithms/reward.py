"""Reward modelling: the Bradley-Terry pairwise loss and its metrics (Ouyang et al. 2022,
arXiv:2203.02155, eq. 1; StackLLaMA's reward_modeling.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected - margin)`` (the caller sums or averages)."""
    return -F.logsigmoid(chosen - rejected - margin)


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair 1 where the chosen answer scores strictly higher."""
    return (chosen > rejected).float()
