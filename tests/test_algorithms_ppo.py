"""Each PPO function against values worked out by hand."""

import math

import pytest
import torch

from pocketrlhf.algorithms.ppo import (AdaptiveKLController, FixedKLController, explained_variance, gae,
                                       kl_per_token, masked_mean, masked_var, masked_whiten, penalized_rewards,
                                       policy_loss, sequence_kl, value_loss)

# Two rows; row 0 has a 1-token prompt then 3 response tokens, row 1 a 2-token prompt, 1 response token, 1 pad.
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])


def test_masked_statistics():
    x = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 9.0, 6.0, 9.0]])
    assert masked_mean(x, MASK).item() == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
    assert masked_var(x, MASK).item() == pytest.approx(3.5)  # (4 + 1 + 0 + 9) / 4, biased
    w = masked_whiten(x, MASK)
    assert w[0, 0] == 0 and w[1, 3] == 0
    assert w[0, 1].item() == pytest.approx(-2 / math.sqrt(3.5), rel=1e-5)
    assert masked_mean(w, MASK).item() == pytest.approx(0.0, abs=1e-6)
    unshifted = masked_whiten(x, MASK, shift_mean=False)
    assert unshifted[0, 1].item() == pytest.approx(3.0 - 2 / math.sqrt(3.5), rel=1e-5)


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_per_token(lp, ref, "kl").tolist() == [0.5, -1.0]
    assert kl_per_token(lp, ref, "abs").tolist() == [0.5, 1.0]
    assert kl_per_token(lp, ref, "mse").tolist() == [0.125, 0.5]
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_per_token(lp, ref, "full")


def test_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[5.0, 0.1, 0.2, 0.3], [5.0, 5.0, 0.4, 5.0]])
    rewards = penalized_rewards(torch.tensor([1.0, -2.0]), kl, MASK, kl_coef=0.5)
    expected = torch.tensor([[0.0, -0.05, -0.1, -0.15 + 1.0], [0.0, 0.0, -0.2 - 2.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[7.0, 0.5, 0.25, 0.5], [7.0, 7.0, 1.0, 7.0]])
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    # row 0: d3 = 1 - 0.5 = 0.5; d2 = 0 + 0.5 - 0.25 = 0.25; d1 = 0 + 0.25 - 0.5 = -0.25
    # A3 = 0.5; A2 = 0.25 + 0.5 * 0.5 = 0.5; A1 = -0.25 + 0.5 * 0.5 = 0.0
    # row 1: only t=2: d = 2 - 1 = 1 (value past the end is 0, the pad's 7 is ignored)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.5, 0.75, 1.0], [0.0, 0.0, 2.0, 0.0]]))
    adv_discounted, _ = gae(rewards, values, MASK, gamma=0.5, lam=1.0)
    # row 0: d3 = 0.5, d2 = 0.5*0.5 - 0.25 = 0, d1 = 0.5*0.25 - 0.5 = -0.375
    # A3 = 0.5, A2 = 0 + 0.5*0.5 = 0.25, A1 = -0.375 + 0.5*0.25 = -0.25
    torch.testing.assert_close(adv_discounted[0], torch.tensor([0.0, -0.25, 0.25, 0.5]))


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1 on the response
    adv = torch.tensor([[0.0, 1.0, 1.0, -2.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    out = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # t1: max(-1.5, -1.2) = -1.2 (clipped); t2: max(-0.5, -0.8) = -0.5; t3: max(2.2, 2.2) = 2.2
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, rel=1e-5)
    assert out.clipfrac.item() == pytest.approx(1 / 3)
    assert out.ratio.item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, rel=1e-5)
    logs = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    assert out.approxkl.item() == pytest.approx(0.5 * (logs ** 2).mean().item(), rel=1e-5)
    assert out.policykl.item() == pytest.approx(-logs.mean().item(), rel=1e-5)


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    adv = torch.tensor([[0.0, 1.0, -3.0, 0.5]])
    lp = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    out = policy_loss(lp, lp.clone(), adv, MASK[:1], cliprange=0.2)
    assert out.loss.item() == pytest.approx(-(1.0 - 3.0 + 0.5) / 3)
    assert out.ratio.item() == 1.0 and out.approxkl.item() == 0.0 and out.clipfrac.item() == 0.0


def test_value_loss_clipping_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, -0.1, 9.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # t0: unclipped (1-2)^2 = 1; clipped V = 0.2 -> (0.2-2)^2 = 3.24 -> 3.24
    # t1: unclipped (-0.1-1)^2 = 1.21; clipped V = -0.1 (within) -> 1.21
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2, rel=1e-5)
    assert clipfrac.item() == pytest.approx(0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3) + 2.0, returns, mask) == pytest.approx(0.0, abs=1e-6)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    adaptive.update(12.0, 64)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000))
    adaptive.update(3.0, 100)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000) * (1 - 0.2 * 100 / 10000))
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value


def test_sequence_kl_sums_the_log_ratio_over_response_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    reference = torch.tensor([[-1.5, -1.0, -9.0], [-0.1, -0.7, -0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5, the masked third token ignored; row 1: 0.5 + 0
    torch.testing.assert_close(sequence_kl(logprobs, reference, mask), torch.tensor([-0.5, 0.5]))
