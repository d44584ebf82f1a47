"""Survey respondents scored by a ``LoraEnsemble``: every member's restricted answer distributions, teacher-forced.

A respondent's row (header, then one line per answered item) is the SFT example the members were trained on. Each
answer is one token after text every answer of its item shares (``survey.answer_tokens``), so one forward of the row
gives every item's distribution: at the position before item i's answer token, the logits of the item's C_i answer
tokens, renormalised over them (a shared prefix of the answers cancels in the renormalisation). The earlier lines in
context are the respondent's true answers (teacher forcing). Rows of a batch run in one right-padded forward of all
K members, and only the C answer rows of the output head are applied.

K = 1 is one adapter; a deep ensemble is several adapters joined by ``renyi_lora.ensemble.load_adapter_mixture``; under
``ensemble.adapters_disabled()`` the base model is scored (K = 1). A model truncated on cached trunk states
(``benchmarks.quality.trunk``) works too: it reads right-padded rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.evaluation.inference import pad_right

from .survey import RespondentEncoder, Survey
from .survey_metrics import MixtureScores, Respondents


@torch.no_grad()
def answer_log_probs(ensemble: LoraEnsemble, tokenizer, survey: Survey, answers: np.ndarray,
                     batch_size: int = 32) -> np.ndarray:
    """``[K, N, I, C]`` float64 log-probabilities of each item's answers, restricted to its ``C_i`` answer tokens and
    renormalised (``-inf`` past ``C_i``; NaN where the respondent left the item unanswered).

    Args:
        answers: ``[N, I]`` answer codes, ``-1`` unanswered (each respondent's row is rebuilt from them).
        batch_size: respondents per forward.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    encode = RespondentEncoder(tokenizer, survey)
    choices = max(len(item.answers) for item in survey.items)
    device = next(ensemble.parameters()).device
    token_table = torch.zeros(len(survey.items), choices, dtype=torch.long, device=device)  # [I, C]
    valid = torch.zeros(len(survey.items), choices, dtype=torch.bool, device=device)  # [I, C]
    for i, tokens in enumerate(encode.tokens):
        token_table[i, : len(tokens)] = torch.tensor(tokens)
        valid[i, : len(tokens)] = True
    answers = np.asarray(answers)
    out = np.full((ensemble.output_members, len(answers), len(survey.items), choices), np.nan)
    for start in range(0, len(answers), batch_size):
        encoded = [encode([None if code < 0 else int(code) for code in row])
                   for row in answers[start: start + batch_size]]
        ids, mask, _ = pad_right([row for row, _ in encoded], [[] for _ in encoded], tokenizer.pad_token_id,
                                 device)  # [B, T]
        scored = [(b, i, position) for b, (_, positions) in enumerate(encoded) for i, position in enumerate(positions)
                  if position is not None]
        rows, items, positions = (torch.tensor(column, device=device) for column in zip(*scored, strict=True))  # [M]
        features, head = ensemble.output_features(ids, mask)  # [K, B, T, H], or the logits [K, B, T, V]
        at = features[:, rows, positions].float()  # [K, M, H or V]
        answer_ids = token_table[items]  # [M, C]
        if head is None:
            logits = at.gather(-1, answer_ids.expand(at.shape[0], -1, -1))  # [K, M, C]
        else:  # only the answers' rows of the head: [M, C, H]
            logits = torch.einsum("kmh,mch->kmc", at, head.weight[answer_ids].float())
            if head.bias is not None:
                logits = logits + head.bias[answer_ids].float()
        log_probs = logits.double().masked_fill(~valid[items], -math.inf).log_softmax(-1)  # [K, M, C]
        out[:, start + rows.cpu().numpy(), items.cpu().numpy()] = log_probs.cpu().numpy()
    return out


def no_context_log_probs(ensemble: LoraEnsemble, tokenizer, survey: Survey, batch_size: int = 32) -> np.ndarray:
    """``[K, I, C]``: each item asked alone (the header, then that item's line only), restricted and renormalised."""
    alone = np.full((len(survey.items), len(survey.items)), -1)
    np.fill_diagonal(alone, 0)  # the answer given does not matter: its position is scored, not its token
    log_probs = answer_log_probs(ensemble, tokenizer, survey, alone, batch_size)  # [K, I, I, C]
    index = np.arange(len(survey.items))
    return log_probs[:, index, index]


def score(ensemble: LoraEnsemble, tokenizer, respondents: Respondents, log_weights: np.ndarray | None = None,
          batch_size: int = 32) -> MixtureScores:
    """Everything ``survey_metrics.evaluate`` needs of a model; ``log_weights [K]`` default to uniform.

    Respondents who gave the same answers have the same row, so each distinct row is scored once (GSS: about 90
    distinct rows among 500 respondents)."""
    members = ensemble.output_members
    if log_weights is None:
        log_weights = np.full(members, -math.log(members))
    distinct, inverse = np.unique(respondents.answers, axis=0, return_inverse=True)
    log_probs = answer_log_probs(ensemble, tokenizer, respondents.survey, distinct, batch_size)  # [K, U, I, C]
    return MixtureScores(log_probs[:, inverse.reshape(-1)], np.asarray(log_weights, dtype=float),
                         no_context_log_probs(ensemble, tokenizer, respondents.survey, batch_size))
