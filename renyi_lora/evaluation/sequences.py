"""Held-out evaluation on SFT data: the mixture's and each member's NLL, the routing of every example, and whether
the routing follows the groups.

For example n with targets y (the completion, the assistant turns or the text, tokenised as in training,
``renyi_lora.data.sft``) and member log-likelihoods ``L[k, n] = log p_k(y | x)``:

- the mixture's log-likelihood ``log sum_k w_k p_k(y | x)`` (a logsumexp of ``L + log w``), where ``w`` is the
  prior pi (``--weights``, else the ensemble's saved mixture weights), or with ``route_on_prompt`` the posterior
  given the prompt, ``w_k ∝ pi_k p_k(prompt)`` (``renyi_lora.evaluation.routing``);
- the responsibilities, the posterior over members given the whole example, ``r_k ∝ w_k p_k(y | x)``;
- summaries: the mean NLL per example and per token of the mixture and of each member, the same per group, the
  mean responsibility of each member for each group (the group x member routing matrix) and the normalised mutual
  information between the groups and the owning member (argmax responsibility). An NMI near 1 on held-out prompts
  says the members split by group (``docs/specialisation.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from renyi_lora.data.records import SFT_FORMATS, check_group
from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.data.sources import read_typed_records
from renyi_lora.evaluation.multiple_choice import NO_GROUP
from renyi_lora.evaluation.routing import example_logliks, pad_id, routed_log_weights
from renyi_lora.evaluation.token_uncertainty import prior_log_weights
from renyi_lora.uncertainty import normalized_mutual_information

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from renyi_lora.ensemble import LoraEnsemble



def eval_data_format(source: Any, split: str | None = None, config: str | None = None) -> str:
    """``"multiple-choice"`` or ``"sft"``: what the first record of ``source`` is. Any other format (preference data,
    fields of no format) is a ``DataError`` naming the source, the record and the formats ``renyi-lora eval`` reads."""
    typed = read_typed_records(source, ("multiple-choice", *SFT_FORMATS), "renyi-lora eval (multiple-choice or SFT "
                               "data)", split, config=config)
    return "multiple-choice" if typed[0][1] == "multiple-choice" else "sft"


def _prompt_of(name: str, record: dict) -> Any:
    """What a record shows as its prompt: the prompt, the turns before the first assistant turn, or '' for text."""
    if name == "prompt-completion":
        return record["prompt"]
    if name == "messages":
        turns = record["messages"]
        first = next((i for i, m in enumerate(turns) if isinstance(m, dict) and m.get("role") == "assistant"), 0)
        return turns[:first]
    return ""


def _summary(loglik: torch.Tensor, mixture: torch.Tensor, routing: torch.Tensor, num_tokens: torch.Tensor) -> dict:
    """NLL per example / per token of the mixture and each member, and mean responsibilities, over some examples.

    ``loglik [K, n]``, ``mixture [n]``, ``routing [K, n]``, ``num_tokens [n]``.
    """
    tokens = max(int(num_tokens.sum()), 1)

    def nll(values: torch.Tensor) -> dict:
        return {"nll": -values.mean().item(), "nll_per_token": -values.sum().item() / tokens}

    return {"num_examples": mixture.numel(), "num_tokens": int(num_tokens.sum()), "mixture": nll(mixture),
            "members": [nll(row) for row in loglik], "responsibility": routing.mean(-1).tolist()}


def sft_metrics(loglik: torch.Tensor, log_weights: torch.Tensor, num_tokens: torch.Tensor,
                groups: Sequence[str | None]) -> dict:
    """Mixture and member scores of SFT examples, overall and per group, from member log-likelihoods.

    Args:
        loglik: ``[K, N]`` member log-likelihoods of each example's targets.
        log_weights: ``[K]`` or ``[K, N]`` normalised log mixture weights (per example when routed on the prompt).
        num_tokens: ``[N]`` target tokens per example.
        groups: ``N`` group names (None: no group).

    Returns:
        ``{"mixture_loglik" [N], "responsibilities" [K, N]`` (tensors), ``"summary"`` (``_summary`` of all examples),
        ``"groups"`` (name -> ``_summary``, in order of appearance, ``"(none)"`` for examples without a group),
        ``"nmi"`` (between the groups and the argmax responsibility over the examples that have a group; None with
        fewer than two groups)``}``.
    """
    K, N = loglik.shape
    log_weights = log_weights.to(loglik).expand(K, N) if log_weights.dim() == 2 else \
        log_weights.to(loglik)[:, None].expand(K, N)  # [K, N]
    joint = loglik + log_weights  # [K, N]: log w_k p_k(y | x)
    mixture = torch.logsumexp(joint, dim=0)  # [N]
    routing = torch.softmax(joint, dim=0)  # [K, N]
    names = [g if g is not None else NO_GROUP for g in groups]
    by_group = {}
    for name in dict.fromkeys(names):
        index = torch.tensor([n for n, g in enumerate(names) if g == name])
        by_group[name] = _summary(loglik[:, index], mixture[index], routing[:, index], num_tokens[index])
    grouped = [n for n, g in enumerate(groups) if g is not None]
    named = sorted({groups[n] for n in grouped})
    nmi = None
    if len(named) >= 2:
        labels = torch.tensor([named.index(groups[n]) for n in grouped])
        nmi = normalized_mutual_information(labels, routing[:, grouped].argmax(0))
    return {"mixture_loglik": mixture, "responsibilities": routing, "summary": _summary(loglik, mixture, routing,
            num_tokens), "groups": by_group, "nmi": nmi}


def evaluate_sft(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase, source: Any, *,
                 weights: Sequence[float] | torch.Tensor | None = None, route_on_prompt: bool = False,
                 base_only: bool = False, member_ids: Sequence[int] | None = None, batch_size: int = 8,
                 max_length: int = 1024, progress: bool = False, split: str | None = None,
                 config: str | None = None) -> dict:
    """Evaluate the ensemble (or the base model alone, ``base_only``) on SFT examples (module docstring).

    Args:
        source: SFT data as ``renyi_lora.data.sft.load_sft_dataset`` reads it (a file, a list of dicts, a dataset;
            ``split`` / ``config`` for datasets), each record with an optional ``group``.
        weights: the prior pi, one per member (normalised); the ensemble's saved mixture weights if None. Pass
            ``renyi_lora.evaluation.routing.posterior_weights`` of a user's examples to score for that user.
        route_on_prompt: weigh the members of each example by ``pi_k p_k(prompt)`` before scoring its targets.
        member_ids: the saved indices of the members evaluated (for the report); ``0..K-1`` if None.
        max_length: tokens per example; a longer one loses completion tokens from the right (``num_truncated``).

    Returns:
        A JSON-serialisable dict: the settings, ``mixture`` / ``members`` (``nll`` per example, ``nll_per_token``),
        ``responsibility`` [K], ``groups`` (the same per group), ``routing_matrix`` ``{"groups", "members",
        "matrix" [G][K]}`` (mean responsibilities), ``nmi`` and one record per example in ``examples`` (its record
        number, group, prompt, target tokens, the mixture's and each member's log-likelihood, the weights used and
        the responsibilities).
    """
    typed = read_typed_records(source, SFT_FORMATS, "evaluate_sft", split, config=config)
    dataset = load_sft_dataset(source, tokenizer, max_length, split, config=config)
    disabled = ensemble.adapters_disabled() if base_only else contextlib.nullcontext()
    with disabled:
        K = ensemble.output_members
        log_prior = prior_log_weights(ensemble, weights)  # [K]
        scores = example_logliks(ensemble, dataset.examples, pad_id(tokenizer), batch_size,
                                 with_prompt=route_on_prompt, progress=progress)
    member_ids = list(member_ids) if member_ids is not None and not base_only else list(range(K))
    if len(member_ids) != K:
        raise ValueError(f"member_ids {member_ids} must name the {K} evaluated members")
    log_weights = routed_log_weights(scores.prompt, log_prior) if route_on_prompt else log_prior[:, None].expand(
        K, len(typed))  # [K, N]
    groups = [check_group(record, where) for where, _, record in typed]
    metrics = sft_metrics(scores.completion, log_weights, scores.num_tokens, groups)
    summary, names = metrics["summary"], list(metrics["groups"])
    results = {"task": "sft", "num_examples": len(typed), "num_tokens": summary["num_tokens"],
               "num_truncated": dataset.num_truncated, "num_members": K, "member_ids": member_ids,
               "base_only": base_only, "weights": log_prior.exp().tolist(), "route_on_prompt": route_on_prompt,
               "max_length": max_length, "mixture": summary["mixture"], "members": summary["members"],
               "responsibility": summary["responsibility"], "groups": metrics["groups"],
               "routing_matrix": {"groups": names, "members": member_ids,
                                  "matrix": [metrics["groups"][name]["responsibility"] for name in names]},
               "nmi": metrics["nmi"]}
    results["examples"] = [{
        "line": where.number, "group": groups[n] if groups[n] is not None else NO_GROUP,
        "prompt": _prompt_of(name, record), "num_tokens": int(scores.num_tokens[n]),
        "mixture_loglik": metrics["mixture_loglik"][n].item(), "member_logliks": scores.completion[:, n].tolist(),
        "weights": log_weights[:, n].exp().tolist(), "responsibility": metrics["responsibilities"][:, n].tolist(),
    } for n, (where, name, record) in enumerate(typed)]
    return results
