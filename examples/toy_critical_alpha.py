"""Critical alpha on a misspecified Gaussian toy: the estimator's prediction against what K = 2 members do.

Data y ~ 0.5 N(-m, 1) + 0.5 N(m, 1); model N(theta, s^2) with s fixed. At the fitted theta = 0 (the sample
mean) V = 1/s^2 and J = E[y^2]/s^4 = (1 + m^2)/s^4, so alpha* = s^2 / (1 + m^2). The script

(a) runs ``renyi_lora.stability.lanczos.critical_alpha`` at theta = 0 and prints its alpha* beside the analytic one for
    several (m, s);
(b) trains two members (theta_1, theta_2, uniform weights) with ``renyi_loss`` by full-batch gradient descent from
    theta = +-eps for a sweep of alpha, and plots the final spread |theta_1 - theta_2| against alpha with the
    predicted alpha* marked, printing the observed transition (first alpha whose spread exceeds a threshold).

The sample is moment-matched (both components exactly balanced, the unit noise standardised to mean 0 and
variance 1), so the empirical V and J equal the analytic ones and the comparison has no sampling noise.

Run from the repository root (about 10 s on one CPU core):

    .venv/bin/python examples/toy_critical_alpha.py

It writes docs/images/toy_critical_alpha.png (``--output`` to change).
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import torch

from renyi_lora.objective import renyi_loss
from renyi_lora.stability.lanczos import StabilityResult, critical_alpha

CONFIGS = [(0.5, 1.0), (1.0, 1.0), (2.0, 1.0), (1.0, 0.5), (2.0, 2.0), (1.0, math.sqrt(2.0))]  # (m, s)
SWEEP_CONFIGS = [(2.0, 1.0, 0.05, 0.65), (1.0, 1.0, 0.1, 1.3)]  # (m, s, alpha range): alpha* = 0.2 and 0.5


def sample_toy(m: float, num_samples: int = 2000, seed: int = 0) -> torch.Tensor:
    """A moment-matched sample of 0.5 N(-m, 1) + 0.5 N(m, 1): exactly mean 0 and second moment 1 + m^2.

    Returns:
        ``[num_samples]`` float64 (``num_samples`` rounded down to a multiple of 4).
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples // 4, generator=generator, dtype=torch.float64)
    noise = torch.cat([noise, -noise])  # antithetic: mean exactly 0
    noise = noise / noise.pow(2).mean().sqrt()  # variance exactly 1
    return torch.cat([noise - m, noise + m])  # cross terms cancel: mean(y^2) = 1 + m^2


def toy_loglik(params: dict[str, torch.Tensor], y: torch.Tensor, scale: float) -> torch.Tensor:
    """log N(y | theta, scale^2) for every theta in ``params["theta"] [K]`` and every y ``[N]``.

    Returns:
        ``[K, N]``, or ``[N]`` when ``theta`` has a single element (the form ``critical_alpha`` takes).
    """
    theta = params["theta"]
    loglik = -0.5 * ((y - theta[:, None]) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)  # [K, N]
    return loglik[0] if theta.numel() == 1 else loglik


def toy_critical_alpha(y: torch.Tensor, scale: float, **kwargs) -> StabilityResult:
    """Run the matrix-free estimator at the fitted point theta = mean(y), over uneven batches of ``y``."""
    params = {"theta": y.mean().reshape(1)}
    batches = list(y.split(y.numel() // 3 + 1))
    return critical_alpha(partial(toy_loglik, scale=scale), params, batches, **kwargs)


def train_members(
    y: torch.Tensor, scale: float, alpha: float, eps: float = 1e-3, steps: int = 400
) -> torch.Tensor:
    """Two members trained with ``renyi_loss`` by full-batch gradient descent from ``mean(y) +- eps``.

    The step size is ``scale^2``: each member's gradient is its responsibility (~1/2) times the single model's,
    whose curvature is ``1 / scale^2``, so this is half a Newton step and stable for every alpha.

    Returns:
        ``[2]`` the final (theta_1, theta_2).
    """
    theta = (y.mean() + torch.tensor([eps, -eps], dtype=y.dtype)).requires_grad_()
    for _ in range(steps):
        loss, _ = renyi_loss(toy_loglik({"theta": theta}, y, scale), alpha)
        (gradient,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= scale**2 * gradient
    return theta.detach()


def spread_sweep(y: torch.Tensor, scale: float, alphas: list[float], **kwargs) -> list[float]:
    """Final ``|theta_1 - theta_2|`` for each alpha."""
    return [(lambda t: (t[0] - t[1]).abs().item())(train_members(y, scale, alpha, **kwargs)) for alpha in alphas]


def observed_transition(alphas: list[float], spreads: list[float], threshold: float) -> float:
    """The first alpha whose spread exceeds ``threshold`` (``nan`` if none does)."""
    return next((alpha for alpha, spread in zip(alphas, spreads, strict=True) if spread > threshold), math.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/images/toy_critical_alpha.png"))
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--threshold", type=float, default=0.1, help="spread that counts as separated")
    parser.add_argument("--steps", type=int, default=400, help="gradient-descent steps per alpha")
    parser.add_argument("--num-alphas", type=int, default=41, help="alpha values per sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("(a) estimator at theta = 0 against alpha* = s^2 / (1 + m^2)")
    for m, s in CONFIGS:
        result = toy_critical_alpha(sample_toy(m, args.num_samples), s)
        analytic = s**2 / (1 + m**2)
        print(f"  m={m:<5.3g} s={s:<5.3g} predicted {result.alpha_star:.6f}  analytic {analytic:.6f}  "
              f"({result.iterations} Lanczos step(s))")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(f"(b) two members, spread after {args.steps} steps from +-1e-3; separated means spread > {args.threshold}")
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for (m, s, low, high), colour in zip(SWEEP_CONFIGS, ["tab:blue", "tab:orange"], strict=True):
        y = sample_toy(m, args.num_samples)
        predicted = toy_critical_alpha(y, s).alpha_star
        alphas = [round(alpha, 6) for alpha in torch.linspace(low, high, args.num_alphas).tolist()]
        spreads = spread_sweep(y, s, alphas, steps=args.steps)
        observed = observed_transition(alphas, spreads, args.threshold)
        below = max((alpha for alpha in alphas if alpha < observed), default=math.nan)
        print(f"  m={m:g} s={s:g}: predicted alpha* {predicted:.4f}  observed transition {observed:.4f} "
              f"(last alpha still together {below:.4f}; ratio {observed / predicted:.3f})")
        axis.plot(alphas, spreads, "o-", color=colour, markersize=3, label=f"m={m:g}, s={s:g}")
        axis.axvline(predicted, color=colour, linestyle="--", label=f"predicted alpha* = {predicted:.3g}")
    axis.axhline(args.threshold, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xlabel("alpha")
    axis.set_ylabel("final spread |theta_1 - theta_2|")
    axis.set_title("Two members on a two-bump mixture: apart above alpha*")
    axis.legend(fontsize=8)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
