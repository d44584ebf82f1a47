"""Refine a point estimate to a minimum of its training objective: full-batch L-BFGS on the adapter's tensors.

alpha* (``stability.critical_alpha``) is a statement about a minimum: V must be positive semi-definite there. An
adapter trained for a fixed number of Adam steps is rarely one: Adam moves the parameters by about the learning rate
per step even where the curvature is tiny, so it jitters around the minimum, and V at the last step can have
curvature of -1e3 and worse. A few dozen full-batch L-BFGS iterations on the same objective settle it.

The objective is what a K = 1 ensemble is trained on (docs/critical_alpha.md),

    mean_i -loglik_fn(params, batch)_i + prior_curvature / 2 * ||params||^2,

with ``prior_curvature = prior_weight / prior_std^2``: the Gaussian prior N(0, prior_std^2 I) of training, centred
at zero. ``loglik_fn`` is the per-example log-likelihood ``[N]`` of ``curvature`` (a pure function of ``params``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from renyi_lora.stability.curvature import LoglikFn, Params


@dataclass
class RefineResult:
    """Outcome of ``refine_point``.

    Attributes:
        params: the refined tensors, detached, same names, shapes and dtype as the input.
        gradient_norm_before, gradient_norm: Euclidean norm of the objective's gradient at the start and the end.
        objective_before, objective: the objective at the start and the end.
        iterations: L-BFGS iterations taken (each one strong-Wolfe line search).
        evaluations: objective-and-gradient evaluations (full passes over the data), the first one included.
        converged: whether ``gradient_norm <= tolerance``.
        tolerance: the gradient-norm tolerance asked for.
        stopped: why it stopped: ``"tolerance"``, ``"max_steps"`` (or twice as many evaluations), or ``"stalled"``
            (a line search could no longer lower the objective, which float32 rounding limits).
    """

    params: Params
    gradient_norm_before: float
    gradient_norm: float
    objective_before: float
    objective: float
    iterations: int
    evaluations: int
    converged: bool
    tolerance: float
    stopped: str

    def summary(self) -> str:
        """One line: what the refinement did."""
        line = (f"refined by full-batch L-BFGS: gradient norm {self.gradient_norm_before:.3g} -> "
                f"{self.gradient_norm:.3g} in {self.iterations} iterations (objective {self.objective_before:.6g} -> "
                f"{self.objective:.6g})")
        if self.stopped == "max_steps":
            line += f"; stopped at the most steps, above the tolerance {self.tolerance:.3g}"
        elif self.stopped == "stalled":
            line += f"; stalled above the tolerance {self.tolerance:.3g} (no line search lowered the objective)"
        return line


class _Reached(Exception):
    """Raised inside the closure to stop L-BFGS at the first point whose gradient norm is below the tolerance."""


def refine_point(
    loglik_fn: LoglikFn,
    params: Params,
    batches: Iterable,
    *,
    prior_curvature: float = 0.0,
    max_steps: int = 500,
    tolerance: float = 1e-5,
    history_size: int = 20,
    progress: bool = False,
) -> RefineResult:
    """Full-batch L-BFGS (strong-Wolfe line search) from ``params`` towards a minimum of the objective above.

    Stops at the first evaluated point whose gradient norm is at most ``tolerance``, after ``max_steps`` iterations,
    or when the line search can no longer change the objective (float precision: ``converged`` is then False).

    Args:
        loglik_fn: ``(params, batch) -> [N]`` per-example log-likelihoods, a pure function of ``params``.
        params: the starting point, name -> tensor (not modified).
        batches: the data set (re-iterable; a one-shot iterator is turned into a list). Examples weigh the same.
        prior_curvature: ``prior_weight / prior_std^2`` of the training prior (0 for a plain NLL fit).
        max_steps: most L-BFGS iterations (each costs one or more full passes over the data).
        tolerance: stop once the Euclidean norm of the objective's gradient is at most this.
        history_size: L-BFGS memory (pairs of steps and gradient changes kept).
        progress: a tqdm bar over iterations, showing the objective and the gradient norm.

    Returns:
        ``RefineResult`` with the refined tensors and the gradient norm before and after.
    """
    if max_steps < 0 or not tolerance > 0 or prior_curvature < 0:
        raise ValueError(f"need max_steps >= 0, tolerance > 0, prior_curvature >= 0; got {max_steps}, {tolerance}, "
                         f"{prior_curvature}")
    if iter(batches) is batches:
        batches = list(batches)
    point = {name: value.detach().clone().requires_grad_() for name, value in params.items()}
    leaves = list(point.values())
    optimizer = torch.optim.LBFGS(leaves, lr=1, max_iter=max(max_steps, 1), max_eval=2 * max_steps,
                                  tolerance_grad=0, tolerance_change=1e-12, history_size=history_size,
                                  line_search_fn="strong_wolfe")
    history: list[tuple[float, float]] = []  # (objective, gradient norm) of every evaluation
    bar = tqdm(total=max_steps, desc="refine (L-BFGS)", disable=not progress)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for batch in batches:  # one graph at a time; the gradient of the sum, divided by N below
            loglik = loglik_fn(point, batch)
            if loglik.dim() != 1:
                raise ValueError(f"loglik_fn must return per-example log-likelihoods [N]; got {tuple(loglik.shape)}")
            (-loglik.sum()).backward()
            total, count = total - loglik.detach().double().sum().cpu(), count + loglik.shape[0]
        if count == 0:
            raise ValueError("batches is empty: the data set must contain at least one example")
        for leaf in leaves:
            if leaf.grad is None:  # a tensor the log-likelihood does not use
                leaf.grad = torch.zeros_like(leaf)
            leaf.grad /= count
            leaf.grad += prior_curvature * leaf.detach()
        objective = total.item() / count + 0.5 * prior_curvature * sum(leaf.pow(2).sum().item() for leaf in leaves)
        norm = math.sqrt(sum(leaf.grad.double().pow(2).sum().item() for leaf in leaves))
        if not (math.isfinite(norm) and math.isfinite(objective)):
            raise FloatingPointError(f"the objective ({objective}) or its gradient norm ({norm}) is not finite at "
                                     f"L-BFGS evaluation {len(history) + 1}; refine from a finite adapter")
        history.append((objective, norm))
        bar.n = optimizer.state[leaves[0]].get("n_iter", 0)
        bar.set_postfix(objective=f"{objective:.6g}", grad_norm=f"{norm:.3g}")
        if norm <= tolerance:
            raise _Reached
        return torch.tensor(objective, dtype=torch.float64)  # the line search compares these: keep the float64 sum

    stopped = "tolerance"
    try:
        if max_steps > 0:
            optimizer.step(closure)
        state = optimizer.state[leaves[0]]
        budget = max_steps == 0 or state["n_iter"] >= max_steps or state["func_evals"] >= 2 * max_steps
        stopped = "max_steps" if budget else "stalled"
        closure()  # L-BFGS ends on its accepted step, not necessarily on its last evaluation: measure it
    except _Reached:
        pass  # the parameters hold the point just evaluated, whose gradient norm met the tolerance
    finally:
        bar.close()
    return RefineResult(
        params={name: value.detach() for name, value in point.items()},
        gradient_norm_before=history[0][1],
        gradient_norm=history[-1][1],
        objective_before=history[0][0],
        objective=history[-1][0],
        iterations=optimizer.state[leaves[0]].get("n_iter", 0) if max_steps > 0 else 0,
        evaluations=len(history),
        converged=history[-1][1] <= tolerance,
        tolerance=tolerance,
        stopped=stopped if history[-1][1] > tolerance else "tolerance",
    )
