"""Classical anchors for the survey task, in numpy: what a survey statistician would fit on exactly these answers.

Every anchor is a mixture of K members that answer the items independently of each other (no context):
``log_theta [K, I, C]``, member k's log-probability of answer c to item i (``-inf`` past item i's ``C_i``
answers), and ``log_weights [K]``. So the metrics of ``benchmarks.quality.survey_metrics`` score them exactly as
they score the adapters, whose members read the earlier answers in context.

- ``fit_marginals``: one member, the answer shares of each item (K = 1).
- ``fit_group_marginals``: one member per party, each party's answer shares; at test time each respondent is
  scored by their own party's member (``told_log_weights``): an oracle told the party.
- ``fit_latent_classes``: the latent class model (Lazarsfeld; Goodman 1974) fitted by EM: K classes, answers
  independent within a class. Several seeded restarts; the one with the best training log-likelihood is kept.

Answers are integer codes ``[N, I]`` with ``-1`` for an unanswered item, which every likelihood skips (a
respondent's likelihood is the product over their answered items only: missing at random). Probabilities are
smoothed with ``smoothing`` pseudo-answers per choice (0.5: the Jeffreys / Krichevsky-Trofimov prior), so an answer
unseen in training still has a finite log-probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MISSING = -1


@dataclass(frozen=True)
class ContextFree:
    """K members answering each item independently: ``log_theta [K, I, C]``, ``log_weights [K]``."""

    log_theta: np.ndarray
    log_weights: np.ndarray

    @property
    def num_members(self) -> int:
        return self.log_theta.shape[0]


@dataclass(frozen=True)
class LatentClassFit:
    model: ContextFree
    loglik: float  # training log-likelihood (sum over respondents) of the kept restart
    restart_logliks: list[float]
    iterations: int  # EM iterations of the kept restart
    num_parameters: int

    def bic(self, num_respondents: int) -> float:
        """Bayesian information criterion ``-2 LL + parameters * log N`` (lower is better)."""
        return -2 * self.loglik + self.num_parameters * float(np.log(num_respondents))


def check_answers(answers: np.ndarray, num_choices: list[int]) -> np.ndarray:
    """``answers`` as an int array ``[N, I]``; raises on a code outside ``-1 .. C_i - 1``."""
    answers = np.asarray(answers)
    if answers.ndim != 2 or answers.shape[1] != len(num_choices):
        raise ValueError(f"answers must be [N, I] with I = {len(num_choices)} items; got shape {answers.shape}")
    too_big = answers >= np.asarray(num_choices)[None]
    if (answers < MISSING).any() or too_big.any():
        n, i = np.argwhere((answers < MISSING) | too_big)[0]
        raise ValueError(f"answers[{n}, {i}] = {answers[n, i]}: expected -1 (missing) or a code below {num_choices[i]}")
    return answers.astype(np.int64)


def one_hot(answers: np.ndarray, num_choices: list[int]) -> np.ndarray:
    """``[N, I, C]`` indicator of each answer (all zeros for a missing one)."""
    answers = check_answers(answers, num_choices)
    out = np.zeros((*answers.shape, max(num_choices)))
    n, i = np.nonzero(answers >= 0)
    out[n, i, answers[n, i]] = 1.0
    return out


def valid_choices(num_choices: list[int]) -> np.ndarray:
    """``[I, C]``: True where c < C_i."""
    return np.arange(max(num_choices))[None] < np.asarray(num_choices)[:, None]


def normalise(counts: np.ndarray, num_choices: list[int], smoothing: float) -> np.ndarray:
    """Smoothed log-probabilities ``[..., I, C]`` from answer counts ``[..., I, C]`` (``-inf`` past ``C_i``)."""
    valid = valid_choices(num_choices)
    smoothed = np.where(valid, counts + smoothing, 0.0)
    with np.errstate(divide="ignore"):  # log 0 = -inf past C_i, by design
        return np.log(smoothed) - np.log(smoothed.sum(-1, keepdims=True))


def class_logliks(log_theta: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """``[K, N]``: each member's log-likelihood of each respondent's answered items.

    Args:
        log_theta: ``[K, I, C]``.
        answers: ``[N, I]`` codes, ``-1`` missing.
    """
    observed = answers >= 0  # [N, I]
    picked = log_theta[:, np.arange(answers.shape[1])[None], np.where(observed, answers, 0)]  # [K, N, I]
    return np.where(observed[None], picked, 0.0).sum(-1)


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(peak, axis) + np.log(np.exp(x - peak).sum(axis))


def fit_marginals(answers: np.ndarray, num_choices: list[int], smoothing: float = 0.5) -> ContextFree:
    """Independent item marginals: one member, ``theta[i, c]`` = the smoothed share of answer c to item i."""
    counts = one_hot(answers, num_choices).sum(0)  # [I, C]
    return ContextFree(normalise(counts, num_choices, smoothing)[None], np.zeros(1))


def fit_group_marginals(answers: np.ndarray, num_choices: list[int], groups: list[str], names: list[str],
                        smoothing: float = 0.5) -> ContextFree:
    """One member per group (party) in the order of ``names``: that group's smoothed answer shares; the weights are
    the groups' shares of the respondents (used only for the no-context mixture; tests tell each respondent's group
    through ``told_log_weights``)."""
    onehot = one_hot(answers, num_choices)
    labels = np.asarray(groups)
    unknown = sorted(set(groups) - set(names))
    if unknown:
        raise ValueError(f"groups {unknown} are not among the names {names}")
    counts = np.stack([onehot[labels == name].sum(0) for name in names])  # [G, I, C]
    sizes = np.array([(labels == name).sum() for name in names], dtype=float)
    if (sizes == 0).any():
        empty = [name for name, size in zip(names, sizes, strict=True) if size == 0]
        raise ValueError(f"no training respondent in group(s) {empty}")
    return ContextFree(normalise(counts, num_choices, smoothing), np.log(sizes / sizes.sum()))


def told_log_weights(groups: list[str], names: list[str]) -> np.ndarray:
    """``[N, G]`` log one-hot of each respondent's group: the group oracle's per-respondent mixture weights."""
    labels = np.asarray(groups)[:, None] == np.asarray(names)[None]
    if not labels.any(1).all():
        raise ValueError(f"a respondent's group is not among {names}")
    with np.errstate(divide="ignore"):
        return np.log(labels.astype(float))


def em(answers: np.ndarray, num_choices: list[int], responsibility: np.ndarray, smoothing: float, max_iter: int,
       tol: float) -> tuple[ContextFree, float, int]:
    """EM for the latent class model from initial responsibilities ``[N, K]``; ``(model, loglik, iterations)``.

    E-step: ``r[n, k] = softmax_k(log pi_k + sum_i log theta[k, i, a_ni])`` over answered items. M-step:
    ``theta[k, i, c] = (sum_n r[n, k] [a_ni = c] + s) / (sum_n r[n, k] [i answered] + s C_i)``,
    ``pi_k = sum_n r[n, k] / N``. Stops when the log-likelihood gains less than ``tol`` per respondent.
    """
    onehot = one_hot(answers, num_choices)  # [N, I, C]
    previous, iterations = -np.inf, 0
    while iterations < max_iter:
        iterations += 1
        log_theta = normalise(np.einsum("nk,nic->kic", responsibility, onehot), num_choices, smoothing)  # [K, I, C]
        with np.errstate(divide="ignore"):  # an emptied class keeps weight 0 (log 0 = -inf), never NaN
            log_pi = np.log(responsibility.mean(0))  # [K]
        joint = log_pi[:, None] + class_logliks(log_theta, answers)  # [K, N]
        total = logsumexp(joint, 0)  # [N]
        responsibility = np.exp(joint - total[None]).T  # [N, K]
        loglik = float(total.sum())
        if loglik - previous < tol * len(answers):
            break
        previous = loglik
    return ContextFree(log_theta, log_pi), loglik, iterations


def fit_latent_classes(answers: np.ndarray, num_choices: list[int], num_classes: int, restarts: int = 10,
                       seed: int = 0, smoothing: float = 0.5, max_iter: int = 2000, tol: float = 1e-9
                       ) -> LatentClassFit:
    """The latent class model with ``num_classes`` classes: EM from ``restarts`` seeded random starts (each
    respondent's responsibilities drawn from a flat Dirichlet), the best training log-likelihood kept. Classes are
    returned largest first."""
    answers = check_answers(answers, num_choices)
    if num_classes < 1 or restarts < 1:
        raise ValueError(f"num_classes {num_classes} and restarts {restarts}: expected at least 1 each")
    generator = np.random.default_rng(seed)
    best, logliks = None, []
    for _ in range(restarts):
        start = generator.dirichlet(np.ones(num_classes), size=len(answers))  # [N, K]
        model, loglik, iterations = em(answers, num_choices, start, smoothing, max_iter, tol)
        logliks.append(loglik)
        if best is None or loglik > best[1]:
            best = (model, loglik, iterations)
    model, loglik, iterations = best
    order = np.argsort(-model.log_weights, kind="stable")
    model = ContextFree(model.log_theta[order], model.log_weights[order])
    parameters = num_classes - 1 + num_classes * sum(c - 1 for c in num_choices)
    return LatentClassFit(model, loglik, logliks, iterations, parameters)
