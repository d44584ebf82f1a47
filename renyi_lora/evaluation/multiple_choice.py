"""Multiple-choice evaluation of an ensemble: calibration, uncertainty and routing, for the mixture, each
member and each group.

Each choice is scored by each member's log-likelihood of the choice's tokens after the prompt (sum, or mean
with ``length_normalize``), all (item, choice) rows batched through one ensemble forward per batch; a
log-softmax over an item's choices gives member distributions ``[K, N, C]`` (items with fewer choices are
padded with -inf, probability 0), mixed with weights ``pi`` (the ensemble's saved mixture weights by default). The
posterior routing of an item is ``w_k ∝ pi_k p_k(correct | prompt)`` (the alpha = 1 responsibility). With
``route_on_prompt`` each item's weights are first the posterior given its prompt, ``pi_k p_k(prompt)`` normalised
(``renyi_lora.evaluation.routing``), as ``renyi-lora generate --route_on_prompt`` weighs the members.

``base_only`` runs the same code with the adapters disabled (K = 1); a subset of a saved ensemble is
evaluated by loading only those members (``LoraEnsemble.from_pretrained(..., members=[...])``), so single
adapters, subsets and the whole ensemble are compared by one code path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from renyi_lora.data.records import DataError, check_group, check_string, describe
from renyi_lora.data.sources import read_typed_records
from renyi_lora.evaluation.inference import encode_pair, encode_prompt, pad_right
from renyi_lora.evaluation.ood import INPUT_SCORES, detection_aurocs, prompt_scores
from renyi_lora.evaluation.routing import pad_id, prompt_log_weights
from renyi_lora.evaluation.scoring import next_token_logliks, shared_prompt_logliks
from renyi_lora.evaluation.token_uncertainty import prior_log_weights
from renyi_lora.likelihoods import sequence_loglik
from renyi_lora.objective import responsibilities
from renyi_lora.uncertainty import (
    accuracy,
    accuracy_at_coverage,
    area_under_risk_coverage,
    auroc,
    brier_score,
    decompose_uncertainty,
    entropy,
    expected_calibration_error,
    mixture_log_probs,
    negative_log_likelihood,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from renyi_lora.ensemble import LoraEnsemble

NO_GROUP = "(none)"


@dataclass
class MultipleChoiceItem:
    """One validated multiple-choice question; ``line`` is its record number in the file (for reports)."""

    prompt: str
    choices: list[str]
    answer: int
    group: str | None
    line: int


def load_multiple_choice(path: Any, split: str | None = None, config: str | None = None
                         ) -> list[MultipleChoiceItem]:
    """Read and validate a multiple-choice file."""
    items = []
    for where, _, record in read_typed_records(path, ("multiple-choice",), "load_multiple_choice", split,
                                               config=config):
        prompt = check_string(record["prompt"], where, "prompt")
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise where.error("choices", f"expected a list of at least 2 strings, got {describe(choices)}")
        first_index: dict[str, int] = {}
        for i, choice in enumerate(choices):
            check_string(choice, where, f"choices[{i}]")
            if choice in first_index:
                raise where.error(f"choices[{i}]", f"duplicates choices[{first_index[choice]}] ({describe(choice)}); "
                                  "expected distinct choices")
            first_index[choice] = i
        answer = record["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise where.error("answer", f"expected an integer index into 'choices', got {describe(answer)}")
        if not 0 <= answer < len(choices):
            raise where.error("answer", f"index {answer} is out of range; expected 0 to {len(choices) - 1} "
                              f"(an index into the {len(choices)} choices)")
        items.append(MultipleChoiceItem(prompt, list(choices), answer, check_group(record, where), where.number))
    return items


def encode_choices(tokenizer: PreTrainedTokenizerBase, items: Sequence[MultipleChoiceItem]
                   ) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, choice_ids)`` for every (item, choice), item-major; a choice with no tokens is a
    ``DataError`` naming the item's line."""
    rows = []
    for item in items:
        for c, choice in enumerate(item.choices):
            prompt_ids, choice_ids = encode_pair(tokenizer, item.prompt, choice)
            if not choice_ids:
                raise DataError(f"item at line {item.line}, field 'choices[{c}]': {choice!r} encodes to no tokens "
                                "after the prompt; expected a choice with some text")
            rows.append((prompt_ids, choice_ids))
    return rows


@torch.no_grad()
def choice_log_probs(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase, items: Sequence[MultipleChoiceItem],
                     length_normalize: bool = False, *, batch_size: int = 16, progress: bool = False,
                     shared_prompt: bool = True) -> torch.Tensor:
    """Each member's distribution over each item's choices, ``[K, N, C]`` float64 (-inf past an item's choices).

    A choice's score is the member's log-likelihood of its tokens after the prompt (mean if
    ``length_normalize``); the distribution is the log-softmax of the scores over the item's choices. With
    ``shared_prompt`` each prompt runs once and its choices continue from its KV cache (``scoring``); without it,
    or where the cache cannot be shared, every (prompt, choice) row runs in full, right-padded.
    """
    rows = encode_choices(tokenizer, items)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tqdm(total=len(rows), desc="scoring choices", disable=not progress) as bar:
        flat = _next_token_scores(ensemble, items, rows, pad, batch_size, bar)
        if flat is None and shared_prompt:
            flat = _shared_prompt_scores(ensemble, items, rows, pad, batch_size, bar)
        if flat is None:
            bar.reset()  # the shared-prompt pass may have stopped part-way
            flat = _row_scores(ensemble, rows, pad, batch_size, bar)
    if length_normalize:
        flat = flat / torch.tensor([len(c) for _, c in rows], dtype=torch.float64)
    return _per_item_log_softmax(flat, items)


def _row_scores(ensemble: LoraEnsemble, rows: list[tuple[list[int], list[int]]], pad: int,
                batch_size: int, bar: tqdm) -> torch.Tensor:
    """``[K, rows]`` log-likelihoods of each choice, one full (prompt + choice) row each."""
    device = next(ensemble.parameters()).device
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        input_ids, attention_mask, labels = pad_right([p for p, _ in batch], [c for _, c in batch], pad, device)
        token = ensemble(input_ids, attention_mask, labels=labels)  # [K, b, T]
        scores.append(sequence_loglik(token, labels, dtype=torch.float64).cpu())  # [K, b]
        bar.update(len(batch))
    return torch.cat(scores, dim=1)


def _next_token_scores(ensemble: LoraEnsemble, items: Sequence[MultipleChoiceItem],
                       rows: list[tuple[list[int], list[int]]], pad: int, batch_size: int,
                       bar: tqdm) -> torch.Tensor | None:
    """``[K, sum of choices]`` when every choice is one token (answer letters, yes / no): one forward of each prompt
    (``scoring.next_token_logliks``); None otherwise."""
    if any(len(choice) != 1 or not prompt for prompt, choice in rows):
        return None
    scores, start = [], 0
    per_batch = max(1, batch_size // max(len(item.choices) for item in items))  # about batch_size choice rows
    for first in range(0, len(items), per_batch):
        batch = items[first:first + per_batch]
        prompts, tokens = [], []
        for item in batch:
            prompts.append(rows[start][0])
            tokens.append([choice[0] for _, choice in rows[start:start + len(item.choices)]])
            start += len(item.choices)
        scores += next_token_logliks(ensemble, prompts, tokens, pad)
        bar.update(sum(len(t) for t in tokens))
    return torch.cat(scores, dim=1)


def _shared_prompt_scores(ensemble: LoraEnsemble, items: Sequence[MultipleChoiceItem],
                          rows: list[tuple[list[int], list[int]]], pad: int, batch_size: int,
                          bar: tqdm) -> torch.Tensor | None:
    """``[K, sum of choices]`` choice log-likelihoods with each item's prompt run once (``scoring``); None when the
    prompts are empty or the model's cache cannot be shared (then every (prompt, choice) row runs in full)."""
    if any(not prompt for prompt, _ in rows):
        return None
    starts = [0]
    for item in items:
        starts.append(starts[-1] + len(item.choices))
    scores, first = [], 0
    while first < len(items):  # batches of whole items, about batch_size choice rows each
        last, width = first, 0
        while last < len(items) and (last == first or width + len(items[last].choices) <= batch_size):
            width += len(items[last].choices)
            last += 1
        prompts = [rows[starts[n]][0] for n in range(first, last)]
        choices = [[c for _, c in rows[starts[n]:starts[n + 1]]] for n in range(first, last)]
        batch = shared_prompt_logliks(ensemble, prompts, choices, pad)
        if batch is None:
            return None
        scores += [score.cpu() for score in batch]
        bar.update(width)
        first = last
    return torch.cat(scores, dim=1)


def _per_item_log_softmax(flat: torch.Tensor, items: Sequence[MultipleChoiceItem]) -> torch.Tensor:
    """``flat [K, sum of choices]`` scores -> ``[K, N, C]`` log-softmax over each item's choices (-inf padded)."""
    K, C = flat.shape[0], max(len(item.choices) for item in items)
    padded = torch.full((K, len(items), C), -torch.inf, dtype=torch.float64)  # [K, N, C]
    start = 0
    for n, item in enumerate(items):
        padded[:, n, : len(item.choices)] = flat[:, start:start + len(item.choices)]
        start += len(item.choices)
    return torch.log_softmax(padded, dim=-1)


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: undefined scores (AUROC with one class, NLL of a zero probability) -> null."""
    return value if math.isfinite(value) else None


def _prediction_scores(log_probs: torch.Tensor, answers: torch.Tensor, num_bins: int) -> dict:
    """Accuracy, ECE, NLL and Brier of one predictive distribution ``log_probs [N, C]``."""
    probs = log_probs.exp()
    return {"accuracy": accuracy(probs, answers), "ece": expected_calibration_error(probs, answers, num_bins),
            "nll": _finite(negative_log_likelihood(probs, answers)), "brier": brier_score(probs, answers)}


def multiple_choice_metrics(member_log_probs: torch.Tensor, answers: torch.Tensor,
                            log_weights: torch.Tensor | None = None, num_bins: int = 15) -> dict:
    """Metrics of the mixture and of each member on one set of items.

    Args:
        member_log_probs: ``[K, N, C]`` member distributions over choices.
        answers: ``[N]`` index of the correct choice.
        log_weights: ``[K]`` (or per item ``[K, N]``) normalised log mixture weights; uniform if None.
        num_bins: equal-width confidence bins for the ECE.

    Returns:
        ``{"num_items", "mixture": {accuracy, ece, nll, brier, total, aleatoric, epistemic, auroc_mi_errors,
        auroc_total_errors, aurc, aurc_mi, accuracy_at_80}, "members": [{accuracy, ece, nll, brier, entropy}] * K,
        "routing": [K]}`` with routing the mean alpha = 1 responsibility for the correct answer.
    """
    mixture = mixture_log_probs(member_log_probs, log_weights)  # [N, C]
    uncertainty = decompose_uncertainty(member_log_probs, log_weights)  # each [N]
    correct = mixture.argmax(-1) == answers  # [N]
    mixture_metrics = {
        **_prediction_scores(mixture, answers, num_bins),
        **{name: value.mean().item() for name, value in uncertainty._asdict().items()},
        "auroc_mi_errors": _finite(auroc(uncertainty.epistemic, ~correct)),
        "auroc_total_errors": _finite(auroc(uncertainty.total, ~correct)),
        "aurc": area_under_risk_coverage(uncertainty.total, correct),
        "aurc_mi": area_under_risk_coverage(uncertainty.epistemic, correct),
        "accuracy_at_80": accuracy_at_coverage(uncertainty.total, correct, 0.8),
    }
    members = [{**_prediction_scores(lp, answers, num_bins), "entropy": entropy(lp).mean().item()}
               for lp in member_log_probs]
    correct_loglik = member_log_probs.gather(-1, answers.expand(len(member_log_probs), -1)[..., None])[..., 0]
    routing = responsibilities(correct_loglik, 1.0, log_weights)  # [K, N]
    return {"num_items": len(answers), "mixture": mixture_metrics, "members": members,
            "routing": routing.mean(-1).tolist()}


def evaluate_multiple_choice(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase,
                             items: Sequence[MultipleChoiceItem], *, length_normalize: bool = False,
                             batch_size: int = 16, weights: Sequence[float] | None = None, base_only: bool = False,
                             member_ids: Sequence[int] | None = None, num_bins: int = 15,
                             input_scores: bool = False, progress: bool = False, shared_prompt: bool = True,
                             route_on_prompt: bool = False) -> dict:
    """Evaluate the ensemble (or the base model alone, ``base_only``) on multiple-choice ``items``, mixed with
    ``weights`` (normalised; the ensemble's saved mixture weights if None), routed on each prompt with
    ``route_on_prompt`` (then each item records its ``weights``).

    Returns a JSON-serialisable dict: the settings, ``mixture`` / ``members`` / ``routing`` over all items
    (see ``multiple_choice_metrics``), ``groups`` (the same per group), ``mean_mi_by_group``, ``routing_matrix``
    ``{"groups", "members", "matrix" [G][K]}`` and one record per item in ``items`` (its prompt, every member's
    probabilities, the mixture's, its uncertainty and, with ``input_scores``, the members' disagreement on the
    prompt's own tokens, ``renyi_lora.evaluation.ood.prompt_scores``), enough to recompute any score without the model.
    """
    if not items:
        raise ValueError("no items to evaluate")
    disabled = ensemble.adapters_disabled() if base_only else contextlib.nullcontext()
    with disabled:
        K = ensemble.output_members
        member_log_probs = choice_log_probs(ensemble, tokenizer, items, length_normalize, batch_size=batch_size,
                                            progress=progress,
                                            shared_prompt=shared_prompt)  # [K, N, C]
        prior = prior_log_weights(ensemble, weights)  # [K]
        extra = prompt_scores(ensemble, tokenizer, [item.prompt for item in items], prior.exp(),
                              batch_size=max(1, batch_size // 4), progress=progress) if input_scores else {}
        log_weights = _prompt_routing(ensemble, tokenizer, items, prior, batch_size) if route_on_prompt else prior
    member_ids = list(member_ids) if member_ids is not None and not base_only else list(range(K))
    if len(member_ids) != K:
        raise ValueError(f"member_ids {member_ids} must name the {K} evaluated members")
    answers = torch.tensor([item.answer for item in items])
    results = {"num_items": len(items), "num_members": K, "member_ids": member_ids, "base_only": base_only,
               "length_normalize": length_normalize, "weights": prior.exp().tolist(),
               **multiple_choice_metrics(member_log_probs, answers, log_weights, num_bins)}
    group_of = [item.group if item.group is not None else NO_GROUP for item in items]
    names = list(dict.fromkeys(group_of))
    results["groups"] = {}
    for name in names:
        index = torch.tensor([n for n, g in enumerate(group_of) if g == name])
        group_weights = log_weights[:, index] if log_weights.dim() == 2 else log_weights
        results["groups"][name] = multiple_choice_metrics(member_log_probs[:, index], answers[index], group_weights,
                                                          num_bins)
    results["mean_mi_by_group"] = {name: g["mixture"]["epistemic"] for name, g in results["groups"].items()}
    results["routing_matrix"] = {"groups": names, "members": member_ids,
                                 "matrix": [results["groups"][name]["routing"] for name in names]}
    mixture = mixture_log_probs(member_log_probs, log_weights)
    uncertainty = decompose_uncertainty(member_log_probs, log_weights)
    correct_loglik = member_log_probs.gather(-1, answers.expand(K, -1)[..., None])[..., 0]  # [K, N]
    routing = responsibilities(correct_loglik, 1.0, log_weights)  # [K, N]
    results["items"] = [{
        "line": item.line, "group": group_of[n], "prompt": item.prompt, "choices": item.choices,
        "answer": item.answer, "prediction": int(mixture[n].argmax()),
        "correct": bool(mixture[n].argmax() == item.answer),
        "probs": mixture[n, : len(item.choices)].exp().tolist(),
        "member_probs": member_log_probs[:, n, : len(item.choices)].exp().tolist(),
        "member_predictions": member_log_probs[:, n].argmax(-1).tolist(),
        "total": uncertainty.total[n].item(), "aleatoric": uncertainty.aleatoric[n].item(),
        "epistemic": uncertainty.epistemic[n].item(), "responsibility": routing[:, n].tolist(),
        **{name: values[n].item() for name, values in extra.items()},
        **({"weights": log_weights[:, n].exp().tolist()} if route_on_prompt else {}),
    } for n, item in enumerate(items)]
    if route_on_prompt:
        results["route_on_prompt"] = True
    for name, values in extra.items():
        results["mixture"][name] = values.mean().item()
    return results


def _prompt_routing(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase, items: Sequence[MultipleChoiceItem],
                    log_prior: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``log w [K, N]``: each item's posterior over members given its prompt (``routing.prompt_log_weights``)."""
    prompts = [encode_prompt(tokenizer, item.prompt)[0] for item in items]
    return torch.cat([prompt_log_weights(ensemble, prompts[start:start + batch_size], 1.0, log_prior,
                                         pad_token_id=pad_id(tokenizer)).cpu() for start in range(0, len(prompts),
                                                                                                  batch_size)], 1)


# Per-item uncertainty scores whose AUROC for out-of-distribution items ``ood_detection`` reports.
OOD_SCORES = ("total", "epistemic", *INPUT_SCORES)


def ood_detection(in_distribution: dict, out_of_distribution: dict) -> dict[str, float | None]:
    """AUROC of each per-item uncertainty score (``OOD_SCORES`` present in both results) for telling the items of
    ``out_of_distribution`` from those of ``in_distribution`` (both ``evaluate_multiple_choice`` results)."""
    def scores(results: dict) -> dict[str, list[float]]:
        return {name: [item[name] for item in results["items"]] for name in OOD_SCORES
                if all(name in item for item in results["items"])}

    return {f"auroc_{name}": _finite(value)
            for name, value in detection_aurocs(scores(in_distribution), scores(out_of_distribution)).items()}
