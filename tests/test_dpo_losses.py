"""The DPO loss variants on hand-made numbers, each worked out in the test."""

import math

import pytest
import torch

from pocketrlhf.algorithms.dpo import dpo_loss, reward_metric_sums


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# One pair: policy log-probs (chosen -10, rejected -12), reference (-11, -11).
# Log-ratios: chosen +1, rejected -1, so h = 2. With beta = 0.5, beta * h = 1.
PAIR = dict(policy_chosen=t(-10.0), policy_rejected=t(-12.0), ref_chosen=t(-11.0), ref_rejected=t(-11.0))
SOFTPLUS_MINUS_1 = math.log(1 + math.exp(-1))  # -log sigmoid(1) = 0.31326...
SOFTPLUS_PLUS_1 = math.log(1 + math.exp(1))  # -log sigmoid(-1) = 1.31326...


def test_sigmoid_is_minus_log_sigmoid_of_beta_h_and_rewards_are_beta_log_ratios():
    loss, chosen, rejected = dpo_loss(**PAIR, beta=0.5, loss_type="sigmoid")
    assert loss.item() == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-12)
    assert loss.item() == pytest.approx(0.3132616875182228, abs=1e-12)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_label_smoothing_gives_conservative_dpo():
    # cDPO, eps = 0.1: 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1)
    loss, _, _ = dpo_loss(**PAIR, beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * SOFTPLUS_MINUS_1 + 0.1 * SOFTPLUS_PLUS_1, abs=1e-12)
    assert loss.item() == pytest.approx(0.4132616875182229, abs=1e-12)


def test_robust_dpo():
    # rDPO, eps = 0.1: (0.9 * 0.31326 - 0.1 * 1.31326) / 0.8 = 0.18826...
    loss, _, _ = dpo_loss(**PAIR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert loss.item() == pytest.approx((0.9 * SOFTPLUS_MINUS_1 - 0.1 * SOFTPLUS_PLUS_1) / 0.8, abs=1e-12)
    assert loss.item() == pytest.approx(0.1882616875182229, abs=1e-12)
    # eps = 0: plain DPO
    plain, _, _ = dpo_loss(**PAIR, beta=0.5, loss_type="robust", label_smoothing=0.0)
    assert plain.item() == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-12)


def test_hinge():
    # max(0, 1 - beta h): beta 0.5 -> 1 - 1 = 0; beta 0.1 -> 1 - 0.2 = 0.8; a reversed pair (h = -2) -> 1.2
    assert dpo_loss(**PAIR, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.0)
    assert dpo_loss(**PAIR, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.8)
    reversed_pair = dict(policy_chosen=t(-12.0), policy_rejected=t(-10.0), ref_chosen=t(-11.0), ref_rejected=t(-11.0))
    assert dpo_loss(**reversed_pair, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(1.2)


def test_ipo_uses_length_normalised_log_ratios():
    # chosen log-ratio +1 over 4 tokens = 0.25, rejected -1 over 2 tokens = -0.5: h' = 0.75.
    # beta 0.5 -> target 1 / (2 * 0.5) = 1 -> (0.75 - 1)^2 = 0.0625
    loss, chosen, rejected = dpo_loss(**PAIR, beta=0.5, loss_type="ipo", chosen_lengths=t(4), rejected_lengths=t(2))
    assert loss.item() == pytest.approx(0.0625, abs=1e-12)
    # rewards stay beta * summed log-ratio
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    # beta 0.1 -> target 5 -> (0.75 - 5)^2 = 18.0625
    loss, _, _ = dpo_loss(**PAIR, beta=0.1, loss_type="ipo", chosen_lengths=t(4), rejected_lengths=t(2))
    assert loss.item() == pytest.approx(18.0625, abs=1e-12)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(**PAIR, loss_type="ipo")


def test_per_pair_losses_over_a_batch_and_policy_equal_to_reference():
    # Two pairs: the first as above (beta 0.5 -> 0.31326), the second policy == reference (h = 0 -> log 2).
    loss, chosen, rejected = dpo_loss(t(-10.0, -5.0), t(-12.0, -7.0), t(-11.0, -5.0), t(-11.0, -7.0), beta=0.5)
    assert loss.tolist() == pytest.approx([SOFTPLUS_MINUS_1, math.log(2)], abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.0])


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = t(-10.0).requires_grad_(), t(-12.0).requires_grad_()
    loss, _, _ = dpo_loss(chosen, rejected, t(-11.0), t(-11.0), beta=0.5)
    loss.backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h) = -0.5 * sigmoid(-1) = -0.13447...
    expected = -0.5 / (1 + math.exp(1))
    assert chosen.grad.item() == pytest.approx(expected) and rejected.grad.item() == pytest.approx(-expected)


def test_reward_metrics_are_sums_over_pairs_and_ties_are_misses():
    metrics = reward_metric_sums(t(1.0, 0.0, 0.5), t(-1.0, 0.0, 1.0))
    assert metrics["rewards/chosen"].item() == pytest.approx(1.5)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.0)
    assert metrics["accuracy"].item() == 1  # a win, a tie, a loss
    assert metrics["margin"].item() == pytest.approx(2.0 + 0.0 - 0.5)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown DPO loss type 'kto'"):
        dpo_loss(**PAIR, loss_type="kto")
