import math

import torch

from pocketrlhf.algorithms.reward import pairwise_accuracy, pairwise_loss


def test_pairwise_loss_matches_hand_computed_values():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([0.0, 0.0, 1.0])
    expected = [math.log(1 + math.exp(-2.0)), math.log(2.0), math.log(1 + math.exp(2.0))]
    torch.testing.assert_close(pairwise_loss(chosen, rejected), torch.tensor(expected))


def test_margin_is_subtracted_inside_the_sigmoid():
    loss = pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0)]))


def test_loss_is_stable_for_large_gaps_and_gradient_pushes_apart():
    chosen = torch.tensor([100.0, -100.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0])
    loss = pairwise_loss(chosen, rejected)
    assert torch.isfinite(loss).all() and loss[0] < 1e-6 and abs(loss[1].item() - 100.0) < 1e-4
    loss.sum().backward()
    assert chosen.grad[1] < 0  # descending raises the chosen reward


def test_accuracy_counts_strict_wins():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])).tolist() == [1.0, 0.0, 0.0]
