"""The survey task's metrics: one table for adapters, ensembles and the classical anchors.

Every method is a mixture of K members. What it says about N held-out respondents is a ``MixtureScores``:

- ``log_probs [K, N, I, C]``: member k's log-probability of each answer c to item i of respondent n, restricted to
  the item's C_i valid answers and renormalised (``-inf`` past C_i; anything where the item is unanswered). For an
  adapter this is teacher-forced: item i is scored with the respondent's true earlier answers in context
  (``survey_scoring.answer_log_probs``); an anchor's members ignore the context (``context_free_scores``).
- ``log_weights``: the mixture weights, ``[K]``, or ``[N, K]`` per respondent (the group oracle, told the party).
- ``no_context [K, I, C]``: each member's answer distribution for each item asked alone (header + that item).

Metrics (natural logarithms, nats):

- ``joint``: held-out joint NLL per respondent of all their answers, ``-log sum_k pi_k prod_i p_k(a_i | a_<i)``,
  averaged over respondents; also per answer, for each member alone and for the best member (lowest mean).
- ``steering(k)``: the posterior over members from a respondent's first k answers, ``w_k ∝ pi_k prod_{i<=k}
  p_k(a_i | a_<i)``; each remaining answer is then predicted by ``sum_k w_k p_k(. | a_<j)`` (the members, like a
  single adapter, read all earlier true answers in context; the weights use only the first k). Mean NLL and accuracy
  (argmax) over the remaining answers, and the same with the prior weights ``pi`` (no steering) beside them.
  Respondents with more than k answers count.
- ``party``: the posterior from all answers; normalised mutual information (scikit-learn, arithmetic mean) of its
  argmax with the party, and the per-party mean posterior ``[G, K]``.
- ``items``: per item, the mixture's mutual information between answer and member with no context
  (``renyi_lora.uncertainty.decompose_uncertainty``) against the Jensen-Shannon divergence between the Democrats' and
  the Republicans' answer shares in the scored respondents (``scipy.spatial.distance.jensenshannon(p, q, base=2) **
  2``: the divergence in bits, in [0, 1]); Spearman's rho between the two (scipy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax, logsumexp
from scipy.stats import spearmanr
from sklearn.metrics import normalized_mutual_info_score

from renyi_lora.uncertainty import decompose_uncertainty

from .survey import SURVEYS, Survey
from .survey_anchors import MISSING, ContextFree

PARTIES = ("Democrat", "Independent", "Republican")


@dataclass(frozen=True)
class Respondents:
    """Held-out respondents of one survey: answer codes ``[N, I]`` (-1 unanswered) and each one's party."""

    survey: Survey
    answers: np.ndarray
    groups: list[str]

    @property
    def num_choices(self) -> list[int]:
        return [len(item.answers) for item in self.survey.items]


def load_respondents(path: str | Path) -> Respondents:
    """The rows of a ``survey_<name>_<split>.jsonl`` file written by ``benchmarks.quality.survey``."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no respondents")
    names = {row.get("dataset") for row in rows}
    if len(names) != 1 or not names <= set(SURVEYS):
        raise ValueError(f"{path}: expected rows of one survey ({sorted(SURVEYS)}) in the 'dataset' field; got {names}")
    answers = np.array([[MISSING if a is None else a for a in row["answers"]] for row in rows], dtype=np.int64)
    return Respondents(SURVEYS[names.pop()], answers, [row["group"] for row in rows])


@dataclass(frozen=True)
class MixtureScores:
    log_probs: np.ndarray  # [K, N, I, C]
    log_weights: np.ndarray  # [K] or [N, K]
    no_context: np.ndarray | None = None  # [K, I, C]
    prior_log_weights: np.ndarray | None = None  # [K]: weights of the no-context mixture if log_weights is [N, K]

    def per_respondent_log_weights(self) -> np.ndarray:
        """``[N, K]``."""
        K, N = self.log_probs.shape[:2]
        weights = np.asarray(self.log_weights, dtype=float)
        if weights.shape not in ((K,), (N, K)):
            raise ValueError(f"log_weights must be [K] = [{K}] or [N, K] = [{N}, {K}]; got {weights.shape}")
        return np.broadcast_to(weights, (N, K))


def context_free_scores(model: ContextFree, num_respondents: int, told: np.ndarray | None = None) -> MixtureScores:
    """An anchor's scores: every respondent gets the members' item distributions; ``told [N, K]`` replaces the
    mixture weights per respondent (the group oracle)."""
    log_probs = np.broadcast_to(model.log_theta[:, None], (model.num_members, num_respondents,
                                                            *model.log_theta.shape[1:]))  # [K, N, I, C]
    return MixtureScores(log_probs, model.log_weights if told is None else told, model.log_theta, model.log_weights)


def answer_logliks(log_probs: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """``[K, N, I]``: each member's log-probability of each given answer, 0 where the item is unanswered."""
    observed = answers >= 0
    picked = np.take_along_axis(log_probs, np.where(observed, answers, 0)[None, :, :, None], axis=-1)[..., 0]
    return np.where(observed[None], picked, 0.0)


def joint(scores: MixtureScores, answers: np.ndarray) -> dict:
    """Held-out joint NLL per respondent (mixture, each member, the best member) and per answer."""
    member = answer_logliks(scores.log_probs, answers).sum(-1)  # [K, N]
    mixture = logsumexp(scores.per_respondent_log_weights().T + member, axis=0)  # [N]
    member_nll = -member.mean(1)
    count = int((answers >= 0).sum())
    return {"nll": float(-mixture.mean()), "nll_per_answer": float(-mixture.sum() / count),
            "member_nll": member_nll.tolist(), "best_member": int(member_nll.argmin()),
            "best_member_nll": float(member_nll.min()), "respondents": len(answers), "answers": count}


def first_answers(answers: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first, rest)`` ``[N, I]`` masks: each respondent's first k answered items, and their other answered items."""
    observed = answers >= 0
    rank = np.cumsum(observed, axis=1)
    return observed & (rank <= k), observed & (rank > k)


def log_posterior(scores: MixtureScores, answers: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``[N, K]`` log posterior over members from the answers in ``mask [N, I]`` (default: every answer)."""
    logliks = answer_logliks(scores.log_probs, answers)  # [K, N, I]
    if mask is not None:
        logliks = np.where(mask[None], logliks, 0.0)
    return log_softmax(scores.per_respondent_log_weights() + logliks.sum(-1).T, axis=1)


def _predict(scores: MixtureScores, log_w: np.ndarray, answers: np.ndarray, rest: np.ndarray) -> tuple[float, float]:
    """Mean NLL and accuracy over the answers in ``rest [N, I]`` of the mixture with weights ``log_w [N, K]``."""
    mixture = logsumexp(log_w.T[:, :, None, None] + scores.log_probs, axis=0)  # [N, I, C]
    n, i = np.nonzero(rest)
    return float(-mixture[n, i, answers[n, i]].mean()), float((mixture[n, i].argmax(-1) == answers[n, i]).mean())


def steering(scores: MixtureScores, answers: np.ndarray, k: int) -> dict:
    """Few-shot steering from each respondent's first ``k`` answers (module docstring)."""
    first, rest = first_answers(answers, k)
    keep = rest.any(1)
    if not keep.any():
        raise ValueError(f"steering with k = {k}: no respondent answered more than {k} items")
    nll, accuracy = _predict(scores, log_posterior(scores, answers, first), answers, rest & keep[:, None])
    prior_nll, prior_accuracy = _predict(scores, scores.per_respondent_log_weights(), answers, rest & keep[:, None])
    return {"k": k, "nll": nll, "accuracy": accuracy, "nll_prior": prior_nll, "accuracy_prior": prior_accuracy,
            "respondents": int(keep.sum()), "answers": int((rest & keep[:, None]).sum())}


def party_agreement(responsibility: np.ndarray, groups: list[str], parties: tuple[str, ...] = PARTIES) -> dict:
    """NMI of the argmax member with the party, and the per-party mean responsibility ``[G, K]``."""
    nmi = normalized_mutual_info_score(groups, responsibility.argmax(1)) if responsibility.shape[1] > 1 else 0.0
    labels = np.asarray(groups)
    table = {party: responsibility[labels == party].mean(0).round(4).tolist() for party in parties
             if (labels == party).any()}
    return {"nmi": float(nmi), "table": table, "counts": {party: int((labels == party).sum()) for party in table}}


def item_disagreement(no_context: np.ndarray, log_weights: np.ndarray, answers: np.ndarray, groups: list[str],
                      num_choices: list[int], labels: list[str] | None = None) -> dict:
    """Per item: the no-context mixture's mutual information (nats) and the Democrat / Republican JS divergence
    (bits); Spearman's rho between them (None when either is constant, e.g. one member)."""
    uncertainty = decompose_uncertainty(torch.from_numpy(np.asarray(no_context, dtype=np.float64)),
                                        torch.from_numpy(np.asarray(log_weights, dtype=np.float64)))
    mi = uncertainty.epistemic.numpy()  # [I]
    party = np.asarray(groups)
    js = []
    for i, count in enumerate(num_choices):
        shares = []
        for name in ("Democrat", "Republican"):
            given = answers[(party == name) & (answers[:, i] >= 0), i]
            if not len(given):
                raise ValueError(f"item {i}: no {name} answered it; the JS divergence needs both parties")
            shares.append(np.bincount(given, minlength=count) / len(given))
        js.append(float(jensenshannon(*shares, base=2) ** 2))
    rho = p_value = None
    if np.ptp(mi) > 1e-12 and np.ptp(js) > 0:
        result = spearmanr(mi, js)
        rho, p_value = float(result.statistic), float(result.pvalue)
    names = labels or [str(i) for i in range(len(num_choices))]
    return {"mi": dict(zip(names, mi.round(6).tolist(), strict=True)),
            "js": dict(zip(names, np.round(js, 6).tolist(), strict=True)), "spearman": rho, "spearman_p": p_value}


def evaluate(scores: MixtureScores, respondents: Respondents, ks: tuple[int, ...] = (2, 3)) -> dict:
    """Every metric of one method on one split (module docstring)."""
    answers = respondents.answers
    members, respondents_, items = scores.log_probs.shape[:3]
    if answers.shape != (respondents_, items):
        raise ValueError(f"log_probs are for {respondents_} respondents x {items} items; the answers are "
                         f"{answers.shape}")
    results = {"members": members, "joint": joint(scores, answers),
               "steering": {str(k): steering(scores, answers, k) for k in ks},
               "party": party_agreement(np.exp(log_posterior(scores, answers)), respondents.groups)}
    if scores.no_context is not None:
        prior = scores.prior_log_weights if scores.prior_log_weights is not None else scores.log_weights
        results["items"] = item_disagreement(scores.no_context, prior, answers, respondents.groups,
                                             respondents.num_choices,
                                             [item.column for item in respondents.survey.items])
    return results
