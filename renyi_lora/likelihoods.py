"""Per-member log-likelihoods of completion tokens, without a float32 log-softmax over ``[K, B, T, V]``.

The output head runs only on the positions that predict a target token, in chunks; each chunk takes the
target logit minus a float32 logsumexp. When gradients are on, a frozen bias-free head (the LoRA case) computes
``d log p / d hidden`` in the same pass over the vocabulary (``FusedTargetLogprob``: no logits kept, no second
pass); any other head is checkpointed per chunk so that only its hidden states are kept. Labels follow the
transformers convention: ``labels[b, t]`` is the token at position t when it is a target, ``-100`` otherwise
(prompt, padding); position t is predicted from positions ``< t``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from renyi_lora.ensemble import LoraEnsemble

IGNORE_INDEX = -100
# Config attributes that change logits after the output head; such models take the plain full-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    """``hidden [N, H]``, ``targets [N]`` -> ``log p(target) [N]`` in float32."""
    logits = nn.functional.linear(hidden, weight, bias).float()  # [N, V]
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


class FusedTargetLogprob(torch.autograd.Function):
    """``log p(target) [N]`` of one chunk under a frozen, bias-free head, with its gradient made in the forward.

    d log p_n / d h_n = W[t_n] - softmax(h_n W^T) W: an ``[N, H]`` tensor computed while the ``[N, V]`` logits
    exist anyway, so backward only scales it by the incoming ``[N]`` gradient. Against a checkpointed chunk this
    saves the recomputed forward and the backward matmul over V (one ``[N, V] x [V, H]`` product instead of
    three ``N x V x H`` passes).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden, weight).float()  # [N, V]
        logsumexp = torch.logsumexp(logits, dim=1)  # [N]
        logp = logits.gather(1, targets[:, None]).squeeze(1) - logsumexp
        probs = logits.sub_(logsumexp[:, None]).exp_()  # in place: the logits are not needed any more
        d_hidden = weight[targets].float() - probs @ weight.float()  # [N, H]
        ctx.save_for_backward(d_hidden.to(hidden.dtype))
        return logp

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (d_hidden,) = ctx.saved_tensors
        return grad[:, None].to(d_hidden.dtype) * d_hidden, None, None


def target_logprobs(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                    chunk_size: int = 1024) -> torch.Tensor:
    """Log-probabilities of ``targets [N]`` under ``head(hidden [N, H])``, chunked over N -> ``[N]``."""
    grad = torch.is_grad_enabled() and hidden.requires_grad
    fused = grad and head.bias is None and not head.weight.requires_grad
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start:start + chunk_size], head.weight, head.bias, targets[start:start + chunk_size])
        if fused:
            pieces.append(FusedTargetLogprob.apply(args[0], head.weight, args[3]))
        elif grad:
            pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _full_logits_logprobs(ensemble: LoraEnsemble, input_ids, attention_mask, labels) -> torch.Tensor:
    """Fallback for heads with logit transforms: ``[K, B, T]`` from the model's own logits."""
    model = ensemble.model
    if ensemble.is_disabled:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[None]
    else:
        logits = ensemble(input_ids, attention_mask)  # [K, B, T, V]
    targets = labels[:, 1:].clamp(min=0)  # [B, T-1]
    logp = torch.log_softmax(logits[:, :, :-1].float(), dim=-1)
    token = logp.gather(-1, targets.expand(logits.shape[0], -1, -1)[..., None]).squeeze(-1)  # [K, B, T-1]
    token = torch.nn.functional.pad(token, (1, 0))  # [K, B, T]
    return token * (labels != IGNORE_INDEX)


def token_logliks(ensemble: LoraEnsemble, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token log-likelihoods of the targets, ``[K, B, T]`` (0 where ``labels == -100``).

    Under ``ensemble.adapters_disabled()`` the leading dimension is 1 (the base model on B rows).
    """
    config = getattr(ensemble.model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return _full_logits_logprobs(ensemble, input_ids, attention_mask, labels)
    hidden = ensemble.hidden_states(input_ids, attention_mask)  # [K, B, T, H]
    K, B, T, H = hidden.shape
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t-1 predicts labels[t]
    selected = hidden[:, :, :-1][:, mask]  # [K, N, H]
    targets = labels[:, 1:][mask]  # [N]
    N = targets.shape[0]
    logp = target_logprobs(selected.reshape(K * N, H), ensemble.model.get_output_embeddings(),
                           targets.repeat(K), chunk_size)  # [K*N]
    token = hidden.new_zeros(K, B, T - 1, dtype=torch.float32)
    token[:, mask] = logp.view(K, N)
    return nn.functional.pad(token, (1, 0))  # [K, B, T]


def sequence_logliks(ensemble: LoraEnsemble, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     labels: torch.Tensor, length_normalize: bool = False, chunk_size: int = 1024) -> torch.Tensor:
    """Per-member sequence log-likelihood of the completion tokens, ``[K, B]`` (mean over tokens if
    ``length_normalize``)."""
    token = token_logliks(ensemble, input_ids, attention_mask, labels, chunk_size)
    total = token.sum(-1)  # [K, B]
    if length_normalize:
        total = total / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return total
