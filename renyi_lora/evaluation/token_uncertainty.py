"""Free-text uncertainty: the mixture's next-token distribution along a given completion.

At every completion position the K members give full next-token distributions ``p_k(. | x, y_<t)``; their
weighted mixture has total entropy, expected member entropy (aleatoric) and mutual information
(epistemic), as in ``renyi_lora.uncertainty``. Sequence scores: the mean token MI and the weighted variance
across members of the sequence log-likelihood. The output head runs only on completion positions, in
chunks, so memory is ``O(K * chunk * V)`` rather than ``O(K * B * T * V)``.

Weights may differ per example (``[K, B]``, e.g. a posterior given the prompt), which is why the
decomposition here takes per-row weights (``uncertainty.decompose_uncertainty`` takes one ``[K]``).

Tokenisation follows ``renyi_lora.data.sft``: a plain prompt gets the tokenizer's BOS (if it adds one) and no
special tokens otherwise; a prompt given as a list of messages is rendered with the chat template and its
generation prompt; a completion's ids are those of ``prompt + completion`` after the prompt's (tokenised
separately if the tokenizer merges across the boundary). Nothing (no EOS) is appended to a completion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from renyi_lora.evaluation.inference import Prompt, encode_pair, pad_right
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.uncertainty import Uncertainty, broadcast_log_weights, entropy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from renyi_lora.ensemble import LoraEnsemble

def normalised_log_weights(weights: Sequence[float] | torch.Tensor | None, num_members: int) -> torch.Tensor:
    """``log pi [K]`` (float64) from non-negative mixture weights (normalised here); uniform if None."""
    if weights is None:
        return torch.full((num_members,), -math.log(num_members), dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if weights.numel() != num_members or (weights < 0).any() or not weights.sum() > 0 or not weights.isfinite().all():
        raise ValueError(f"weights must be {num_members} non-negative numbers (one per member) with a positive sum; "
                         f"got {weights.tolist()}")
    return (weights / weights.sum()).log()


def prior_log_weights(ensemble: LoraEnsemble, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """``log pi [K]`` float64 on the CPU: ``weights`` (normalised) if given, else the ensemble's saved mixture weights
    (``LoraEnsemble.mixture_weights``: uniform unless learned). The default of every scoring and generation function.

    ``K`` is ``ensemble.output_members``: 1 under ``adapters_disabled()`` (the base model alone, weight 1).
    """
    K = ensemble.output_members
    if weights is None and not ensemble.is_disabled and ensemble.mixture_weights.numel() == K:
        weights = ensemble.mixture_weights.detach().cpu()
    return normalised_log_weights(weights, K)


def decompose_rows(member_log_probs: torch.Tensor, log_weights: torch.Tensor) -> Uncertainty:
    """Uncertainty of a mixture whose weights differ per row.

    Args:
        member_log_probs: ``[K, N, V]`` member log-probabilities.
        log_weights: ``[K, N]`` normalised log mixture weights of each row.

    Returns:
        ``Uncertainty(total, aleatoric, epistemic)``, each ``[N]``; epistemic clamped at 0 (rounding only).
    """
    log_weights = log_weights.to(member_log_probs)
    total = entropy(torch.logsumexp(member_log_probs + log_weights[..., None], dim=0))  # [N]
    aleatoric = (log_weights.exp() * entropy(member_log_probs)).sum(0)  # [N]
    return Uncertainty(total, aleatoric, (total - aleatoric).clamp_min(0.0))


def row_log_weights(log_weights: torch.Tensor | None, num_members: int, num_rows: int) -> torch.Tensor:
    """``[K]`` or ``[K, B]`` log weights (uniform if None) as ``[K, B]`` float64."""
    rows = torch.zeros(num_members, num_rows, dtype=torch.float64)
    return broadcast_log_weights(log_weights, rows).expand_as(rows)


class TokenScores(NamedTuple):
    """Per-token scores of the completion tokens, 0 where ``mask`` is False."""

    total: torch.Tensor  # [B, T] entropy of the mixture's next-token distribution
    aleatoric: torch.Tensor  # [B, T] expected member entropy
    epistemic: torch.Tensor  # [B, T] mutual information
    mixture_logprob: torch.Tensor  # [B, T] log p_mixture(token)
    member_logprob: torch.Tensor  # [K, B, T] log p_k(token)
    mask: torch.Tensor  # [B, T] bool, the completion tokens
    log_weights: torch.Tensor  # [K, B] the mixture weights used

    def mean_mi(self) -> torch.Tensor:
        """``[B]`` mean token MI over the completion."""
        return self.epistemic.sum(-1) / self.mask.sum(-1).clamp(min=1)

    def member_loglik(self) -> torch.Tensor:
        """``[K, B]`` each member's sequence log-likelihood of the completion."""
        return self.member_logprob.sum(-1)

    def loglik_variance(self) -> torch.Tensor:
        """``[B]`` weighted variance across members of the sequence log-likelihood (member disagreement)."""
        weights, loglik = self.log_weights.exp(), self.member_loglik().double()
        mean = (weights * loglik).sum(0)
        return (weights * (loglik - mean) ** 2).sum(0)


def _selected_logits(ensemble: LoraEnsemble, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     mask: torch.Tensor):
    """``(features [K, N, *], head)``: ``LoraEnsemble.output_features`` at the ``mask [B, T-1]`` positions."""
    features, head = ensemble.output_features(input_ids, attention_mask)  # [K, B, T, H or V]
    return features[:, :, :-1][:, mask], head


@torch.no_grad()
def completion_scores(ensemble: LoraEnsemble, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels: torch.Tensor, *, log_weights: torch.Tensor | None = None,
                      chunk_size: int = 256) -> TokenScores:
    """Per-token uncertainty of the mixture along the target tokens of ``labels``.

    Args:
        input_ids, attention_mask: ``[B, T]`` right-padded rows.
        labels: ``[B, T]`` aligned with ``input_ids`` (not shifted), -100 where not a target.
        log_weights: ``[K]`` or ``[K, B]`` normalised log mixture weights; uniform if None.
        chunk_size: completion positions per output-head call (bounds the ``[K, chunk, V]`` logits).
    """
    K, (B, T) = ensemble.output_members, input_ids.shape
    log_weights = row_log_weights(log_weights, K, B).to(input_ids.device)  # [K, B]
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t-1 predicts labels[t]
    targets = labels[:, 1:][mask]  # [N]
    rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T - 1)[mask]  # [N]
    features, head = _selected_logits(ensemble, input_ids, attention_mask, mask)  # [K, N, H or V]
    pieces: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, targets.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        logits = features[:, chunk] if head is None else head(features[:, chunk])
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [K, n, V]
        weights = log_weights[:, rows[chunk]]  # [K, n]
        uncertainty = decompose_rows(log_probs, weights)
        member = log_probs.gather(-1, targets[chunk].expand(K, -1)[..., None]).squeeze(-1)  # [K, n]
        mixture = torch.logsumexp(member.double() + weights, dim=0)  # [n]
        pieces.append((*uncertainty, mixture, member))

    def scatter(values: list[torch.Tensor], leading: tuple[int, ...] = ()) -> torch.Tensor:
        out = torch.zeros(*leading, B, T - 1, dtype=torch.float64, device=input_ids.device)
        if values:
            out[..., mask] = torch.cat(values, dim=-1).double()
        return torch.nn.functional.pad(out, (1, 0))  # [..., B, T]

    columns = list(zip(*pieces, strict=True)) if pieces else [[]] * 5
    full_mask = torch.nn.functional.pad(mask, (1, 0))
    return TokenScores(*(scatter(list(c)) for c in columns[:4]), scatter(list(columns[4]), (K,)), full_mask,
                       log_weights)


def token_uncertainty(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                      completions: Sequence[str], *, weights: Sequence[float] | None = None,
                      batch_size: int = 8) -> list[dict]:
    """Per-token total entropy and MI of the mixture along each completion, and sequence scores.

    ``weights``: the mixture weights (normalised), the ensemble's saved mixture weights if None.

    Returns one JSON-serialisable dict per example: ``tokens`` (decoded), ``token_ids``, per-token ``entropy``,
    ``aleatoric``, ``mi``, ``prob`` (mixture probability of the token), and ``mean_mi``, ``loglik_variance``,
    ``member_logliks`` ``[K]``, ``mixture_loglik``.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; expected one each")
    log_weights = prior_log_weights(ensemble, weights)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(ensemble.parameters()).device
    results = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts, batch_completions = prompts[start:start + batch_size], completions[start:start + batch_size]
        pairs = [encode_pair(tokenizer, p, c) for p, c in zip(batch_prompts, batch_completions, strict=True)]
        scores = completion_scores(ensemble, *pad_right([p for p, _ in pairs], [c for _, c in pairs], pad, device),
                                   log_weights=log_weights)
        results += score_records(tokenizer, scores, [c for _, c in pairs])
    for record, prompt, completion in zip(results, prompts, completions, strict=True):
        record.update(prompt=prompt, completion=completion)
    return results


def score_records(tokenizer: PreTrainedTokenizerBase, scores: TokenScores, completions: list[list[int]]) -> list[dict]:
    """One JSON-serialisable dict per row of ``scores`` (see ``token_uncertainty``)."""
    records = []
    mean_mi, variance, member = scores.mean_mi(), scores.loglik_variance(), scores.member_loglik()
    mixture = torch.logsumexp(member.double() + scores.log_weights, dim=0)  # [B]
    for b, ids in enumerate(completions):
        mask = scores.mask[b]

        def values(tensor: torch.Tensor, row: int = b, where: torch.Tensor = mask) -> list[float]:
            return tensor[row][where].tolist()

        records.append({
            "tokens": [tokenizer.decode([i]) for i in ids], "token_ids": list(ids),
            "entropy": values(scores.total), "aleatoric": values(scores.aleatoric), "mi": values(scores.epistemic),
            "prob": values(scores.mixture_logprob.exp()), "mean_mi": mean_mi[b].item(),
            "loglik_variance": variance[b].item(), "member_logliks": member[:, b].tolist(),
            "mixture_loglik": mixture[b].item(),
        })
    return records
