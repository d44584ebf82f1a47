"""Matrix-free products with the curvature matrices of a per-example log-likelihood (docs/critical_alpha.md): the
observed information V, the empirical Fisher J and the generalised Gauss-Newton matrix G.

Over the N examples of a data set, at theta,

    V = mean_i -Hessian log p_theta(y_i | x_i)                                 [P, P]
    J = mean_i g_i g_i^T,   g_i = grad log p_theta(y_i | x_i)                 [P, P]
    G = mean_i D_i^T (-Hessian_z log p_theta(y_i | x_i)) D_i                  [P, P]

with D_i the Jacobian of example i's outputs z (e.g. its logits) in theta. None is formed. The model is given
functionally, ``loglik_fn(params, batch) -> [N]``, a pure function of ``params`` (call
``torch.func.functional_call`` inside when wrapping an ``nn.Module``), so that ``torch.func`` can take products:
J v by a forward-mode jvp of the log-likelihood vector (S v, [N], S the score matrix [N, P]) then a vjp
(S^T u, [P]); V v by a jvp of the gradient (forward-over-reverse); G v by a jvp through the outputs, the Hessian of
the log-likelihood in the outputs (forward-over-reverse on that head alone) and a vjp back. G is V without its
residual term mean_i sum_o (d log p_i / d z_o) Hessian z_o: positive semi-definite everywhere when the head is
concave in z (a log-softmax is), equal to the Fisher information of the model's own predictive for a softmax, and
equal to V where the outputs are linear in theta or the residuals average out. P is the number of numbers in
``params``; vectors are params-shaped dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.func import grad, jvp, vjp

Params = dict[str, torch.Tensor]
LoglikFn = Callable[[Params, Any], torch.Tensor]


@dataclass(frozen=True)
class OutputLoglik:
    """A log-likelihood that goes through the model's outputs: ``loglik(params, batch) = head(outputs(params, batch),
    batch)``, the form the Gauss-Newton curvature needs (any callable works for the exact one).

    Attributes:
        outputs: ``(params, batch) -> z``, the model's outputs, e.g. logits ``[N, T, V]``.
        head: ``(z, batch) -> [N]``, per-example log-likelihoods from the outputs; concave in ``z`` (a log-softmax
            of logits is) for the Gauss-Newton matrix to be positive semi-definite.
    """

    outputs: Callable[[Params, Any], torch.Tensor]
    head: Callable[[torch.Tensor, Any], torch.Tensor]

    def __call__(self, params: Params, batch: Any) -> torch.Tensor:
        return self.head(self.outputs(params, batch), batch)


def _loglik(loglik_fn: LoglikFn, params: Params, batch: Any) -> torch.Tensor:
    """``loglik_fn(params, batch)``, checked to be the per-example vector ``[N]``."""
    try:
        loglik = loglik_fn(params, batch)
    except NotImplementedError as error:  # e.g. SDPA attention kernels have no forward-mode derivative
        raise NotImplementedError(f"{error}\nloglik_fn must support torch.func.jvp; for Hugging Face models load "
                                  "with attn_implementation='eager'") from error
    if loglik.dim() != 1:
        raise ValueError(f"loglik_fn must return per-example log-likelihoods of shape [N]; got {tuple(loglik.shape)}")
    return loglik


def _fisher_vector_batch(loglik_fn: LoglikFn, params: Params, batch: Any, vector: Params) -> tuple[Params, int]:
    """``(sum_i g_i (g_i . v), N)`` over one batch: S v by forward mode, then S^T (S v) by reverse mode."""

    batch_loglik = partial(_loglik, loglik_fn, batch=batch)
    _, scores_dot_v = jvp(batch_loglik, (params,), (vector,))  # [N]
    _, pullback = vjp(batch_loglik, params)
    (product,) = pullback(scores_dot_v.detach())
    return product, scores_dot_v.shape[0]


def _hessian_vector_batch(loglik_fn: LoglikFn, params: Params, batch: Any, vector: Params) -> tuple[Params, int]:
    """``(Hessian of sum_i log p_i times v, N)`` over one batch (a jvp of the gradient)."""

    def total_loglik(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        loglik = _loglik(loglik_fn, p, batch)
        return loglik.sum(), loglik

    _, product, loglik = jvp(grad(total_loglik, has_aux=True), (params,), (vector,), has_aux=True)
    return product, loglik.shape[0]


def _gauss_newton_vector_batch(loglik_fn: OutputLoglik, params: Params, batch: Any, vector: Params
                               ) -> tuple[Params, int]:
    """``(sum_i D_i^T Hessian_z(log p_i) D_i v, N)`` over one batch: D v by forward mode through the model, the
    Hessian of the head in the outputs by forward-over-reverse on the head alone, then D^T by reverse mode."""

    def outputs(p: Params) -> torch.Tensor:
        return loglik_fn.outputs(p, batch)

    def head_total(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loglik = loglik_fn.head(z, batch)
        if loglik.dim() != 1:
            raise ValueError(f"head must return per-example log-likelihoods of shape [N]; got {tuple(loglik.shape)}")
        return loglik.sum(), loglik

    value, outputs_dot_v = jvp(outputs, (params,), (vector,))  # z and D v, each like the outputs
    _, curved, loglik = jvp(grad(head_total, has_aux=True), (value.detach(),), (outputs_dot_v,), has_aux=True)
    _, pullback = vjp(outputs, params)
    (product,) = pullback(curved.detach())
    return product, loglik.shape[0]


def _mean_over_batches(
    batch_product: Callable, loglik_fn: LoglikFn, params: Params, batches: Iterable, vector: Params
) -> Params:
    """Sum a per-batch product over the data set and divide by the number of examples."""
    total, count = {name: torch.zeros_like(value) for name, value in params.items()}, 0
    for batch in batches:
        product, size = batch_product(loglik_fn, params, batch, vector)
        count += size
        for name in total:
            total[name] += product[name]
    if count == 0:
        raise ValueError("batches is empty: the data set must contain at least one example")
    return {name: value / count for name, value in total.items()}


def fisher_vector_product(loglik_fn: LoglikFn, params: Params, batches: Iterable, vector: Params) -> Params:
    """Empirical Fisher times a vector, ``J v = mean_i g_i (g_i . v)``, with no per-example gradients.

    Args:
        loglik_fn: ``(params, batch) -> [N]`` per-example log-likelihoods, a pure function of ``params``.
        params: theta, name -> tensor (P numbers in all).
        batches: the data set; must be re-iterable (a list or a DataLoader). Examples are weighted equally, so
            batches of different sizes are weighted by their size.
        vector: v, the same names and shapes as ``params``.

    Returns:
        ``J v``, the same names and shapes as ``params``.
    """
    return _mean_over_batches(_fisher_vector_batch, loglik_fn, params, batches, vector)


def hessian_vector_product(loglik_fn: LoglikFn, params: Params, batches: Iterable, vector: Params) -> Params:
    """Observed information times a vector, ``V v = Hessian(mean_i -log p_i) v`` (forward-over-reverse).

    Args and returns as in ``fisher_vector_product``.
    """
    product = _mean_over_batches(_hessian_vector_batch, loglik_fn, params, batches, vector)
    return {name: -value for name, value in product.items()}


def gauss_newton_vector_product(loglik_fn: OutputLoglik, params: Params, batches: Iterable, vector: Params) -> Params:
    """Generalised Gauss-Newton matrix times a vector, ``G v = mean_i D_i^T (-Hessian_z log p_i) D_i v``.

    ``D_i`` is the Jacobian of example i's outputs ``z`` (``loglik_fn.outputs``) in ``params``. G is V without its
    residual term: positive semi-definite at every theta when the head is concave in ``z``; for a softmax likelihood
    the Hessian in the logits is ``-(diag p - p p^T)`` per target token, so G is the Fisher information of the
    model's own predictive. One product costs two forward passes (forward mode, then reverse mode) and one backward.

    Args and returns as in ``fisher_vector_product``; ``loglik_fn`` must be an ``OutputLoglik``.
    """
    if not isinstance(loglik_fn, OutputLoglik):
        raise TypeError("the Gauss-Newton product needs loglik_fn as OutputLoglik(outputs, head): the outputs it "
                        f"linearises (e.g. logits) and the log-likelihood of them; got {type(loglik_fn).__name__}")
    product = _mean_over_batches(_gauss_newton_vector_batch, loglik_fn, params, batches, vector)
    return {name: -value for name, value in product.items()}
