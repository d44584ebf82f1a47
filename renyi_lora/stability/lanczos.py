"""Local stability of one fitted model: the critical Renyi order alpha* (docs/critical_alpha.md).

At a point estimate theta (one adapter trained to convergence), over the N examples of the data set,

    V = mean_i -Hessian log p_theta(y_i | x_i)                      (observed information)  [P, P]
    J = mean_i g_i g_i^T,   g_i = grad log p_theta(y_i | x_i)      (empirical Fisher)      [P, P]

Splitting theta into members theta + d_k (sum_k pi_k d_k = 0) changes the alpha-Renyi loss by
0.5 sum_k pi_k d_k^T (V - alpha J) d_k to second order, so one model is locally stable while V - alpha J is
positive semi-definite, and members separate above

    alpha* = 1 / lambda_max,    J x = lambda V x    (the top generalised eigenvalue).

Well specified (V = J) gives alpha* = 1; misspecification can make J exceed V in some direction, so alpha* < 1.

Nothing here forms V or J: the products come from ``curvature`` (``loglik_fn(params, batch) -> [N]``, a pure
function of ``params``). ``critical_alpha`` runs Lanczos on V^{-1} J, which is self-adjoint in the V inner product
<x, y>_V = x^T V y, solving V z = J q by conjugate gradients. P is the number of numbers in ``params``; every vector
is either a params-shaped dict or, inside the solver, one flat tensor [P].

V is positive semi-definite only at a minimum. Before the solves, a few Lanczos steps on V itself look for a
direction of negative curvature (Lanczos finds the extreme eigenvalues of V first), so a point that is not a minimum
is refused after a handful of products instead of somewhere inside the conjugate-gradient solves. With
``curvature="gauss-newton"`` the Gauss-Newton matrix G (``curvature.Linearization.gauss_newton``) stands in for V:
positive semi-definite everywhere, and close to V at a minimum where the model's residuals average out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from renyi_lora.stability.curvature import Linearization, LoglikFn, OutputLoglik, Params

NOT_A_MINIMUM = (
    "theta is not a minimum of the NLL; refine or train the single adapter to a minimum first, or use "
    "curvature='gauss-newton' (positive semi-definite anywhere; if V is only singular, e.g. from a parameter "
    "symmetry, use damping > 0)"
)


class NotAMinimumError(ValueError):
    """V (the Hessian of the mean NLL) is not positive definite at theta.

    Attributes:
        curvature: the negative (or zero) curvature found, ``x^T V x / x^T x`` along some direction x.
        products: products with V (passes over the data set) spent before it was found.
        largest: the largest curvature of V found before (nan if none was measured): how small ``curvature`` is.
        hint: what to do about it, printed after the rest (set by callers that know their user's options).
    """

    def __init__(self, message: str, curvature: float = math.nan, products: int = 0, largest: float = math.nan
                 ) -> None:
        super().__init__(message)
        self.message, self.curvature, self.products, self.largest = message, curvature, products, largest
        self.hint = ""

    def __str__(self) -> str:
        details = [f"{self.products} curvature products"] if self.products else []
        details += [f"largest curvature found {self.largest:.3g}"] if math.isfinite(self.largest) else []
        text = f"{self.message} ({'; '.join(details)})" if details else self.message
        return f"{text}\n{self.hint}" if self.hint else text


@dataclass
class StabilityResult:
    """Outcome of ``critical_alpha``.

    Attributes:
        alpha_star: ``1 / lambda_max``; members separate for alpha above it (``inf`` when J v = 0 everywhere).
        eigenvalues: top generalised eigenvalues of ``J x = lambda V x``, descending (fewer if P is smaller).
        iterations: Lanczos steps taken (each one J v, one V v and one conjugate-gradient solve).
        converged: whether alpha* converged: ``stopped`` is not ``"max_iter"``.
        tolerance: the relative Ritz-residual tolerance used.
        damping: the relative damping asked for; ``shift`` is the absolute one added to V.
        shift: added to V's diagonal: ``damping * tr(V) / P`` (one-probe estimate), at least the rounding of the
            products, ``ROUNDING * lambda_max(V)`` (0 when ``damping`` is 0).
        direction: the top eigenvector, params-shaped, V-normalised: the direction in which members separate.
        curvature: ``"exact"`` (V, the Hessian) or ``"gauss-newton"`` (G, positive semi-definite anywhere).
        lowest_curvature: the lowest curvature of V (with the prior, without the shift) that the Lanczos check found
            before the solves (an upper bound on V's smallest eigenvalue; nan when the check was skipped).
        products: products with V (or G), each a pass over the data set: the cost, with ``iterations`` J v.
        stopped: why Lanczos stopped: ``"residuals"`` (every requested Ritz residual below ``tolerance *
            lambda_max``), ``"stable"`` (the requested eigenvalues changed by less than ``tolerance * lambda_max`` over
            the last ``STABLE_STEPS`` steps: alpha* has converged, the lower eigenvalues to that absolute accuracy),
            ``"exhausted"`` (the Krylov space is invariant: exact) or ``"max_iter"`` (not converged).
    """

    alpha_star: float
    eigenvalues: list[float]
    iterations: int
    converged: bool
    tolerance: float
    damping: float
    shift: float
    direction: Params
    curvature: str = "exact"
    lowest_curvature: float = math.nan
    products: int = 0
    stopped: str = "residuals"

    def summary(self) -> str:
        """One line in plain English."""
        line = (f"alpha above ~{self.alpha_star:.3g} lets members separate on this data; below it a single model "
                "is locally stable")
        if math.isinf(self.alpha_star):
            line = "no alpha lets members separate here (J v = 0 in every direction found); a single model is stable"
        return line if self.converged else line + " (not converged: a rough estimate)"

    __str__ = summary


class _Flat:
    """Converts between params-shaped dicts and one flat vector ``[P]``."""

    def __init__(self, params: Params) -> None:
        self.names = list(params)
        self.shapes = [params[name].shape for name in self.names]
        self.sizes = [params[name].numel() for name in self.names]

    def flatten(self, tensors: Params) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in self.names])  # [P]

    def unflatten(self, vector: torch.Tensor) -> Params:
        chunks = vector.split(self.sizes)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes, strict=True)}


# Curvature within ROUNDING * lambda_max(V) of zero is rounding: Hugging Face models compute RMSNorm and the attention
# softmax in float32 even in float64, and conjugate gradients in float32 met curvature of -1.1 float32 eps * lambda_max
# (measured on a tiny Llama whose V spans seven decades); ten times that leaves a margin.
ROUNDING = 10 * torch.finfo(torch.float32).eps
# Lanczos stops once the requested eigenvalues moved by less than tol * lambda_max over this many steps.
STABLE_STEPS = 3


def _lowest_curvature(
    matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, start_product: torch.Tensor,
    max_steps: int, shift: float,
) -> tuple[float, float, int]:
    """Lanczos on A (plain inner product, full re-orthogonalisation) from ``start``, whose product ``A start`` is given.

    Lanczos finds the extreme eigenvalues of A first, so a direction of negative curvature shows up as a negative
    Ritz value within a few steps (each Ritz value is a Rayleigh quotient: it proves the curvature is there).

    Returns:
        ``(lowest, highest, products)``: the extreme Ritz values and the products with A taken after the given one.
        Stops as soon as ``lowest < -(shift + ROUNDING * |highest|)``: A + shift I has negative curvature beyond
        rounding.
    """
    eps, norm = torch.finfo(start.dtype).eps, start.norm()
    basis, product = [start / norm], start_product / norm
    diagonal: list[float] = []
    offdiagonal: list[float] = []
    products = 0
    for step in range(1, max_steps + 1):
        if step > 1:
            product, products = matvec(basis[-1]), products + 1
        diagonal.append((basis[-1] @ product).item())
        tridiagonal = torch.diag(torch.tensor(diagonal, dtype=torch.float64))  # [steps, steps]
        if offdiagonal:
            off = torch.tensor(offdiagonal, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        ritz = torch.linalg.eigvalsh(tridiagonal)
        lowest, highest = ritz[0].item(), ritz[-1].item()
        if lowest < -(shift + ROUNDING * abs(highest)) or step == max_steps:
            break
        residual = product - diagonal[-1] * basis[-1] - (offdiagonal[-1] * basis[-2] if offdiagonal else 0)
        for _ in range(2):
            for q in basis:
                residual -= (q @ residual) * q
        beta = residual.norm().item()
        if beta <= math.sqrt(eps) * abs(highest):
            break  # an invariant subspace: its Ritz values are eigenvalues
        offdiagonal.append(beta)
        basis.append(residual / beta)
    return lowest, highest, products


def _conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, bool]:
    """Solve ``A x = rhs`` for symmetric positive-definite A; raises ``NotAMinimumError`` on non-positive curvature."""
    solution, residual, direction = torch.zeros_like(rhs), rhs.clone(), rhs.clone()
    residual_sq = residual @ residual
    target = tol**2 * residual_sq
    for _ in range(max_iter):
        if residual_sq <= target:
            return solution, True
        product = matvec(direction)
        curvature = direction @ product
        if not curvature > 0:
            rayleigh = (curvature / (direction @ direction)).item()
            raise NotAMinimumError(f"{NOT_A_MINIMUM}: conjugate gradients met curvature {rayleigh:.3g} <= 0", rayleigh)
        step = residual_sq / curvature
        solution += step * direction
        residual -= step * product
        residual_sq, previous_sq = residual @ residual, residual_sq
        direction = residual + (residual_sq / previous_sq) * direction
    return solution, bool(residual_sq <= target)


def critical_alpha(
    loglik_fn: LoglikFn,
    params: Params,
    batches: Iterable,
    *,
    num_eigenvalues: int = 3,
    max_iter: int = 50,
    tol: float = 1e-4,
    damping: float = 1e-4,
    cg_max_iter: int = 100,
    cg_tol: float | None = None,
    curvature: Literal["exact", "gauss-newton"] = "exact",
    prior_curvature: float = 0.0,
    curvature_check_steps: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> StabilityResult:
    """The critical Renyi order ``alpha* = 1 / lambda_max(J x = lambda V x)`` at theta, matrix-free.

    Lanczos with full re-orthogonalisation on V^{-1} J in the V inner product; each step costs one J v, one
    conjugate-gradient solve of ``(V + shift I) z = J q`` and one V v. ``shift = damping * tr(V) / P``, with
    tr(V) / P estimated from one random probe, keeps the solves well posed when V is singular in some directions
    (e.g. LoRA's rescaling symmetry A -> cA, B -> B / c, along which J vanishes too); it can only lower the
    eigenvalues, by a relative amount of order ``damping`` when V is well conditioned. With ``damping > 0`` the shift
    is at least the products' rounding, ``ROUNDING * lambda_max(V)``, below which curvature is noise.

    Before the solves, up to ``curvature_check_steps`` Lanczos steps on V from the same random probe look for
    negative curvature and raise ``NotAMinimumError`` as soon as they find it (typically within 10 products at a
    point an optimiser stopped short of a minimum). The solves check again on every step.

    Args:
        loglik_fn: ``(params, batch) -> [N]`` per-example log-likelihoods, a pure function of ``params``; an
            ``OutputLoglik`` for ``curvature="gauss-newton"``.
        params: theta, name -> tensor (P numbers in all; float32 or float64). Detached here.
        batches: the data set, passed forward once: ``curvature.Linearization`` keeps every batch's graphs (memory)
            and each product is backward passes through them.
        num_eigenvalues: how many of the top eigenvalues must converge.
        max_iter: most Lanczos steps.
        tol: converged when each Ritz residual is below ``tol * lambda_max``, or when these eigenvalues changed by
            less than ``tol * lambda_max`` over the last ``STABLE_STEPS`` (3) steps (``stopped`` says which).
        damping: relative damping of V (>= 0), as above.
        cg_max_iter: most conjugate-gradient steps per solve.
        cg_tol: relative residual of each solve; default ``max(tol / 10, 100 * eps)`` of the dtype.
        curvature: ``"exact"``: V is the Hessian of the mean NLL (``Linearization.hessian``); ``"gauss-newton"``:
            the generalised Gauss-Newton matrix (``Linearization.gauss_newton``), positive semi-definite anywhere,
            close to V at a minimum where the model's residuals average out.
        prior_curvature: curvature ``c`` of a Gaussian prior ``c / 2 ||theta||^2`` in the objective theta minimises
            (``prior_weight / prior_std^2`` of training): ``c I`` is added to V. In a split theta_k = theta + d_k the
            prior contributes exactly ``c sum_k pi_k ||d_k||^2 / 2`` and nothing to the scores, so J is unchanged.
        curvature_check_steps: most Lanczos steps on V before the solves (0 to skip); they also estimate
            lambda_max(V) for the rounding floor of the shift.
        seed: seeds the random start vector.
        progress: show a tqdm bar over Lanczos steps, with lambda_max and its relative change over the last
            ``STABLE_STEPS`` steps against ``tol``.

    Returns:
        ``StabilityResult``; warns when not converged. Raises ``NotAMinimumError`` (a ``ValueError``) when V is
        not positive definite at theta.
    """
    if min(num_eigenvalues, max_iter, cg_max_iter) < 1 or not (damping >= 0 and tol > 0):
        raise ValueError(f"need num_eigenvalues, max_iter, cg_max_iter >= 1, damping >= 0, tol > 0; got "
                         f"{num_eigenvalues}, {max_iter}, {cg_max_iter}, {damping}, {tol}")
    if curvature not in ("exact", "gauss-newton") or prior_curvature < 0 or curvature_check_steps < 0:
        raise ValueError(f"need curvature 'exact' or 'gauss-newton', prior_curvature >= 0, curvature_check_steps >= 0; "
                         f"got {curvature!r}, {prior_curvature}, {curvature_check_steps}")
    if curvature == "gauss-newton" and not isinstance(loglik_fn, OutputLoglik):
        raise TypeError("curvature='gauss-newton' needs loglik_fn as OutputLoglik(outputs, head) (the outputs it "
                        f"linearises, e.g. logits); got {type(loglik_fn).__name__}")
    params = {name: value.detach() for name, value in params.items()}
    flat = _Flat(params)
    reference = next(iter(params.values()))
    eps = torch.finfo(reference.dtype).eps
    cg_tol = max(tol / 10, 100 * eps) if cg_tol is None else cg_tol
    linearization = Linearization(loglik_fn, params, batches)  # one forward per batch; products are backwards
    curvature_product = linearization.gauss_newton if curvature == "gauss-newton" else linearization.hessian
    products = 0

    def fisher(vector: torch.Tensor) -> torch.Tensor:  # [P] -> [P]
        return flat.flatten(linearization.fisher(flat.unflatten(vector)))

    def hessian(vector: torch.Tensor) -> torch.Tensor:  # [P] -> [P]: V v (or G v), with the prior's curvature
        nonlocal products
        products += 1
        product = flat.flatten(curvature_product(flat.unflatten(vector)))
        return product + prior_curvature * vector if prior_curvature else product

    num_params = sum(flat.sizes)
    wanted = min(num_eigenvalues, num_params)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(num_params, generator=generator, dtype=torch.float64).to(reference)  # [P]
    start_product = hessian(start)
    mean_curvature = (start @ start_product) / (start @ start)  # Hutchinson estimate of tr(V) / P
    if not mean_curvature > 0:
        raise NotAMinimumError(f"{NOT_A_MINIMUM}: mean curvature of V along a random direction is "
                               f"{mean_curvature.item():.3g} <= 0", mean_curvature.item(), products)
    shift = damping * mean_curvature.item()
    lowest = highest = math.nan
    if curvature_check_steps > 0:
        lowest, highest, _ = _lowest_curvature(hessian, start, start_product, curvature_check_steps, shift)
        if lowest < -(shift + ROUNDING * abs(highest)):
            raise NotAMinimumError(f"{NOT_A_MINIMUM}: V has curvature {lowest:.3g} along a direction found by Lanczos "
                                   "on V", lowest, products, highest)
        if damping > 0:
            shift = max(shift, ROUNDING * abs(highest))

    def damped_hessian(vector: torch.Tensor) -> torch.Tensor:
        return hessian(vector) + shift * vector

    def solve(rhs: torch.Tensor) -> tuple[torch.Tensor, bool]:  # (V + shift I)^{-1} rhs by conjugate gradients
        try:
            return _conjugate_gradient(damped_hessian, rhs, cg_tol, cg_max_iter)
        except NotAMinimumError as error:
            error.products, error.largest = products, highest
            raise

    start_v = start_product + shift * start
    norm = torch.sqrt(start @ start_v)
    basis, basis_v = [start / norm], [start_v / norm]  # q_j and V q_j, orthonormal in the V inner product
    projected = torch.zeros(max_iter, max_iter, dtype=torch.float64)  # T = Q^T J Q, the Rayleigh-Ritz matrix
    unconverged_solves, stopped, steps, history = 0, "max_iter", 0, []  # history: the top Ritz values of each step
    bar = tqdm(total=max_iter, desc="critical alpha", disable=not progress)
    for steps in range(1, max_iter + 1):
        j = steps - 1
        fisher_q = fisher(basis[j])  # J q_j
        solution, solved = solve(fisher_q)  # V^{-1} J q_j
        unconverged_solves += not solved
        column = torch.stack([q @ fisher_q for q in basis]).double()  # q_i^T J q_j, i <= j
        projected[: j + 1, j] = projected[j, : j + 1] = column
        # Modified Gram-Schmidt in the V inner product <x, y>_V = (V x)^T y, twice for stability.
        residual = solution.clone()
        for _ in range(2):
            for q, q_v in zip(basis, basis_v, strict=True):
                residual -= (q_v @ residual) * q
        residual_v = damped_hessian(residual)
        beta_sq, scale = (residual @ residual_v).item(), max((solution @ fisher_q).item(), 0.0)
        if beta_sq < -math.sqrt(eps) * scale:
            curvature_found = beta_sq / (residual @ residual).item()
            raise NotAMinimumError(f"{NOT_A_MINIMUM}: V has curvature {curvature_found:.3g} < 0 in the Lanczos basis",
                                   curvature_found, products, highest)
        beta = math.sqrt(max(beta_sq, 0.0))
        ritz_values, ritz_vectors = torch.linalg.eigh(projected[:steps, :steps])
        ritz_values, ritz_vectors = ritz_values.flip(0), ritz_vectors.flip(1)  # descending
        residuals = beta * ritz_vectors[-1, :wanted].abs()  # the Lanczos estimate of each Ritz pair's residual
        top = abs(ritz_values[0].item())
        history.append(ritz_values[:wanted])
        change = math.inf  # of the requested eigenvalues over the last STABLE_STEPS steps, relative to lambda_max
        if steps > STABLE_STEPS and len(history[-1 - STABLE_STEPS]) == wanted and top > 0:
            change = (history[-1] - history[-1 - STABLE_STEPS]).abs().max().item() / top
        # Breakdown: the Krylov space is invariant (e.g. P is small or eigenvalues repeat); its Ritz pairs are exact.
        if beta <= math.sqrt(eps * scale) or steps == num_params:
            stopped = "exhausted"
        elif steps >= wanted and bool((residuals <= tol * top).all()):
            stopped = "residuals"
        elif change < tol:
            stopped = "stable"
        bar.update(1)
        bar.set_postfix(lambda_max=f"{ritz_values[0].item():.4g}", change=f"{change:.1e}" if change < math.inf else "-",
                        stop_below=f"{tol:.0e}")
        if stopped != "max_iter" or steps == max_iter:
            break
        basis.append(residual / beta)
        basis_v.append(residual_v / beta)
    bar.close()
    if unconverged_solves:
        warnings.warn(f"{unconverged_solves} of {steps} conjugate-gradient solves stopped at cg_max_iter="
                      f"{cg_max_iter} above cg_tol={cg_tol:.2g}; increase cg_max_iter or damping", stacklevel=2)
    converged = stopped != "max_iter"
    if not converged:
        warnings.warn(f"critical_alpha did not converge in max_iter={max_iter} Lanczos steps (tol={tol:.2g}); "
                      "increase max_iter or tol", stacklevel=2)
    lambda_max = ritz_values[0].item()
    top_vector = ritz_vectors[:, 0].to(reference)  # [steps]
    direction = sum(weight * q for weight, q in zip(top_vector, basis, strict=True))  # [P]
    return StabilityResult(
        alpha_star=1.0 / lambda_max if lambda_max > 0 else math.inf,
        eigenvalues=ritz_values[:wanted].tolist(),
        iterations=steps,
        converged=converged,
        tolerance=tol,
        damping=damping,
        shift=shift,
        direction=flat.unflatten(direction),
        curvature=curvature,
        lowest_curvature=lowest,
        products=products,
        stopped=stopped,
    )
