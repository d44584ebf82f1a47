"""Uncertainty and calibration metrics against hand computations and brute-force oracles."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from renyi_lora.uncertainty import (
    accuracy,
    area_under_risk_coverage,
    auroc,
    brier_score,
    calibration_bins,
    decompose_uncertainty,
    expected_calibration_error,
    member_disagreement,
    mixture_log_probs,
    negative_log_likelihood,
    risk_coverage_curve,
)

LOG2 = math.log(2.0)


def random_log_probs(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


# --- mixture and decomposition ------------------------------------------------------------------------------


def test_mixture_with_weights_equals_hand_computation():
    p1 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p2 = torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64)
    members = torch.stack([p1, p2]).log()  # [K=2, C=3]
    weighted = mixture_log_probs(members, torch.tensor([0.25, 0.75], dtype=torch.float64).log())
    torch.testing.assert_close(weighted.exp(), torch.tensor([0.2, 0.15, 0.65], dtype=torch.float64))
    uniform = mixture_log_probs(members)
    torch.testing.assert_close(uniform.exp(), torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64))


def test_mixture_keeps_leading_dims_and_rejects_bad_weights():
    members = random_log_probs(3, 4, 5, 6)  # [K, B, T, C]
    mixture = mixture_log_probs(members)
    assert mixture.shape == (4, 5, 6)
    torch.testing.assert_close(mixture.exp(), members.exp().mean(0))
    with pytest.raises(ValueError, match="log_weights"):
        mixture_log_probs(members, torch.zeros(2))


def test_identical_members_have_zero_mutual_information():
    member = random_log_probs(5, 7, seed=1)  # [B, C]
    members = member.expand(4, 5, 7)  # [K, B, C]
    result = decompose_uncertainty(members)
    member_entropy = torch.tensor([scipy_entropy(row) for row in member.exp().numpy()], dtype=torch.float64)
    torch.testing.assert_close(result.total, member_entropy)
    torch.testing.assert_close(result.aleatoric, member_entropy)
    torch.testing.assert_close(result.epistemic, torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_opposite_certain_members_have_log2_mutual_information_exact_zeros():
    members = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).log()  # contains -inf
    result = decompose_uncertainty(members)
    for value in result:
        assert not torch.isnan(value).any()
    assert result.total.item() == pytest.approx(LOG2, abs=1e-12)
    assert result.aleatoric.item() == 0.0
    assert result.epistemic.item() == pytest.approx(LOG2, abs=1e-12)


def test_opposite_nearly_certain_members_have_log2_minus_member_entropy():
    eps = 1e-9
    members = torch.tensor([[1 - eps, eps], [eps, 1 - eps]], dtype=torch.float64).log()
    result = decompose_uncertainty(members)
    binary_entropy = -(eps * math.log(eps) + (1 - eps) * math.log1p(-eps))  # ~2.2e-8
    assert result.total.item() == pytest.approx(LOG2, abs=1e-14)
    assert result.aleatoric.item() == pytest.approx(binary_entropy, rel=1e-6)
    assert result.epistemic.item() == pytest.approx(LOG2 - binary_entropy, abs=1e-14)


def test_gradient_is_finite_with_exact_zeros():
    logits = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 0.5, -math.inf]], dtype=torch.float64, requires_grad=True)
    result = decompose_uncertainty(torch.log_softmax(logits, dim=-1))
    (result.total + result.aleatoric).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decomposition_matches_scipy_and_adds_up(seed):
    members = random_log_probs(3, 8, 5, seed=seed)  # [K, B, C]
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    result = decompose_uncertainty(members, weights.log())
    probs = members.exp().numpy()
    mixture = np.einsum("k,kbc->bc", weights.numpy(), probs)
    expected_total = scipy_entropy(mixture, axis=-1)
    expected_aleatoric = np.einsum("k,kb->b", weights.numpy(), scipy_entropy(probs, axis=-1))
    np.testing.assert_allclose(result.total.numpy(), expected_total, rtol=1e-10)
    np.testing.assert_allclose(result.aleatoric.numpy(), expected_aleatoric, rtol=1e-10)
    torch.testing.assert_close(result.total, result.aleatoric + result.epistemic)
    assert (result.epistemic > 0).all()  # distinct random members disagree


def test_member_disagreement_is_weighted_variance():
    stat = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert member_disagreement(stat).item() == pytest.approx(0.25)
    assert member_disagreement(stat, torch.tensor([0.25, 0.75]).log()).item() == pytest.approx(0.1875)
    batched = torch.tensor([[0.2, 0.0, 3.0], [0.2, 1.0, 1.0], [0.2, 2.0, 2.0]], dtype=torch.float64)  # [K=3, 3]
    torch.testing.assert_close(
        member_disagreement(batched), torch.tensor([0.0, 2.0 / 3.0, 2.0 / 3.0], dtype=torch.float64)
    )


# --- calibration and accuracy -------------------------------------------------------------------------------

HAND_PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.2, 0.2, 0.6]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 2, 2])


def test_accuracy_nll_brier_on_hand_case():
    assert accuracy(HAND_PROBS, HAND_LABELS) == pytest.approx(2 / 3)
    expected_nll = -(math.log(0.7) + math.log(0.4) + math.log(0.6)) / 3
    assert negative_log_likelihood(HAND_PROBS, HAND_LABELS) == pytest.approx(expected_nll)
    # per example: 0.09+0.04+0.01, 0.01+0.25+0.36, 0.04+0.04+0.16
    assert brier_score(HAND_PROBS, HAND_LABELS) == pytest.approx((0.14 + 0.62 + 0.24) / 3)


def test_nll_is_inf_for_zero_probability_label_and_shapes_are_checked():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert negative_log_likelihood(probs, torch.tensor([1, 0])) == math.inf
    with pytest.raises(ValueError, match="labels"):
        accuracy(probs, torch.tensor([0, 1, 1]))


def brute_force_ece(probs: torch.Tensor, labels: torch.Tensor, num_bins: int) -> float:
    confidences = probs.max(-1).values.tolist()
    correct = (probs.argmax(-1) == labels).tolist()
    total = 0.0
    for i in range(num_bins):
        low, high = i / num_bins, (i + 1) / num_bins
        members = [n for n, c in enumerate(confidences) if low < c <= high or (i == 0 and c == 0.0)]
        if members:
            bin_accuracy = sum(correct[n] for n in members) / len(members)
            bin_confidence = sum(confidences[n] for n in members) / len(members)
            total += len(members) / len(confidences) * abs(bin_accuracy - bin_confidence)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num_bins", [15, 4])
def test_ece_equals_brute_force(seed, num_bins):
    generator = torch.Generator().manual_seed(seed)
    probs = random_log_probs(200, 5, seed=seed, scale=1.0 + seed).exp()
    labels = torch.randint(0, 5, (200,), generator=generator)
    expected = brute_force_ece(probs, labels, num_bins)
    assert expected > 0.01
    assert expected_calibration_error(probs, labels, num_bins) == pytest.approx(expected, abs=1e-12)


def test_ece_hand_case_puts_confidence_one_in_last_bin():
    # 5 bins; top confidences 0.9 (right), 0.85 (wrong), 0.7 (right), 1.0 (wrong).
    probs = torch.tensor([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    # bin (0.8, 1]: accuracy 1/3, confidence 2.75/3, weight 3/4; bin (0.6, 0.8]: |1 - 0.7|, weight 1/4.
    expected = 0.75 * abs(1 / 3 - 2.75 / 3) + 0.25 * 0.3
    assert expected_calibration_error(probs, labels, num_bins=5) == pytest.approx(expected, abs=1e-6)
    bins = calibration_bins(probs.max(-1).values, probs.argmax(-1) == labels, num_bins=5)
    assert bins.count.tolist() == [0, 0, 0, 1, 3]


def test_calibration_bins_are_closed_on_the_right():
    # Exact binary fractions on the edges of 4 bins: (0, 1/4] holds 0 and 1/4, (1/4, 1/2] holds 1/2, ...
    confidences = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    bins = calibration_bins(confidences, torch.tensor([True, False, True, True, False]), num_bins=4)
    assert bins.count.tolist() == [2, 1, 1, 1]
    assert bins.accuracy.tolist() == [0.5, 1.0, 1.0, 0.0]
    assert bins.confidence.tolist() == [0.125, 0.5, 0.75, 1.0]


def test_perfectly_calibrated_bins_give_zero_ece():
    # Confidence 0.75 with 3 of 4 right and confidence 1.0 always right.
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-7)


# --- AUROC and selective prediction -------------------------------------------------------------------------


def test_auroc_known_values():
    positives = torch.tensor([False, False, True, True])
    scores = torch.tensor([20.0, 21.0, 22.0, 23.0])  # beyond where a sigmoid would saturate in float32
    assert auroc(scores, positives) == 1.0
    assert auroc(-scores, positives) == 0.0
    assert auroc(torch.full((4,), 3.0), positives) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_pairwise_count_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (60,), generator=generator).float()  # many ties
    positives = torch.rand(60, generator=generator) < 0.4
    positive_scores, negative_scores = scores[positives].tolist(), scores[~positives].tolist()
    wins = sum((p > n) + 0.5 * (p == n) for p in positive_scores for n in negative_scores)
    expected = wins / (len(positive_scores) * len(negative_scores))
    assert auroc(scores, positives) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 1.0 and expected != 0.5


def test_auroc_is_nan_without_warning_for_one_class():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))
        assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([False, False])))


def test_risk_coverage_hand_case():
    uncertainty = torch.tensor([0.1, 0.5, 0.3, 0.9])
    correct = torch.tensor([True, False, True, False])
    coverage, risk = risk_coverage_curve(uncertainty, correct)
    torch.testing.assert_close(coverage, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(risk, torch.tensor([0.0, 0.0, 1 / 3, 1 / 2], dtype=torch.float64))
    assert area_under_risk_coverage(uncertainty, correct) == pytest.approx((1 / 3 + 1 / 2) / 4)


def test_risk_coverage_counts_ties_pro_rata_and_ignores_input_order():
    uncertainty = torch.tensor([0.2, 0.2, 0.1, 0.2])
    correct = torch.tensor([False, True, True, True])
    # 0.1 (right) first, then a tie of three holding one error: 1/3 error per kept example of the tie.
    expected = torch.tensor([0.0, (1 / 3) / 2, (2 / 3) / 3, 1 / 4], dtype=torch.float64)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        _, risk = risk_coverage_curve(uncertainty[order], correct[order])
        torch.testing.assert_close(risk, expected)
    _, constant_risk = risk_coverage_curve(torch.zeros(4), correct)
    torch.testing.assert_close(constant_risk, torch.full((4,), 0.25, dtype=torch.float64))


def test_aurc_of_perfect_ranking_is_below_reversed_ranking():
    generator = torch.Generator().manual_seed(0)
    correct = torch.rand(100, generator=generator) < 0.7
    noise = 0.1 * torch.rand(100, generator=generator)
    perfect = (~correct).float() + noise  # every error more uncertain than every right answer
    perfect_aurc = area_under_risk_coverage(perfect, correct)
    reversed_aurc = area_under_risk_coverage(-perfect, correct)
    random_aurc = area_under_risk_coverage(noise, correct)
    assert perfect_aurc < random_aurc < reversed_aurc
    assert auroc(perfect, ~correct) == 1.0
