"""GRPO/RLOO/REINFORCE++ math on hand-made tensors, and against trl 1.16's own formulas."""

from __future__ import annotations

import pytest
import torch

from pocketrlhf.algorithms.grpo import (aggregate, clipped_surrogate, group_advantages, k3_kl, reinforce_pp_advantages,
                                        returns_to_go, rloo_advantages, zero_variance_groups)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal -> 0 advantage
    std = (1 / 3) ** 0.5
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([std + 1e-4] * 4 + [1e-4] * 4)
    assert torch.allclose(group_advantages(rewards, 4, "group"), expected)
    assert torch.allclose(group_advantages(rewards, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch_std = rewards.std()
    assert torch.allclose(group_advantages(rewards, 4, "batch"),
                          torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_rloo_advantages_by_hand():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0, 4.0, 4.0])
    # r_i - mean of the other two
    expected = torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0, 0 - 4.0, 4 - 2.0, 4 - 2.0])
    assert torch.allclose(rloo_advantages(rewards, 3), expected)
    # the leave-one-out advantage is G/(G-1) times the group-centred reward
    assert torch.allclose(rloo_advantages(rewards, 3), 1.5 * group_advantages(rewards, 3, "none"))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, 1)


def test_zero_variance_groups_and_returns_to_go():
    assert zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist() == [True, True, False, False]
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    assert returns_to_go(rewards, mask).tolist() == [[0.0, 6.0, 5.0, 3.0, 0.0]]


def test_reinforce_pp_whitens_returns_over_the_batch():
    rewards = torch.tensor([[0.0, -0.1, -0.1, 1.0], [0.0, -0.2, 0.5, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    adv = reinforce_pp_advantages(rewards, mask)
    rtg = torch.tensor([0.8, 0.9, 1.0, 0.3, 0.5])  # masked returns-to-go, row by row
    expected = (rtg - rtg.mean()) / (rtg.var(unbiased=False) + 1e-8).sqrt()
    assert torch.allclose(adv[mask.bool()], expected, atol=1e-5)
    assert adv[~mask.bool()].abs().sum() == 0


def test_k3_kl_is_zero_at_equality_positive_elsewhere():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    assert k3_kl(lp, lp).abs().max() == 0
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = ref - lp
    assert torch.allclose(k3_kl(lp, ref), d.exp() - d - 1)
    assert (k3_kl(lp, ref) >= 0).all()


def test_clipped_surrogate_clip_higher():
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1 against old = 0
    old = torch.zeros(1, 3)
    loss, clipped = clipped_surrogate(logprobs, old, torch.tensor([1.0]), epsilon_low=0.2, epsilon_high=0.28)
    # A > 0: min(r, clip(r)) -> 1.28, 0.5, 1.1
    assert torch.allclose(loss, -torch.tensor([[1.28, 0.5, 1.1]]))
    assert clipped.tolist() == [[True, False, False]]
    loss, _ = clipped_surrogate(logprobs, old, torch.tensor([-1.0]), epsilon_low=0.2, epsilon_high=0.28)
    # A < 0: min(-r, -clip(r)) -> -1.5, -0.8, -1.1
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8, 1.1]]))


def _trl_nanstd(x, dim=None):
    from trl.trainer.utils import nanstd

    return nanstd(x, dim=dim) if dim is not None else nanstd(x)


def test_advantages_match_trl_formulas():
    """trl 1.16 GRPOTrainer._generate_and_score_completions ("sum_then_normalize") and
    RLOOTrainer: the same rewards give the same advantages (trl's own nanstd helper)."""
    torch.manual_seed(0)
    G = 4
    rewards = torch.randn(6 * G)
    grouped = rewards.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    trl_group = (rewards - mean) / (_trl_nanstd(grouped, dim=1).repeat_interleave(G) + 1e-4)
    trl_batch = (rewards - mean) / (_trl_nanstd(rewards).expand_as(rewards) + 1e-4)
    assert torch.allclose(group_advantages(rewards, G, "group"), trl_group, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, G, "batch"), trl_batch, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, G, "none"), rewards - mean, atol=1e-6)
    baselines = ((grouped.sum(1, keepdim=True) - grouped) / (G - 1)).view(-1)
    assert torch.allclose(rloo_advantages(rewards, G), rewards - baselines, atol=1e-6)


def test_loss_aggregations_match_trl_and_add_up_over_micro_batches():
    """grpo / dapo(bnpo) / dr_grpo in trl 1.16's _compute_loss; split into micro-batches, the
    shares add up to the whole minibatch's loss."""
    torch.manual_seed(1)
    per_token = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    max_length = 7
    trl = {"sequence": ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean(),
           "token": (per_token * mask).sum() / mask.sum().clamp(min=1.0),
           "constant": (per_token * mask).sum() / (per_token.size(0) * max_length)}
    for how, expected in trl.items():
        whole = aggregate(per_token, mask, how, 6, mask.sum().item(), max_length)
        parts = sum(aggregate(per_token[s], mask[s], how, 6, mask.sum().item(), max_length)
                    for s in (slice(0, 2), slice(2, 5), slice(5, 6)))
        assert torch.allclose(whole, expected, atol=1e-6), how
        assert torch.allclose(parts, expected, atol=1e-6), how
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per_token, mask, "median", 6, 1.0, 1)


def test_unscored_completions_are_left_out_of_their_group():
    """A NaN reward (dropped for --skip-nonfinite) neither moves its group's baseline nor gets an
    advantage: a group [1, NaN, 1, 1] carries no signal (trl uses NaN-aware statistics too)."""
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 1.0, 1.0, 0.0, 1.0, nan, 1.0])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 4, scale)
        assert adv[:4].abs().max() == 0 and adv[6] == 0, scale
        assert torch.isfinite(adv).all()
    loo = rloo_advantages(rewards, 4)
    assert loo[:4].abs().max() == 0 and loo[6] == 0
    assert loo[4] == pytest.approx(0.0 - 1.0) and loo[5] == pytest.approx(1.0 - 0.5)
    assert zero_variance_groups(rewards, 4).tolist() == [True] * 4 + [False] * 4


def test_sequence_surrogate_matches_trl_rloo_loss():
    """trl 1.16 RLOOTrainer._compute_loss: ratio of the summed log-probs, clipped, mean over answers."""
    from pocketrlhf.algorithms.grpo import sequence_surrogate

    torch.manual_seed(2)
    logprobs, old = -torch.rand(4, 6), -torch.rand(4, 6)
    mask = (torch.rand(4, 6) > 0.2).float()
    adv = torch.randn(4)
    coef_1 = torch.exp((logprobs * mask).sum(1) - (old * mask).sum(1))
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.3)
    trl = (-torch.min(coef_1 * adv, coef_2 * adv)).mean()
    ours, _ = sequence_surrogate(logprobs, old, adv, mask, 0.2, 0.3)
    assert torch.allclose(ours.mean(), trl)
