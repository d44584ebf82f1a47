"""Scoring several completions of one prompt: the prompt runs once, its completions continue from its KV cache.

Multiple-choice evaluation scores every choice after the same prompt; run naively, the prompt is recomputed once
per choice (and per member). Here the prompts of a batch run once (left-padded, the cache kept), the cache rows
are repeated for each prompt's completions, and all completions run in one more forward. The completions'
log-likelihoods are those of ``ensemble(prompt + completion)`` (tested); the prompt's cost is paid once. When every
completion is one token, one forward of the prompts alone gives them all (``next_token_logliks``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from renyi_lora.evaluation.inference import IncrementalForward, left_pad, pad_right

if TYPE_CHECKING:
    from renyi_lora.ensemble import LoraEnsemble


def _repeat_cache_rows(cache, owner: torch.Tensor, members: int, prompts: int) -> bool:
    """Give every completion row its prompt's cache rows; False if this cache type cannot be re-indexed.

    A layer's cache holds ``prompts`` rows (a shared-trunk layer: one per prompt) or ``members * prompts``
    (member-major); ``owner [R]`` is each completion's prompt index.
    """
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "reorder_cache") and hasattr(layer, "keys") for layer in layers):
        return False
    member_major = (torch.arange(members, device=owner.device)[:, None] * prompts + owner[None]).reshape(-1)
    for layer in layers:
        rows = layer.keys.shape[0]
        if rows not in (prompts, members * prompts):
            return False
        layer.reorder_cache(owner if rows == prompts else member_major)
    return True


@torch.no_grad()
def shared_prompt_logliks(ensemble: LoraEnsemble, prompts: list[list[int]], completions: list[list[list[int]]],
                          pad_token_id: int) -> list[torch.Tensor] | None:
    """Every member's log-likelihood of each completion of each prompt: a ``[K, C_n]`` float64 tensor per prompt.

    Args:
        prompts: ``N`` token lists, each non-empty.
        completions: ``N`` lists of ``C_n`` non-empty token lists (the targets, scored after their prompt).

    Returns None when the model's KV cache cannot be re-indexed by rows (then score prompt + completion rows).
    """
    K = ensemble.output_members
    device = next(ensemble.parameters()).device
    forward = IncrementalForward(ensemble)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    first = forward(prompt_ids, prompt_mask).float().log_softmax(-1)  # [K, N, V]: each completion's first token
    owner = torch.tensor([n for n, choices in enumerate(completions) for _ in choices], device=device)  # [R]
    if not _repeat_cache_rows(forward.cache, owner, K, len(prompts)):
        return None
    rows = [row for choices in completions for row in choices]
    ids, mask, _ = pad_right([[] for _ in rows], rows, pad_token_id, device)  # [R, L]
    logits = forward(ids, torch.cat([prompt_mask[owner], mask], dim=1), last_only=False)  # [K, R, L, V]
    head = first[:, owner].gather(-1, ids[None, :, :1].expand(K, -1, -1))[..., 0]  # [K, R]
    rest = logits[:, :, :-1].float().log_softmax(-1).gather(-1, ids[None, :, 1:, None].expand(K, -1, -1, -1))
    total = head.double() + (rest[..., 0].double() * mask[:, 1:]).sum(-1)  # [K, R]
    return list(total.split([len(choices) for choices in completions], dim=1))


@torch.no_grad()
def next_token_logliks(ensemble: LoraEnsemble, prompts: list[list[int]], tokens: list[list[int]],
                       pad_token_id: int) -> list[torch.Tensor]:
    """Every member's log-probability of each one-token completion of each prompt: a ``[K, C_n]`` float64 tensor
    per prompt, from one right-padded forward of the prompts (the distribution at each prompt's last position).

    The same numbers as scoring ``prompt + token`` rows, for one forward of the prompt instead of one per
    completion: the common multiple-choice case of answer letters or yes / no.
    """
    device = next(ensemble.parameters()).device
    input_ids, attention_mask, _ = pad_right(prompts, [[] for _ in prompts], pad_token_id, device)  # [N, T]
    features, head = ensemble.output_features(input_ids, attention_mask)  # [K, N, T, H or V]
    last = attention_mask.sum(1) - 1  # [N]
    at_end = features[:, torch.arange(len(prompts), device=device), last]  # [K, N, H or V]
    log_probs = torch.log_softmax((at_end if head is None else head(at_end)).double(), dim=-1)  # [K, N, V]
    return [log_probs[:, n, torch.tensor(choices, device=device)].cpu() for n, choices in enumerate(tokens)]
