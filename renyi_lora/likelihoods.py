"""Per-member log-likelihoods of completion tokens, without a float32 log-softmax over ``[K, B, T, V]``.

The output head runs on the hidden states in chunks; each chunk takes the target logit minus a float32 logsumexp.
When gradients are on, a frozen bias-free head (the LoRA case) computes ``d log p / d hidden`` in the same pass
over the vocabulary (``FusedTargetLogprob``: no logits kept, no second pass); any other head is checkpointed per
chunk so that only its hidden states are kept. Labels follow the transformers convention: ``labels[b, t]`` is the
token at position t when it is a target, ``-100`` otherwise (prompt, padding); position t is predicted from
positions ``< t``.

This is only right if the model's logits are ``head(hidden)``. Some architectures transform them after the head
(Gemma's soft-capping, Granite's ``logits_scaling``, Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``,
and whatever comes next), so instead of a list of config names, which always lags transformers, each model proves
it once, when the ensemble is built (``output_head_is_plain``); the others take the model's own logits.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """float32 logits for a logsumexp over V (bf16 loses the small probabilities); float64 stays float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@torch.no_grad()
def output_head_is_plain(model: nn.Module, probe_logit: float = 30.0, tokens: int = 8) -> bool:
    """Whether ``model``'s logits are ``model.get_output_embeddings()(model.base_model(...).last_hidden_state)``.

    One forward on ``tokens`` tokens, with a hook that scales the base model's output so that the head's largest
    logit is ``probe_logit``: large enough that soft-capping (Gemma's cap is 30) bends it visibly, while a linear
    transform (a multiplier) shows at any scale. Compares log-softmax of the model's own logits with that of the
    head applied to the captured hidden states. Warns and returns False when they differ (or when the model has no
    such base model and head): member log-likelihoods then come from the full logits.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    captured: list[torch.Tensor] = []

    def rescale(module: nn.Module, args: tuple, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            return output
        scale = probe_logit / head(hidden).abs().amax().float().clamp_min(1e-6)
        output.last_hidden_state = hidden * scale.to(hidden.dtype)
        captured.append(output.last_hidden_state)
        return output

    plain = isinstance(head, nn.Linear) and isinstance(base, nn.Module) and base is not model
    if plain:
        vocab = head.weight.shape[0]
        input_ids = torch.arange(1, tokens + 1, device=head.weight.device)[None] % vocab  # [1, T]
        handle = base.register_forward_hook(rescale)
        try:
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
        finally:
            handle.remove()
        plain = len(captured) == 1 and logits.shape[:2] == captured[0].shape[:2]
        if plain:
            expected = _at_least_float32(logits).log_softmax(-1)  # [1, T, V]
            got = _at_least_float32(head(captured[0])).log_softmax(-1)
            # The same matmul on the same tensor: any difference is a transform, not rounding.
            plain = bool((expected - got).abs().amax() <= 1e-4 * probe_logit)
    if not plain:
        warnings.warn(f"{type(model).__name__}'s logits are not its output head applied to its last hidden states "
                      "(a logit transform such as soft-capping or a multiplier): member log-likelihoods use the "
                      "model's full logits, which keeps [K, B, T, V] logits in memory", stacklevel=2)
    return plain


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    """``hidden [N, H]``, ``targets [N]`` -> ``log p(target) [N]`` in float32 (float64 for float64 inputs)."""
    logits = _at_least_float32(nn.functional.linear(hidden, weight, bias))  # [N, V]
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
        logits = _at_least_float32(nn.functional.linear(hidden, weight))  # [N, V]
        logsumexp = torch.logsumexp(logits, dim=1)  # [N]
        logp = logits.gather(1, targets[:, None]).squeeze(1) - logsumexp
        probs = logits.sub_(logsumexp[:, None]).exp_()  # in place: the logits are not needed any more
        d_hidden = weight[targets].to(probs.dtype) - probs @ weight.to(probs.dtype)  # [N, H]
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
    # split, not a range over N: under torch.compile a loop over range(N) guards on N's exact value (a recompile
    # per sequence length), while split guards only on the number of chunks.
    for hidden_chunk, target_chunk in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        if fused:
            pieces.append(FusedTargetLogprob.apply(hidden_chunk, head.weight, target_chunk))
        elif grad:
            pieces.append(checkpoint(_chunk_logprobs, hidden_chunk, head.weight, head.bias, target_chunk,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(hidden_chunk, head.weight, head.bias, target_chunk))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def token_logliks(features: torch.Tensor, head: nn.Linear | None, labels: torch.Tensor,
                  chunk_size: int = 1024) -> torch.Tensor:
    """Per-token log-likelihoods of the targets, ``[K, B, T]`` (0 where ``labels [B, T] == -100``).

    ``features``: what the output head consumes, ``[K, B, T, H]`` hidden states with ``head`` (see
    ``LoraEnsemble.output_features``), or ``[K, B, T, V]`` logits with ``head=None``.

    Eagerly, the head runs only on the target positions (a boolean-mask selection). Under ``torch.compile`` that
    selection is a data-dependent shape (``aten.nonzero``, a graph break), so there the head runs on every
    position with the targets clamped to a valid id and the non-targets zeroed after: fixed shapes, no break,
    for the price of the head on the prompt positions too.
    """
    K, B, T, H = features.shape
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t-1 predicts labels[t]
    if head is None or torch.compiler.is_compiling():
        targets = labels[:, 1:].clamp(min=0).expand(K, B, T - 1)  # [K, B, T-1]
        if head is None:
            logp = torch.log_softmax(_at_least_float32(features[:, :, :-1]), dim=-1)  # [K, B, T-1, V]
            logp = logp.gather(-1, targets[..., None]).squeeze(-1)  # [K, B, T-1]
        else:
            logp = target_logprobs(features[:, :, :-1].reshape(-1, H), head, targets.reshape(-1), chunk_size)
            logp = logp.view(K, B, T - 1)
        token = torch.where(mask, logp, 0.0)  # [K, B, T-1]
    else:
        selected = features[:, :, :-1][:, mask]  # [K, N, H]
        targets = labels[:, 1:][mask]  # [N]
        N = targets.shape[0]
        logp = target_logprobs(selected.reshape(K * N, H), head, targets.repeat(K), chunk_size)  # [K*N]
        token = features.new_zeros(K, B, T - 1, dtype=logp.dtype)
        token[:, mask] = logp.view(K, N)
    return nn.functional.pad(token, (1, 0))  # [K, B, T]


def sequence_loglik(token: torch.Tensor, labels: torch.Tensor, length_normalize: bool = False,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sequence log-likelihood ``[K, B]`` from per-token ones ``token [K, B, T]`` (0 off target), summed in
    ``dtype`` (float32 under any autocast: routing and DPO margins are small differences of large sums); the
    mean over the target tokens of ``labels [B, T]`` if ``length_normalize``."""
    total = token.to(dtype).sum(-1)  # [K, B]
    if length_normalize:
        total = total / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return total
