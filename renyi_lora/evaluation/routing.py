"""Posterior routing: which members to trust for an input, or for a user, from what has been observed.

The ensemble is a mixture ``p(y | x) = sum_k pi_k p_k(y | x)``; pi are the saved mixture weights
(``LoraEnsemble.mixture_weights``: uniform unless learned). Having observed something, Bayes' rule reweighs the
members by how well each explained it:

- the prompt (``prompt_log_weights``): ``w_k ∝ pi_k p_k(prompt)``, where ``p_k(prompt)`` is member k's likelihood of
  the prompt's tokens after the first (which has no context). Reading the prompt as part of the observation, the
  predictive ``sum_k w_k p_k(y | x)`` is the mixture's own conditional of the completion given the prompt. With an
  order ``alpha`` the likelihood is tempered, ``p_k(prompt)^alpha`` (0: the prior; inf: the best member);
- a few examples of one user (``posterior_weights``): ``w_k ∝ pi_k prod_j p_k(y_j | x_j)``, the posterior over
  members given that the user's examples all came from one member. These weights replace pi for everything the user
  scores or generates next: personalisation without retraining, and a handful of examples is often enough, because
  a sequence log-likelihood differs between specialists by many nats.

Examples are scored as in training (``renyi_lora.data.sft.load_sft_dataset``: TRL's formats, EOS appended to a plain
completion), so a member's log-likelihood here is the one the objective saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from tqdm.auto import tqdm

from renyi_lora.data.sft import TokenizedDataset, load_sft_dataset, pad_rows
from renyi_lora.evaluation.inference import pad_right
from renyi_lora.evaluation.token_uncertainty import prior_log_weights
from renyi_lora.likelihoods import IGNORE_INDEX, sequence_loglik
from renyi_lora.objective import responsibilities

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from renyi_lora.ensemble import LoraEnsemble


@torch.no_grad()
def prompt_log_weights(ensemble: LoraEnsemble, prompt_ids: list[list[int]], alpha: float = 1.0,
                       log_prior: torch.Tensor | None = None, *, pad_token_id: int = 0) -> torch.Tensor:
    """Posterior over members given each prompt, ``log w [K, B]`` with ``w_k ∝ pi_k p_k(prompt)^alpha``.

    ``p_k(prompt)`` is member k's likelihood of the prompt's tokens after its first (which has no context);
    ``log_prior`` is ``log pi`` ``[K]`` (or ``[K, B]``), the ensemble's saved weights if None.
    """
    log_prior = prior_log_weights(ensemble) if log_prior is None else log_prior
    device = next(ensemble.parameters()).device
    input_ids, attention_mask, labels = pad_right([[] for _ in prompt_ids], prompt_ids, pad_token_id, device)
    loglik = sequence_loglik(ensemble(input_ids, attention_mask, labels=labels), labels, dtype=torch.float64)
    return routed_log_weights(loglik, log_prior, alpha)


def routed_log_weights(prompt_loglik: torch.Tensor, log_prior: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``log w [K, B]``, ``w_k ∝ pi_k p_k(prompt)^alpha``, from ``prompt_loglik [K, B]`` (``log p_k(prompt)``) and
    ``log_prior`` ``[K]`` or ``[K, B]``: the one routing rule of ``generate``, ``evaluate_sft`` and
    ``evaluate_multiple_choice``."""
    return responsibilities(prompt_loglik, alpha, log_prior.to(prompt_loglik)).log()


class ExampleLogliks(NamedTuple):
    """Member log-likelihoods of tokenised examples (``renyi_lora.data.sft`` examples: ``input_ids``, ``labels``)."""

    completion: torch.Tensor  # [K, N] float64: of the targets (the completion, the assistant turns, the text)
    prompt: torch.Tensor | None  # [K, N] float64: of the tokens before the first target, after the first token
    num_tokens: torch.Tensor  # [N] target tokens per example


@torch.no_grad()
def example_logliks(ensemble: LoraEnsemble, examples: Sequence[dict], pad_token_id: int, batch_size: int = 8,
                    *, with_prompt: bool = False, progress: bool = False) -> ExampleLogliks:
    """Every member's log-likelihood of each example's targets (and, ``with_prompt``, of its prompt).

    Examples are batched longest first (less padding) and returned in input order. With ``with_prompt`` every token
    after the first is scored in the same forward and the tokens before the first target are summed apart: the
    prompt's likelihood for ``prompt_log_weights``-style routing, which for a ``messages`` example is the
    conversation before the first assistant turn and for a ``text`` example is empty (log-likelihood 0).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = next(ensemble.parameters()).device
    K, N = ensemble.output_members, len(examples)
    completion = torch.zeros(K, N, dtype=torch.float64)
    prompt = torch.zeros(K, N, dtype=torch.float64) if with_prompt else None
    order = sorted(range(N), key=lambda n: -len(examples[n]["input_ids"]))
    with tqdm(total=N, desc="scoring examples", disable=not progress) as bar:
        for start in range(0, N, batch_size):
            index = order[start:start + batch_size]
            rows = [examples[n] for n in index]
            batch = pad_rows([e["input_ids"] for e in rows], [e["labels"] for e in rows], pad_token_id)
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)  # [b, T]
            targets = labels != IGNORE_INDEX  # [b, T]
            scored = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX) if with_prompt else labels
            token = ensemble(input_ids, attention_mask, labels=scored)  # [K, b, T], 0 off the scored tokens
            completion[:, index] = sequence_loglik(torch.where(targets, token, 0.0), labels, dtype=torch.float64).cpu()
            if prompt is not None:
                first_target = torch.where(targets, torch.arange(labels.shape[1], device=device), labels.shape[1])
                before = torch.arange(labels.shape[1], device=device) < first_target.amin(-1, keepdim=True)  # [b, T]
                prompt[:, index] = sequence_loglik(torch.where(before, token, 0.0), labels, dtype=torch.float64).cpu()
            bar.update(len(index))
    # Position 0 is predicted from nothing, so a target there (a text example's first token) is not scored.
    num_tokens = torch.tensor([sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples])
    return ExampleLogliks(completion, prompt, num_tokens)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id for scoring rows: the tokenizer's pad token, else its EOS (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def posterior_weights(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase, examples: Any,
                      weights: Sequence[float] | torch.Tensor | None = None, *, max_length: int = 1024,
                      batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """The posterior over members given a few examples of one user: ``w [K]`` float64, summing to 1, with
    ``w_k ∝ pi_k prod_j p_k(y_j | x_j)``.

    Args:
        ensemble: the ensemble (K members; under ``adapters_disabled()`` K = 1 and w = [1]).
        tokenizer: its tokenizer.
        examples: SFT examples in any form ``renyi_lora.data.sft.load_sft_dataset`` reads (a ``.jsonl`` / ``.json`` /
            ``.parquet`` file of ``{prompt, completion}``, ``{messages}`` or ``{text}`` records, a list of such
            dicts, a ``datasets.Dataset``), or an already tokenised ``TokenizedDataset``.
        weights: the prior pi (normalised); the ensemble's saved mixture weights if None.
        max_length: tokens per example (longer completions are cut from the right, as in training).
        batch_size: examples per forward pass.

    Pass the result as ``weights=`` to ``generate``, ``evaluate_sft``, ``evaluate_multiple_choice`` or
    ``token_uncertainty`` to score and generate for that user::

        w = posterior_weights(ensemble, tokenizer, [{"prompt": "Q:", "completion": " my style of answer"}])
        generate(ensemble, tokenizer, ["Q: another question"], weights=w)
    """
    dataset = examples if isinstance(examples, TokenizedDataset) else load_sft_dataset(examples, tokenizer, max_length)
    scores = example_logliks(ensemble, dataset.examples, pad_id(tokenizer), batch_size, progress=progress)
    return torch.softmax(prior_log_weights(ensemble, weights) + scores.completion.sum(1), dim=0)
