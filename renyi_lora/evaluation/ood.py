"""Out-of-distribution detection from the members' disagreement.

Two kinds of per-item score. On the answer: the total entropy and the mutual information (MI) of the mixture
over the item's choices (``renyi_lora.evaluation.multiple_choice``). On the input: how much the members disagree
about the prompt's own tokens, scored as if the prompt (after its first token) were a completion: the mean per-token
MI of the mixture's next-token distribution along the prompt (``prompt_mi``), and the spread across members of the mean
token log-likelihood of the prompt (``prompt_spread``, a weighted standard deviation in nats per token). The
answer scores need members that learned to disagree about answers; the input scores do not depend on the answer
the members were trained to give, so they can flag an unseen input even where every member learned the same
(wrong) answer. ``detection_aurocs`` gives the AUROC of each score with the out-of-distribution items as positives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from renyi_lora.evaluation.inference import Prompt, encode_prompt, pad_right
from renyi_lora.evaluation.token_uncertainty import completion_scores, prior_log_weights
from renyi_lora.uncertainty import auroc

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from renyi_lora.ensemble import LoraEnsemble

INPUT_SCORES = ("prompt_mi", "prompt_spread")


@torch.no_grad()
def prompt_scores(ensemble: LoraEnsemble, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                  weights: Sequence[float] | None = None, *, batch_size: int = 8,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Member disagreement on each prompt's own tokens, the members mixed with ``weights`` (normalised; the ensemble's
    saved mixture weights if None).

    Returns:
        ``{"prompt_mi": [N], "prompt_spread": [N]}`` float64: the mean token MI along the prompt and the weighted
        standard deviation across members of the mean token log-likelihood (0 for a one-token prompt).
    """
    log_weights = prior_log_weights(ensemble, weights)  # [K]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(ensemble.parameters()).device
    rows = [encode_prompt(tokenizer, prompt)[0] for prompt in prompts]
    mi, spread = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="prompt scores", disable=not progress):
        batch = rows[start:start + batch_size]
        scores = completion_scores(ensemble, *pad_right([r[:1] for r in batch], [r[1:] for r in batch], pad, device),
                                   log_weights=log_weights)
        count = scores.mask.sum(-1).clamp(min=1)  # [B]
        per_token = scores.member_loglik().double() / count  # [K, B]
        weights_kb = scores.log_weights.exp()  # [K, B]
        mean = (weights_kb * per_token).sum(0)  # [B]
        spread.append(((weights_kb * (per_token - mean) ** 2).sum(0)).sqrt().cpu())
        mi.append(scores.mean_mi().cpu())
    empty = torch.zeros(0, dtype=torch.float64)
    return {"prompt_mi": torch.cat(mi) if mi else empty, "prompt_spread": torch.cat(spread) if spread else empty}


def detection_aurocs(in_distribution: dict[str, Sequence[float]],
                     out_of_distribution: dict[str, Sequence[float]]) -> dict[str, float]:
    """AUROC of every score present in both dicts, out-of-distribution items as positives (0.5 = chance).

    Args:
        in_distribution: score name -> ``[N_in]`` values.
        out_of_distribution: score name -> ``[N_out]`` values.
    """
    result = {}
    for name in in_distribution.keys() & out_of_distribution.keys():
        inside = torch.as_tensor(in_distribution[name], dtype=torch.float64)
        outside = torch.as_tensor(out_of_distribution[name], dtype=torch.float64)
        positives = torch.cat([torch.zeros(len(inside), dtype=torch.bool), torch.ones(len(outside), dtype=torch.bool)])
        result[name] = auroc(torch.cat([inside, outside]), positives)
    return dict(sorted(result.items()))
