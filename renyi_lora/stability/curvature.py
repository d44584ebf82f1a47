"""Matrix-free products with the curvature matrices of a per-example log-likelihood (docs/critical_alpha.md): the
observed information V, the empirical Fisher J and the generalised Gauss-Newton matrix G.

Over the N examples of a data set, at theta,

    V = mean_i -Hessian log p_theta(y_i | x_i)                                 [P, P]
    J = mean_i g_i g_i^T,   g_i = grad log p_theta(y_i | x_i)                 [P, P]
    G = mean_i D_i^T (-Hessian_z log p_theta(y_i | x_i)) D_i                  [P, P]

with D_i the Jacobian of example i's outputs z (e.g. its logits) in theta. None is formed. The model is given
functionally, ``loglik_fn(params, batch) -> [N]``, a pure function of ``params`` (call
``torch.func.functional_call`` inside when wrapping an ``nn.Module``). G is V without its residual term
mean_i sum_o (d log p_i / d z_o) Hessian z_o: positive semi-definite everywhere when the head is concave in z (a
log-softmax is), equal to the Fisher information of the model's own predictive for a softmax, and equal to V where
the outputs are linear in theta or the residuals average out. P is the number of numbers in ``params``; vectors are
params-shaped dicts.

``Linearization`` runs the model forward once per batch and keeps the graphs; every product after that is backward
passes through them, batched, with no forward pass: D^T u is one backward, D v the same backward differentiated in
u (the "double-backward" trick: D^T u is linear in u, so the gradient of <D^T u, v> in u is D v), V v a backward
through the graph of the gradient (Pearlmutter). A Gauss-Newton product is then about two backward passes, a Fisher
product the same, a Hessian-vector product about two. The price is memory: every batch's graphs are held until the
``Linearization`` is dropped (``batch_size`` and the number of examples bound it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Params = dict[str, torch.Tensor]
LoglikFn = Callable[[Params, Any], torch.Tensor]

EAGER_HINT = ("the curvature products differentiate the model's backward pass, which torch's SDPA attention kernels "
              "do not support; for Hugging Face models load with attn_implementation='eager'")


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


def _identity_head(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    return outputs


def _per_example(loglik: torch.Tensor, what: str) -> torch.Tensor:
    if loglik.dim() != 1:
        raise ValueError(f"{what} must return per-example log-likelihoods of shape [N]; got {tuple(loglik.shape)}")
    return loglik


def _grad(outputs: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
          grad_outputs: torch.Tensor | Sequence[torch.Tensor] | None = None, create_graph: bool = False
          ) -> list[torch.Tensor]:
    """``torch.autograd.grad`` keeping the graph, with zeros for inputs the outputs do not use."""
    try:
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True)
    except (NotImplementedError, RuntimeError) as error:
        if "not implemented" not in str(error).lower():
            raise
        raise NotImplementedError(f"{error}\n{EAGER_HINT}") from error
    return list(grads)


class _BatchGraphs:
    """One batch's graphs at theta. The forward runs here, once; the pieces each product needs are built on first use.

    ``outputs`` z (any shape, examples first) hangs off ``leaves`` (theta); ``loglik`` [N] is the head applied to a
    detached copy ``at`` of z, so that the head's derivatives in z are taken apart from the model's.
    """

    def __init__(self, loglik_fn: OutputLoglik, names: list[str], params: Params, batch: Any) -> None:
        self.head, self.batch = loglik_fn.head, batch
        self.leaves = [params[name].detach().requires_grad_() for name in names]
        try:
            self.outputs = loglik_fn.outputs(dict(zip(names, self.leaves, strict=True)), batch)
        except NotImplementedError as error:
            raise NotImplementedError(f"{error}\n{EAGER_HINT}") from error
        self.at = self.outputs.detach().requires_grad_()
        self.loglik = _per_example(self.head(self.at, batch), "loglik_fn" if self.head is _identity_head else "head")
        self._pulled: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._head_pulled: tuple[torch.Tensor, torch.Tensor] | None = None
        self._head_gradient: torch.Tensor | None = None
        self._gradient: list[torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return self.loglik.shape[0]

    def transpose(self, cotangent: torch.Tensor) -> list[torch.Tensor]:
        """``D^T u`` (one backward): u like the outputs -> one tensor per leaf."""
        return _grad(self.outputs, self.leaves, cotangent)

    def jacobian(self, tangent: list[torch.Tensor]) -> torch.Tensor:
        """``D v``: v per leaf -> like the outputs. D^T u is linear in u: its gradient in u along v is D v."""
        if self._pulled is None:
            dual = torch.zeros_like(self.outputs, requires_grad=True)
            self._pulled = dual, _grad(self.outputs, self.leaves, dual, create_graph=True)
        dual, pulled = self._pulled
        used = [(piece, vector) for piece, vector in zip(pulled, tangent, strict=True) if piece.requires_grad]
        if not used:
            return torch.zeros_like(self.outputs)
        return _grad([piece for piece, _ in used], [dual], [vector for _, vector in used])[0]

    def head_transpose(self, weights: torch.Tensor) -> torch.Tensor:
        """``(d loglik / d z)^T w``: w [N] -> like the outputs."""
        return _grad(self.loglik, [self.at], weights)[0]

    def head_jacobian(self, tangent: torch.Tensor) -> torch.Tensor:
        """``(d loglik / d z) t``: t like the outputs -> [N] (the head's own double-backward)."""
        if self._head_pulled is None:
            dual = torch.zeros_like(self.loglik, requires_grad=True)
            self._head_pulled = dual, _grad(self.loglik, [self.at], dual, create_graph=True)[0]
        dual, pulled = self._head_pulled
        return _grad(pulled, [dual], tangent)[0] if pulled.requires_grad else torch.zeros_like(dual)

    def head_hessian(self, tangent: torch.Tensor) -> torch.Tensor:
        """``Hessian_z(sum_i log p_i) t``: like the outputs -> like the outputs."""
        if self._head_gradient is None:
            self._head_gradient = _grad(self.loglik.sum(), [self.at], create_graph=True)[0]
        if not self._head_gradient.requires_grad:  # a head linear in z
            return torch.zeros_like(tangent)
        return _grad(self._head_gradient, [self.at], tangent)[0]

    def hessian(self, tangent: list[torch.Tensor]) -> list[torch.Tensor]:
        """``Hessian(sum_i log p_i) v`` through the graph of the gradient (built once, with the head applied to z)."""
        if self._gradient is None:
            total = _per_example(self.head(self.outputs, self.batch), "loglik_fn").sum()
            self._gradient = _grad(total, self.leaves, create_graph=True)
        used = [(piece, vector) for piece, vector in zip(self._gradient, tangent, strict=True) if piece.requires_grad]
        if not used:
            return [torch.zeros_like(leaf) for leaf in self.leaves]
        return _grad([piece for piece, _ in used], self.leaves, [vector for _, vector in used])


class Linearization:
    """The data set's log-likelihood at theta, with its graphs kept for fast products with V, J and G.

    Args:
        loglik_fn: ``(params, batch) -> [N]`` per-example log-likelihoods, a pure function of ``params``; an
            ``OutputLoglik`` for ``gauss_newton`` (any callable for ``hessian`` and ``fisher``).
        params: theta, name -> tensor (P numbers in all). Detached here.
        batches: the data set (iterated once, here). Examples are weighted equally, so batches of different sizes
            are weighted by their size.

    Building it runs one forward pass per batch (torch.enable_grad inside); each product is backward passes only.
    """

    def __init__(self, loglik_fn: LoglikFn, params: Params, batches: Iterable) -> None:
        self.loglik_fn = loglik_fn
        self.names = list(params)
        split = loglik_fn if isinstance(loglik_fn, OutputLoglik) else OutputLoglik(loglik_fn, _identity_head)
        with torch.enable_grad():
            self.graphs = [_BatchGraphs(split, self.names, params, batch) for batch in batches]
        self.count = sum(graph.size for graph in self.graphs)
        if self.count == 0:
            raise ValueError("batches is empty: the data set must contain at least one example")

    def _mean(self, product: Callable[[_BatchGraphs, list[torch.Tensor]], list[torch.Tensor]], vector: Params,
              sign: float = 1.0) -> Params:
        tangent = [vector[name] for name in self.names]
        total = [torch.zeros_like(value) for value in tangent]
        with torch.enable_grad():
            for graph in self.graphs:
                for accumulated, piece in zip(total, product(graph, tangent), strict=True):
                    accumulated += piece.detach()
        return {name: (sign / self.count) * value for name, value in zip(self.names, total, strict=True)}

    def fisher(self, vector: Params) -> Params:
        """Empirical Fisher times a vector, ``J v = mean_i g_i (g_i . v)``: S v = (d loglik / d z) D v [N], then
        S^T (S v) = D^T (d loglik / d z)^T (S v). No per-example gradients."""

        def batch_product(graph: _BatchGraphs, tangent: list[torch.Tensor]) -> list[torch.Tensor]:
            scores_dot_v = graph.head_jacobian(graph.jacobian(tangent))  # [N]
            return graph.transpose(graph.head_transpose(scores_dot_v))

        return self._mean(batch_product, vector)

    def hessian(self, vector: Params) -> Params:
        """Observed information times a vector, ``V v = Hessian(mean_i -log p_i) v``."""
        return self._mean(_BatchGraphs.hessian, vector, sign=-1.0)

    def gauss_newton(self, vector: Params) -> Params:
        """Generalised Gauss-Newton matrix times a vector, ``G v = mean_i D_i^T (-Hessian_z log p_i) D_i v``: D v,
        the head's Hessian in z (cheap: the head alone), then D^T."""
        if not isinstance(self.loglik_fn, OutputLoglik):
            raise TypeError("the Gauss-Newton product needs loglik_fn as OutputLoglik(outputs, head): the outputs it "
                            f"linearises (e.g. logits) and the log-likelihood of them; got "
                            f"{type(self.loglik_fn).__name__}")

        def batch_product(graph: _BatchGraphs, tangent: list[torch.Tensor]) -> list[torch.Tensor]:
            return graph.transpose(graph.head_hessian(graph.jacobian(tangent)))

        return self._mean(batch_product, vector, sign=-1.0)


def fisher_vector_product(loglik_fn: LoglikFn, params: Params, batches: Iterable, vector: Params) -> Params:
    """Empirical Fisher times a vector, ``J v = mean_i g_i (g_i . v)``, with no per-example gradients.

    Args:
        loglik_fn: ``(params, batch) -> [N]`` per-example log-likelihoods, a pure function of ``params``.
        params: theta, name -> tensor (P numbers in all).
        batches: the data set. Examples are weighted equally, so batches of different sizes are weighted by their
            size.
        vector: v, the same names and shapes as ``params``.

    Returns:
        ``J v``, the same names and shapes as ``params``. One product; for many at the same theta build a
        ``Linearization`` once and call its ``fisher``.
    """
    return Linearization(loglik_fn, params, batches).fisher(vector)


def hessian_vector_product(loglik_fn: LoglikFn, params: Params, batches: Iterable, vector: Params) -> Params:
    """Observed information times a vector, ``V v = Hessian(mean_i -log p_i) v``.

    Args and returns as in ``fisher_vector_product`` (``Linearization.hessian`` for many products).
    """
    return Linearization(loglik_fn, params, batches).hessian(vector)


def gauss_newton_vector_product(loglik_fn: OutputLoglik, params: Params, batches: Iterable, vector: Params) -> Params:
    """Generalised Gauss-Newton matrix times a vector, ``G v = mean_i D_i^T (-Hessian_z log p_i) D_i v``.

    ``D_i`` is the Jacobian of example i's outputs ``z`` (``loglik_fn.outputs``) in ``params``. G is V without its
    residual term: positive semi-definite at every theta when the head is concave in ``z``; for a softmax likelihood
    the Hessian in the logits is ``-(diag p - p p^T)`` per target token, so G is the Fisher information of the
    model's own predictive.

    Args and returns as in ``fisher_vector_product`` (``Linearization.gauss_newton`` for many products);
    ``loglik_fn`` must be an ``OutputLoglik``.
    """
    if not isinstance(loglik_fn, OutputLoglik):
        raise TypeError("the Gauss-Newton product needs loglik_fn as OutputLoglik(outputs, head): the outputs it "
                        f"linearises (e.g. logits) and the log-likelihood of them; got {type(loglik_fn).__name__}")
    return Linearization(loglik_fn, params, batches).gauss_newton(vector)
