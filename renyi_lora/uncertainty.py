"""Prediction, uncertainty and calibration metrics for an ensemble of K members (README, "The method in one screen").

Pure tensor maths: tensors in, tensors (or Python floats for dataset-level scores) out; no modules or I/O.
Shape vocabulary: K members, N examples, C candidates (classes, answers, or vocabulary entries).

    mixture p(y|x) = sum_k pi_k p_k(y|x)
    total = H[mixture];  aleatoric = sum_k pi_k H[p_k];  epistemic = total - aleatoric (mutual information)

Everything is computed from log-probabilities, so a member that is certain (log-probability -inf for the
other candidates) is handled exactly: 0 * log 0 is taken as 0, never NaN.

Why not torchmetrics (installed) for ECE and AUROC: its calibration error puts a confidence of exactly 1.0
in a 16th bin of its own (common for confident language models), and its ``binary_auroc`` squashes scores
outside [0, 1] with a sigmoid, which ties every score above ~17 in float32 (an entropy over a vocabulary
easily exceeds that after scaling). Both are a few lines to write with the definitions stated below.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Uncertainty(NamedTuple):
    """Decomposition of predictive uncertainty, each ``[...]`` in nats."""

    total: torch.Tensor  # H[mixture]
    aleatoric: torch.Tensor  # sum_k pi_k H[p_k]: expected member entropy
    epistemic: torch.Tensor  # total - aleatoric: mutual information between prediction and member


class CalibrationBins(NamedTuple):
    """Per-bin statistics of top-label confidence, each ``[num_bins]``; empty bins hold 0."""

    accuracy: torch.Tensor  # fraction correct in the bin
    confidence: torch.Tensor  # mean confidence in the bin
    count: torch.Tensor  # number of examples in the bin

    def calibration_error(self) -> float:
        """Expected calibration error: ``sum_bins (n_bin / N) |accuracy_bin - confidence_bin|``."""
        weights = self.count / self.count.sum().clamp_min(1.0)
        return (weights * (self.accuracy - self.confidence).abs()).sum().item()


def broadcast_log_weights(log_weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Mixture log-weights shaped to broadcast against ``like [K, ...]``: ``[K]`` (one per member) or per-row
    ``[K, B, ...]`` (a leading part of ``like``'s shape), padded with trailing 1s; uniform ``-log K`` if None."""
    num_members = like.shape[0]
    if log_weights is None:
        log_weights = torch.full((num_members,), -math.log(num_members), dtype=torch.float64)
    elif log_weights.dim() == 0 or log_weights.shape != like.shape[: log_weights.dim()]:
        raise ValueError(
            f"log_weights must have shape [K] = [{num_members}] (one log mixture weight per member) or a leading "
            f"part of {list(like.shape)} (per-row weights); got {tuple(log_weights.shape)}"
        )
    return log_weights.to(like).view(*log_weights.shape, *([1] * (like.dim() - log_weights.dim())))


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of distributions given by log-probabilities.

    Args:
        log_probs: ``[..., C]`` normalised log-probabilities; ``-inf`` entries (probability 0) are allowed.

    Returns:
        ``[...]`` the entropy ``-sum_c p_c log p_c``, with ``0 log 0 = 0``.
    """
    # masked_fill rather than where(p > 0, p * log p, 0): keeps the gradient finite at log p = -inf too.
    finite_log_probs = log_probs.masked_fill(torch.isneginf(log_probs), 0.0)
    return -(log_probs.exp() * finite_log_probs).sum(-1)


def mixture_log_probs(member_log_probs: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities of the weighted mixture ``sum_k pi_k p_k``.

    Args:
        member_log_probs: ``[K, ..., C]`` each member's normalised log-probabilities.
        log_weights: ``[K]`` normalised log mixture weights ``log pi_k``; uniform ``-log K`` if None.

    Returns:
        ``[..., C]`` ``logsumexp_k(log p_k + log pi_k)``.
    """
    return torch.logsumexp(member_log_probs + broadcast_log_weights(log_weights, member_log_probs), dim=0)


def decompose_uncertainty(member_log_probs: torch.Tensor, log_weights: torch.Tensor | None = None) -> Uncertainty:
    """Total, aleatoric and epistemic (mutual information) uncertainty of the mixture, in nats.

    Args:
        member_log_probs: ``[K, ..., C]`` each member's normalised log-probabilities over C candidates.
        log_weights: ``[K]`` normalised log mixture weights; uniform if None.

    Returns:
        ``Uncertainty(total, aleatoric, epistemic)``, each ``[...]``. ``epistemic`` is clamped at 0: it is a
        mutual information, and only rounding can make ``total - aleatoric`` negative.
    """
    if member_log_probs.dim() < 2:
        raise ValueError(f"member_log_probs must be [K, ..., C] (at least 2 dims); got {tuple(member_log_probs.shape)}")
    total = entropy(mixture_log_probs(member_log_probs, log_weights))
    weights = broadcast_log_weights(log_weights, member_log_probs).squeeze(-1).exp()  # [K, 1, ..., 1] over [...]
    aleatoric = (weights * entropy(member_log_probs)).sum(0)
    return Uncertainty(total, aleatoric, (total - aleatoric).clamp_min(0.0))


def member_disagreement(stat: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted variance across members of a per-member statistic (e.g. each member's refusal rate).

    Args:
        stat: ``[K, ...]`` the statistic for each member.
        log_weights: ``[K]`` normalised log mixture weights; uniform if None.

    Returns:
        ``[...]`` ``sum_k pi_k (s_k - m)^2`` with ``m = sum_k pi_k s_k`` (population variance, no Bessel
        correction: the members are the whole mixture, not a sample from it).
    """
    weights = broadcast_log_weights(log_weights, stat).exp()
    mean = (weights * stat).sum(0)
    return (weights * (stat - mean) ** 2).sum(0)


def _check_probs_labels(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"expected probs [N, C] and labels [N]; got probs {tuple(probs.shape)} and labels {tuple(labels.shape)}"
        )


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose most probable class (first one on ties) is the label.

    Args:
        probs: ``[N, C]`` predicted probabilities.
        labels: ``[N]`` integer class indices.
    """
    _check_probs_labels(probs, labels)
    return (probs.argmax(-1) == labels).double().mean().item()


def calibration_bins(confidences: torch.Tensor, correct: torch.Tensor, num_bins: int = 15) -> CalibrationBins:
    """Bin examples by confidence into ``num_bins`` equal-width bins ``(i/num_bins, (i+1)/num_bins]``.

    A confidence of exactly 0 falls in the first bin, exactly 1 in the last.

    Args:
        confidences: ``[N]`` top-label confidence in [0, 1].
        correct: ``[N]`` bool, whether the top label was right.
        num_bins: number of bins (>= 1).

    Returns:
        ``CalibrationBins`` of ``[num_bins]`` float64 tensors.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1; got {num_bins}")
    if confidences.dim() != 1 or correct.shape != confidences.shape:
        raise ValueError(
            f"expected confidences [N] and correct [N]; got {tuple(confidences.shape)} and {tuple(correct.shape)}"
        )
    confidences = confidences.double()
    inner_edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64, device=confidences.device)[1:-1]
    index = torch.bucketize(confidences, inner_edges, right=False)  # [N], edges[i-1] < c <= edges[i]
    zeros = torch.zeros(num_bins, dtype=torch.float64, device=confidences.device)
    count = zeros.index_add(0, index, torch.ones_like(confidences))
    denominator = count.clamp_min(1.0)
    return CalibrationBins(
        accuracy=zeros.index_add(0, index, correct.double()) / denominator,
        confidence=zeros.index_add(0, index, confidences) / denominator,
        count=count,
    )


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """Expected calibration error of the top label: ``sum_bins (n_bin / N) |accuracy_bin - confidence_bin|``.

    Args:
        probs: ``[N, C]`` predicted probabilities.
        labels: ``[N]`` integer class indices.
        num_bins: equal-width bins on the top-label confidence (see ``calibration_bins``).
    """
    _check_probs_labels(probs, labels)
    confidences, predicted = probs.max(-1)
    return calibration_bins(confidences, predicted == labels, num_bins).calibration_error()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of ``-log p(label)`` in nats; ``inf`` if some label has probability exactly 0.

    Args:
        probs: ``[N, C]`` predicted probabilities.
        labels: ``[N]`` integer class indices.
    """
    _check_probs_labels(probs, labels)
    return -probs.double().gather(-1, labels.long()[:, None]).log().mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: ``mean_n sum_c (p_nc - [c == label_n])^2``, in [0, 2].

    Args:
        probs: ``[N, C]`` predicted probabilities.
        labels: ``[N]`` integer class indices.
    """
    _check_probs_labels(probs, labels)
    one_hot = torch.nn.functional.one_hot(labels.long(), probs.shape[-1]).double()
    return ((probs.double() - one_hot) ** 2).sum(-1).mean().item()


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative.

    Ties between a positive and a negative count one half (the Mann-Whitney U statistic). Use it with
    uncertainty as the score and errors, or out-of-distribution inputs, as the positives.

    Args:
        scores: ``[N]`` real scores (any range; only their order matters).
        positives: ``[N]`` bool.

    Returns:
        The AUROC in [0, 1], or NaN (silently) when only one class is present, where it is undefined.
    """
    if scores.dim() != 1 or positives.shape != scores.shape:
        raise ValueError(
            f"expected scores [N] and positives [N]; got {tuple(scores.shape)} and {tuple(positives.shape)}"
        )
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; AUROC needs every score to be ordered")
    positives = positives.bool()
    num_positive = int(positives.sum())
    num_negative = positives.numel() - num_positive
    if num_positive == 0 or num_negative == 0:
        return math.nan
    # Average 1-based ranks: a tie group occupying positions s+1..s+n gets rank s + (n + 1) / 2.
    _, group, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.double()
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[group]  # [N]
    u_statistic = ranks[positives].sum().item() - num_positive * (num_positive + 1) / 2
    return u_statistic / (num_positive * num_negative)


def risk_coverage_curve(uncertainty: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective prediction: the error rate among the most confident examples, for every coverage.

    Examples are sorted by increasing uncertainty; point i keeps the i + 1 most confident ones. Within a
    group of tied uncertainties the kept errors are counted pro rata (the expected risk under a random
    tie-break), so the curve does not depend on the input order.

    Args:
        uncertainty: ``[N]`` uncertainty of each prediction (lower = more confident).
        correct: ``[N]`` bool, whether the prediction was right.

    Returns:
        ``(coverage, risk)``, each ``[N]`` float64: ``coverage[i] = (i + 1) / N``, ``risk[i]`` the error rate
        among the kept examples.
    """
    if uncertainty.dim() != 1 or correct.shape != uncertainty.shape or uncertainty.numel() == 0:
        raise ValueError(
            f"expected non-empty uncertainty [N] and correct [N]; got {tuple(uncertainty.shape)} and "
            f"{tuple(correct.shape)}"
        )
    sorted_uncertainty, order = uncertainty.sort(stable=True)
    errors = (~correct.bool()[order]).double()  # [N]
    _, group, counts = torch.unique_consecutive(sorted_uncertainty, return_inverse=True, return_counts=True)
    counts = counts.double()
    group_errors = torch.zeros_like(counts).index_add(0, group, errors)  # [G]
    errors_before_group = group_errors.cumsum(0) - group_errors
    start_of_group = counts.cumsum(0) - counts
    kept = torch.arange(1, errors.numel() + 1, dtype=torch.float64, device=errors.device)  # [N]
    kept_in_group = kept - start_of_group[group]
    kept_errors = errors_before_group[group] + kept_in_group * group_errors[group] / counts[group]
    return kept / errors.numel(), kept_errors / kept


def area_under_risk_coverage(uncertainty: torch.Tensor, correct: torch.Tensor) -> float:
    """AURC: the mean risk over the N coverage levels of ``risk_coverage_curve`` (lower is better).

    Args:
        uncertainty: ``[N]`` uncertainty of each prediction.
        correct: ``[N]`` bool, whether the prediction was right.
    """
    _, risk = risk_coverage_curve(uncertainty, correct)
    return risk.mean().item()


def accuracy_at_coverage(uncertainty: torch.Tensor, correct: torch.Tensor, coverage: float = 0.8) -> float:
    """Accuracy on the ``ceil(coverage * N)`` most confident examples (ties counted pro rata, as in
    ``risk_coverage_curve``): what selective prediction keeps when it may abstain on the rest.

    Args:
        uncertainty: ``[N]`` uncertainty of each prediction.
        correct: ``[N]`` bool, whether the prediction was right.
        coverage: fraction kept, in (0, 1].
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1]; got {coverage}")
    _, risk = risk_coverage_curve(uncertainty, correct)
    kept = math.ceil(coverage * risk.numel() - 1e-9)  # the float product may land a hair above an integer
    return 1.0 - risk[kept - 1].item()


def normalized_mutual_information(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """NMI between two labellings of N items: ``I(labels; clusters) / ((H(labels) + H(clusters)) / 2)``, the
    arithmetic normalisation of scikit-learn's ``normalized_mutual_info_score`` (its default), with its limits.

    Used to ask whether routing follows the groups: labels = each example's group, clusters = its owning member
    (argmax responsibility). 1: the members split exactly by group (any relabelling); 0: independent.

    Args:
        labels, clusters: ``[N]`` integer ids (any values).

    Returns:
        NMI in [0, 1]; 1.0 when both labellings are constant (nothing to split, as scikit-learn), 0.0 when only one is.
    """
    if labels.dim() != 1 or clusters.shape != labels.shape:
        raise ValueError(f"expected labels [N] and clusters [N]; got {tuple(labels.shape)} and {tuple(clusters.shape)}")
    label_names, label_ids = torch.unique(labels, return_inverse=True)
    cluster_names, cluster_ids = torch.unique(clusters, return_inverse=True)
    num_labels, num_clusters = len(label_names), len(cluster_names)
    if num_labels == num_clusters and num_labels <= 1:
        return 1.0
    joint = torch.zeros(num_labels, num_clusters, dtype=torch.float64)
    joint.index_put_((label_ids, cluster_ids), torch.ones(labels.numel(), dtype=torch.float64), accumulate=True)
    joint /= labels.numel()  # [L, C] joint distribution
    p_label, p_cluster = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = (joint[nonzero] * (joint[nonzero] / (p_label[:, None] * p_cluster[None])[nonzero]).log()).sum().item()
    if mutual <= 0:
        return 0.0
    mean_entropy = (entropy(p_label.log()).item() + entropy(p_cluster.log()).item()) / 2
    return mutual / max(mean_entropy, torch.finfo(torch.float64).eps)
