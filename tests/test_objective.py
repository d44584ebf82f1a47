"""The alpha-Renyi objective against hand-computed values, limits and its gradient identity."""

from __future__ import annotations

import math

import pytest
import torch

from renyi_lora.objective import alpha_schedule, gaussian_prior, renyi_loss, renyi_per_example, responsibilities

INF = float("inf")


def test_hand_computed_values():
    # Two members, one example: L = log(0.5), log(0.25); uniform weights.
    loglik = torch.tensor([[math.log(0.5)], [math.log(0.25)]])
    # alpha = 1: -log((0.5 + 0.25) / 2)
    assert renyi_per_example(loglik, 1.0).item() == pytest.approx(-math.log(0.375), abs=1e-6)
    # alpha = 2: -(1/2) log((0.25 + 0.0625) / 2)
    assert renyi_per_example(loglik, 2.0).item() == pytest.approx(-0.5 * math.log(0.15625), abs=1e-6)
    # alpha = 0: -(log 0.5 + log 0.25) / 2
    assert renyi_per_example(loglik, 0.0).item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2, abs=1e-6)
    # alpha = inf: -max
    assert renyi_per_example(loglik, INF).item() == pytest.approx(-math.log(0.5), abs=1e-6)
    # responsibilities at alpha = 1: 0.5 / 0.75 and 0.25 / 0.75
    w = responsibilities(loglik, 1.0)
    assert w[:, 0].tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-6)


def test_weighted_mixture_matches_hand_computation():
    loglik = torch.tensor([[math.log(0.5)], [math.log(0.25)], [math.log(0.1)]])
    weights = torch.tensor([0.2, 0.3, 0.5])
    expected = -math.log(0.2 * 0.5 + 0.3 * 0.25 + 0.5 * 0.1)
    loss, w = renyi_loss(loglik, 1.0, weights.log())
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert w[:, 0].tolist() == pytest.approx([0.1 / 0.225, 0.075 / 0.225, 0.05 / 0.225], abs=1e-6)


def test_limits():
    torch.manual_seed(0)
    loglik = -5 * torch.rand(4, 16)
    at_zero = renyi_per_example(loglik, 0.0)
    assert torch.allclose(renyi_per_example(loglik, 1e-6), at_zero, atol=1e-4)
    assert torch.allclose(renyi_per_example(loglik, 1e-8), at_zero, atol=1e-4)
    assert torch.allclose(renyi_per_example(loglik, 1e4), renyi_per_example(loglik, INF), atol=1e-3)


def test_non_increasing_in_alpha():
    torch.manual_seed(1)
    loglik = -10 * torch.rand(3, 32)
    alphas = [0.0, 1e-3, 0.1, 0.5, 1.0, 2.0, 4.0, 16.0, INF]
    values = torch.stack([renyi_per_example(loglik, a) for a in alphas])
    assert (values[1:] <= values[:-1] + 1e-5).all()


@pytest.mark.parametrize("alpha", [0.0, 1e-8, 0.5, 1.0, 4.0, INF])
def test_finite_for_extreme_logliks(alpha):
    loglik = torch.tensor([[-1e4, -1.0, -5e3], [-1e4, -1e4, -2.0], [-3.0, -1e4, -1e4]], requires_grad=True)
    loss, w = renyi_loss(loglik, alpha)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(loglik.grad).all()
    assert torch.allclose(w.sum(0), torch.ones(3))


@pytest.mark.parametrize("alpha", [0.0, 1e-8, 0.3, 1.0, 4.0, INF])
def test_gradient_is_responsibility_times_member_gradient(alpha):
    # dl/dL[k, b] = -w[k, b] / B: each member follows its own likelihood gradient scaled by its routing.
    torch.manual_seed(2)
    loglik = (-20 * torch.rand(3, 5, dtype=torch.float64)).requires_grad_()
    loss, w = renyi_loss(loglik, alpha)
    (grad,) = torch.autograd.grad(loss, loglik)
    assert torch.allclose(grad, -w / loglik.shape[1], atol=1e-9)


def test_gradient_through_a_model_is_weighted_member_gradient():
    # With L[k] = f(theta_k), the gradient for theta_k is w_k times that member's own NLL gradient.
    torch.manual_seed(3)
    theta = torch.randn(2, 4, requires_grad=True)
    x = torch.randn(4)
    loglik = -((theta @ x).unsqueeze(1) - 1.0) ** 2  # [K, B=1]
    loss, w = renyi_loss(loglik, 1.0)
    (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
    for k in range(2):
        (own,) = torch.autograd.grad(-loglik[k, 0], theta, retain_graph=True)
        assert torch.allclose(grad[k], w[k, 0] * own[k], atol=1e-6)


def test_negative_alpha_rejected():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        renyi_loss(torch.zeros(2, 1), -0.5)


def test_gaussian_prior():
    a = torch.ones(2, 3, 4)  # K = 2: sum of squares 24
    b = torch.full((2, 5, 3), 2.0)  # sum of squares 120
    assert gaussian_prior([a, b], num_members=2, prior_std=2.0).item() == pytest.approx(144 / (2 * 4 * 2))
    with pytest.raises(ValueError, match="prior_std"):
        gaussian_prior([a], 2, 0.0)


def test_winner_take_all_shares_ties_equally():
    # The limit of softmax(alpha L) as alpha grows: tied maxima share the weight (issue #13: argmax gave it all to
    # member 0, and at initialisation every member ties, so members 1.. never got a gradient).
    loglik = torch.tensor([[0.0, -1.0, -2.0, -5.0], [0.0, -1.0, -3.0, -5.0], [-1.0, -1.0, -2.0, -5.0]])
    expected = torch.tensor([[0.5, 1 / 3, 0.5, 1 / 3], [0.5, 1 / 3, 0.0, 1 / 3], [0.0, 1 / 3, 0.5, 1 / 3]])
    torch.testing.assert_close(responsibilities(loglik, INF), expected)
    torch.testing.assert_close(responsibilities(loglik, 200.0), expected)  # the finite-alpha softmax agrees
    # Non-uniform weights: the limit gives tied maxima weight in proportion to pi.
    weights = torch.tensor([0.2, 0.6, 0.2]).log()
    assert responsibilities(loglik, INF, weights)[:, 0].tolist() == pytest.approx([0.25, 0.75, 0.0])


def test_winner_take_all_gradient_is_shared_among_ties():
    loglik = torch.zeros(3, 2, requires_grad=True)  # every member tied, as at initialisation (B = 0)
    loss, w = renyi_loss(loglik, INF)
    (grad,) = torch.autograd.grad(loss, loglik)
    assert loss.item() == 0.0
    torch.testing.assert_close(grad, torch.full((3, 2), -1 / 6))
    torch.testing.assert_close(grad, -w / 2)
    loglik = torch.tensor([[-1.0, -2.0], [-1.0, -0.5], [-4.0, -0.5]], requires_grad=True)
    per_example = renyi_per_example(loglik, INF)
    assert per_example.tolist() == [1.0, 0.5]  # the value is exactly -max_k L
    (grad,) = torch.autograd.grad(per_example.sum(), loglik)
    torch.testing.assert_close(grad, -torch.tensor([[0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_large_spread_is_as_precise_as_a_plain_logsumexp(alpha):
    # Issue #13: centring on the mean before the logsumexp lost ~alpha * spread * eps (0.693359 for log 2).
    assert renyi_loss(torch.tensor([[-1e4], [0.0]]), alpha)[0].item() == pytest.approx(math.log(2) / alpha,
                                                                                       rel=1e-6)
    generator = torch.Generator().manual_seed(4)
    loglik = -torch.exp(9 * torch.rand(3, 64, generator=generator))  # magnitudes 1 .. 8000
    reference = -torch.logsumexp(alpha * loglik.double() - math.log(3), 0) / alpha
    torch.testing.assert_close(renyi_per_example(loglik, alpha).double(), reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [1e-8, 0.3, 1.0, 4.0, INF])
def test_a_member_at_minus_infinity_is_ignored_not_nan(alpha):
    # A member with zero likelihood (L = -inf) contributes nothing; the others carry the example.
    loglik = torch.tensor([[-INF, -1.0], [-2.0, -3.0]], requires_grad=True)
    loss, w = renyi_loss(loglik, alpha)
    (grad,) = torch.autograd.grad(loss, loglik)
    expected = [(2 + math.log(2) / alpha) if alpha < INF else 2.0,
                -math.log(0.5 * math.exp(-alpha) + 0.5 * math.exp(-3 * alpha)) / alpha if alpha < INF else 1.0]
    assert renyi_per_example(loglik, alpha).tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(w).all() and w[:, 0].tolist() == [0.0, 1.0]
    assert torch.isfinite(grad).all() and grad[0, 0] == 0.0
    torch.testing.assert_close(grad, -w / 2)
    if alpha == 1.0:
        assert loss.item() == pytest.approx(2.1297, abs=1e-4)


def test_a_member_at_minus_infinity_at_alpha_zero_is_an_infinite_loss():
    assert renyi_per_example(torch.tensor([[-INF], [-2.0]]), 0.0).item() == INF


def test_alpha_schedule_ramps_linearly_then_holds():
    assert [alpha_schedule(2.0, s, 4) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert [alpha_schedule(math.inf, s, 4) for s in range(5)] == [0.0, 1 / 3, 1.0, 3.0, math.inf]  # s / (N - s)
    assert alpha_schedule(1.0, 0, 0) == 1.0  # no warm-up
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        alpha_schedule(-1.0, 0, 4)
