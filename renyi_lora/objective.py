"""The alpha-Renyi variational objective over K members (README, "The method in one screen").

Pure tensor maths: no modules, trainer or I/O. ``L[k, b]`` is member k's log-likelihood of example b.

    l_alpha(b) = -(1/alpha) * logsumexp_k(alpha * L[k, b] + log pi_k)
    w[k, b]    = softmax_k(alpha * L[k, b] + log pi_k)           (the soft routing)

alpha -> 0 is the variational-Bayes / Gibbs term -sum_k pi_k L[k, b] (every member fits every example),
alpha = 1 the negative log-likelihood of the mixture (the PrO posterior's data term), alpha -> inf the
winner-take-all -max_k L[k, b]. Both limits are explicit branches, never a division by zero.
"""

from __future__ import annotations

import math

import torch

from renyi_lora.uncertainty import broadcast_log_weights

# A responsibility below this takes no part in the gradient: exact zeros instead of products with ~1e-30 weights,
# which are subnormal floats deep in the backward pass and make a CPU step over 10x slower. Its contribution is below
# Adam's epsilon (1e-8) times any realistic gradient, so no update changes.
NEGLIGIBLE_WEIGHT = 1e-12

# Below this |alpha * (L - mean_k L)| the log1p/expm1 form is used: logsumexp would round
# exp(alpha * L) to 1 in float32 for tiny alpha and lose the whole O(alpha) signal. Above it the plain,
# uncentred logsumexp is as precise as float32 allows (centring on the mean would cost ~alpha * spread * eps).
_SMALL_SPREAD = 1.0


def _check_alpha(alpha: float) -> None:
    if not (alpha >= 0):  # also rejects NaN
        raise ValueError(f"alpha must be >= 0 (0 = variational Bayes, 1 = mixture, inf = winner-take-all); got {alpha}")


def _winner_weights(loglik: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """``lim_{alpha -> inf} softmax_k(alpha * L + log pi)`` ``[K, ...]``: tied maxima share the weight in proportion
    to pi (equally for uniform pi); members with pi = 0 never win. Argmax would hand a tie to member 0 alone."""
    loglik = loglik.masked_fill(log_pi == -math.inf, -math.inf)
    top = (loglik == loglik.amax(0, keepdim=True)).to(loglik.dtype) * log_pi.exp()  # [K, ...]
    return top / top.sum(0, keepdim=True)


def renyi_per_example(
    loglik: torch.Tensor, alpha: float, log_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-example alpha-Renyi loss.

    Args:
        loglik: ``[K, ...]`` member log-likelihoods (usually ``[K, B]``).
        alpha: Renyi order, ``>= 0``; ``float("inf")`` allowed.
        log_weights: ``[K]`` or ``[K, ...]`` log mixture weights (normalised); uniform if None.

    Returns:
        ``[...]`` (usually ``[B]``) the loss ``l_alpha`` of each example. Its gradient is ``-w[k] grad L[k]``
        with ``w`` the ``responsibilities``, also where members tie (alpha = inf) or a member has L = -inf.
    """
    _check_alpha(alpha)
    log_pi = broadcast_log_weights(log_weights, loglik).expand_as(loglik)
    if alpha == 0:
        return -(log_pi.exp() * loglik).sum(0)
    if math.isinf(alpha):
        # Value -max_k L exactly; gradient -sum_k w_k grad L_k with the tie-shared (detached) w, where autograd
        # through max would route it to one member only.
        w = _winner_weights(loglik.detach(), log_pi)
        best = loglik.detach().where(w > 0, -math.inf).amax(0)  # [...] the (tied) maximum
        best = best.clamp(min=torch.finfo(loglik.dtype).min)  # finite, so that L - best is never -inf - -inf
        return -(best + torch.where(w > 0, w * (loglik - best), 0.0).sum(0))
    large = -torch.logsumexp(alpha * loglik + log_pi, dim=0) / alpha  # [...]
    # Small spreads: centre on the alpha = 0 value m = sum_k pi_k L_k, so that
    # l_alpha = -m - (1/alpha) log(1 + sum_k pi_k expm1(alpha (L_k - m))). Only finite rows can take this branch;
    # the others are zeroed in it, and the spread clipped, so that the unused branch stays finite for autograd.
    finite = torch.isfinite(loglik).all(0)  # [...]
    pi = log_pi.exp()
    safe = torch.where(finite, loglik, 0.0)  # [K, ...]
    mean = (pi * safe).sum(0)  # [...]
    spread = alpha * (safe - mean)  # [K, ...]
    small = finite & (spread.abs().amax(0) <= _SMALL_SPREAD)  # [...]
    clipped = spread.clamp(-_SMALL_SPREAD, _SMALL_SPREAD)
    residual = torch.log1p((pi * torch.expm1(clipped)).sum(0))
    return torch.where(small, -mean - residual / alpha, large)


def responsibilities(
    loglik: torch.Tensor, alpha: float, log_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft routing ``w[k, ...] = softmax_k(alpha * L + log pi)`` (detached).

    Args:
        loglik: ``[K, ...]`` member log-likelihoods.
        alpha: Renyi order ``>= 0``; at 0 the weights are ``pi``; at inf one-hot on the maximum, tied maxima
            sharing the weight in proportion to pi (the limit of the softmax).
        log_weights: ``[K]`` or ``[K, ...]`` log mixture weights; uniform if None.

    Returns:
        ``[K, ...]`` responsibilities summing to 1 over K.
    """
    _check_alpha(alpha)
    loglik = loglik.detach()
    log_pi = broadcast_log_weights(log_weights, loglik).expand_as(loglik)
    if alpha == 0:
        return log_pi.exp()
    if math.isinf(alpha):
        return _winner_weights(loglik, log_pi)
    return torch.softmax(alpha * loglik + log_pi, dim=0)


def gradient_weights(w: torch.Tensor, floor: float = 0.0, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """How much each member's likelihood gradient counts: ``(1 - floor) * w + floor * pi``, detached, with entries
    below ``NEGLIGIBLE_WEIGHT`` set to exactly 0.

    ``floor > 0`` is the gradient of ``(1 - floor) * l_alpha + floor * l_0``: every member keeps learning from every
    example with weight at least ``floor * pi_k`` (LoRA-MCL's relaxed winner-take-all keeps such an epsilon for the
    same reason). Without it a member that falls behind early on long sequences gets ``w ~ exp(-alpha * lead)`` of the
    gradient, stops learning, and never comes back.

    Args:
        w: ``[K, ...]`` responsibilities.
        floor: in ``[0, 1]``.
        log_weights: ``[K]`` or ``[K, ...]`` log mixture weights; uniform if None.

    Returns:
        ``[K, ...]`` the gradient weights (summing to 1 over K wherever ``w`` does, up to the dropped negligible ones).
    """
    if not 0 <= floor <= 1:
        raise ValueError(f"routing floor must be in [0, 1]; got {floor}")
    w = w.detach()
    if floor > 0:
        w = (1 - floor) * w + floor * broadcast_log_weights(log_weights, w).exp()
    return torch.where(w < NEGLIGIBLE_WEIGHT, 0.0, w)


def weighted_loglik_loss(value: torch.Tensor, loglik: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``value`` (any shape ``[...]``, its own gradient ignored) whose gradient is ``-sum_k weights[k] grad L[k]``.

    Args:
        value: ``[...]`` the loss to report.
        loglik: ``[K, ...]`` member log-likelihoods (with gradient).
        weights: ``[K, ...]`` detached gradient weights; members with weight 0 (also those with ``L = -inf``)
            contribute exact zeros.
    """
    used = weights > 0
    surrogate = -torch.where(used, weights * torch.where(used, loglik, 0.0), 0.0).sum(0)  # [...]
    return value.detach() + surrogate - surrogate.detach()


def renyi_loss(
    loglik: torch.Tensor, alpha: float, log_weights: torch.Tensor | None = None, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch alpha-Renyi data term and the routing.

    Args:
        loglik: ``[K, B]`` member log-likelihoods.
        alpha: Renyi order ``>= 0`` (``float("inf")`` allowed).
        log_weights: ``[K]`` or ``[K, B]`` log mixture weights; uniform if None.
        floor: routing floor of the gradient (``gradient_weights``); 0 = the exact gradient of ``l_alpha``.

    Returns:
        ``(loss, w)``: the scalar ``mean_b l_alpha(b)`` and the detached responsibilities ``[K, B]``.
        The gradient of ``loss`` for member k is ``-g[k, b] * grad L[k, b] / B`` with ``g = gradient_weights(w,
        floor)``: ``w`` itself for ``floor = 0``, except that weights below ``NEGLIGIBLE_WEIGHT`` give exact zeros.
    """
    w = responsibilities(loglik, alpha, log_weights)
    value = renyi_per_example(loglik.detach(), alpha, log_weights)  # [B]
    loss = weighted_loglik_loss(value, loglik, gradient_weights(w, floor, log_weights)).mean()
    return loss, w


def alpha_schedule(alpha: float, step: int, warmup_steps: int) -> float:
    """The Renyi order after ``step`` completed optimizer steps of a warm-up over ``warmup_steps`` (0 = none).

    Linear from 0: ``alpha * step / N`` for ``step < N``; for ``alpha = inf`` ``step / (N - step)`` (1 halfway, so that
    ``alpha / (1 + alpha)`` rises linearly to 1, and winner-take-all from step N); ``alpha`` from step N on. Members
    first fit what every example shares, then split along their largest disagreement (deterministic annealing).
    """
    _check_alpha(alpha)
    if warmup_steps <= 0 or step >= warmup_steps:
        return alpha
    return step / (warmup_steps - step) if math.isinf(alpha) else alpha * step / warmup_steps


def gaussian_prior(lora_params: list[torch.Tensor], num_members: int, prior_std: float) -> torch.Tensor:
    """Gaussian prior term ``(1/K) sum_k ||theta_k||^2 / (2 prior_std^2)``.

    Args:
        lora_params: stacked member tensors, each ``[K, ...]`` (e.g. ``lora_A [K, R, Din]``).
        num_members: K.
        prior_std: standard deviation of the N(0, prior_std^2 I) prior.

    Returns:
        Scalar: the prior's cross-entropy part that stands in for KL(Q || prior) with K point masses.
    """
    if prior_std <= 0:
        raise ValueError(f"prior_std must be > 0; got {prior_std}")
    squared = sum(p.float().pow(2).sum() for p in lora_params)
    return torch.as_tensor(squared) / (2 * prior_std**2 * num_members)


def routed_loss(
    token_loglik: torch.Tensor,
    target_mask: torch.Tensor,
    alpha: float,
    routing_level: str = "sequence",
    *, length_normalize: bool = False,
    floor: float = 0.0,
    log_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The data term from per-token member log-likelihoods, routed per sequence or per token.

    Args:
        token_loglik: ``[K, B, T]`` log-likelihood of each target token (0 elsewhere).
        target_mask: ``[B, T]`` True on target (completion) tokens.
        alpha: Renyi order.
        routing_level: ``"sequence"``: ``L[k, b]`` is the sequence log-likelihood and one routing decision is
            made per example; ``"token"``: ``l_alpha`` is applied to every token and summed per sequence.
        length_normalize: divide each sequence's total by its number of target tokens.
        floor: routing floor of the gradient (``gradient_weights``), per sequence or per token.
        log_weights: ``[K]`` log mixture weights; uniform if None.

    Returns:
        ``(loss, w, loglik)``: scalar mean over B; responsibilities ``[K, B]`` (per-token ones averaged over
        the sequence at token level); per-member sequence log-likelihood ``[K, B]`` (normalised if asked).
    """
    count = target_mask.sum(-1).clamp(min=1).to(token_loglik.dtype)  # [B]
    loglik = token_loglik.sum(-1)  # [K, B]
    if length_normalize:
        loglik = loglik / count
    if routing_level == "sequence":
        loss, w = renyi_loss(loglik, alpha, log_weights, floor)
        return loss, w, loglik
    if routing_level != "token":
        raise ValueError(f"routing_level must be 'sequence' or 'token'; got {routing_level!r}")
    mask = target_mask.to(token_loglik.dtype)
    w_token = responsibilities(token_loglik, alpha, log_weights) * mask  # [K, B, T]
    value = renyi_per_example(token_loglik.detach(), alpha, log_weights)  # [B, T]
    weights = gradient_weights(w_token, floor, log_weights) * mask  # [K, B, T]
    per_token = weighted_loglik_loss(value, token_loglik, weights) * mask  # [B, T]
    per_sequence = per_token.sum(-1)  # [B]
    if length_normalize:
        per_sequence = per_sequence / count
    return per_sequence.mean(), w_token.sum(-1) / count, loglik
