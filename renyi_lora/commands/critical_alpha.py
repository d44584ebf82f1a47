"""``renyi-lora critical-alpha``: flags, the estimate of alpha* at one trained adapter, the record and the printout."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from renyi_lora.commands.common import ModelArguments
from renyi_lora.config import EnsembleConfig
from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.models import check_model_exists, load_tokenizer
from renyi_lora.stability.critical import WELL_SPECIFIED, CriticalAlphaResult, estimate_critical_alpha
from renyi_lora.stability.lanczos import STABLE_STEPS, StabilityResult


@dataclass
class CriticalAlphaArguments(ModelArguments):
    """Flags of ``renyi-lora critical-alpha``."""

    data: str = field(default=None, metadata={"help": "SFT data file (.jsonl, .json or .parquet) in TRL's formats."})
    adapters: str | None = field(default=None, metadata={"help": "Saved ensemble folder holding the point estimate: a "
                                 "single adapter trained to convergence (K = 1) or an ensemble whose --member is used. "
                                 "Without it the base model is the point (a warning: not a fitted minimum)."})
    member: int = field(default=0, metadata={"help": "Which member of --adapters is the point estimate."})
    max_examples: int = field(default=64, metadata={"help": "Use at most this many examples (a seeded random subset): "
                              "every Lanczos step passes over them a few dozen times."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward (every batch's graphs are kept)."})
    max_length: int = field(default=256, metadata={"help": "Maximum tokens per example (completions are cut)."})
    length_normalize: bool = field(default=False, metadata={"help": "Mean instead of sum of token log-likelihoods, as "
                                   "in training with --length_normalize."})
    prior_weight: float = field(default=1e-4, metadata={"help": "The --prior_weight the adapter was trained with (the "
                                "training default): its curvature prior_weight / prior_std^2 is added to V."})
    prior_std: float = field(default=1.0, metadata={"help": "The --prior_std the adapter was trained with."})
    rank: int = field(default=8, metadata={"help": "LoRA rank of the fresh adapter (only without --adapters)."})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Modules the fresh "
                                      "adapter adapts (only without --adapters)."})
    refine: bool = field(default=True, metadata={"help": "First refine the adapter to a minimum of its training "
                         "objective (mean NLL + prior, on the same examples) by full-batch L-BFGS; --refine false (or "
                         "--no_refine) to take it as saved. Not done without --adapters (the point is then the base "
                         "model)."})
    refine_steps: int = field(default=500, metadata={"help": "Most L-BFGS iterations of the refinement."})
    refine_tolerance: float = field(default=1e-5, metadata={"help": "The refinement stops once the gradient norm "
                                    "of the objective is at most this, or earlier where no line search can lower the "
                                    "objective any more (its float32 resolution, which is usually first)."})
    refined_output: str | None = field(default=None, metadata={"help": "Save the refined adapter (a K = 1 ensemble "
                                       "folder) here."})
    curvature: Literal["auto", "exact", "gauss-newton"] = field(default="auto", metadata={"help": "V: 'exact' (Hessian "
        "of the mean NLL; refuses a point that is not a minimum), 'gauss-newton' (positive semi-definite anywhere; "
        "close to exact at a well-specified minimum) or 'auto': exact, falling back to Gauss-Newton with one line "
        "where the (refined) adapter has negative curvature."})
    num_eigenvalues: int = field(default=3, metadata={"help": "How many top eigenvalues of J x = lambda V x to find."})
    max_iter: int = field(default=50, metadata={"help": "Most Lanczos steps."})
    tol: float = field(default=1e-3, metadata={"help": "Relative Ritz-residual tolerance of the eigenvalues."})
    damping: float = field(default=1e-4, metadata={"help": "Relative damping of V (handles LoRA's rescaling "
                           "symmetry); lowers the eigenvalues by about this fraction."})
    cg_max_iter: int = field(default=100, metadata={"help": "Most conjugate-gradient steps per solve of V z = J q."})
    dtype: Literal["float32", "float64"] = field(default="float32", metadata={"help": "Precision of the products "
                                                 "(float64 for small models or a tight tolerance)."})
    seed: int = field(default=0, metadata={"help": "Seeds the example subset and the Lanczos start vector."})
    output: str | None = field(default=None, metadata={"help": "Write the result as JSON to this file."})

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required: a .jsonl, .json or .parquet SFT file")
        if not Path(self.data).is_file():
            raise FileNotFoundError(f"data file not found: {self.data}")
        if self.adapters is not None and not Path(self.adapters).is_dir():
            raise FileNotFoundError(f"--adapters {self.adapters}: no such folder (a saved ensemble)")
        if self.refine_steps < 0 or not self.refine_tolerance > 0:
            raise ValueError(f"need --refine_steps >= 0 and --refine_tolerance > 0; got {self.refine_steps}, "
                             f"{self.refine_tolerance}")
        if self.curvature not in ("auto", "exact", "gauss-newton"):
            raise ValueError(f"--curvature must be 'auto', 'exact' or 'gauss-newton'; got {self.curvature!r}")
        for name in ("max_examples", "batch_size", "num_eigenvalues", "max_iter", "cg_max_iter", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        if self.member < 0:
            raise ValueError(f"--member must be >= 0; got {self.member}")
        if self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2; got {self.max_length}")
        if self.prior_std <= 0 or self.prior_weight < 0:
            raise ValueError(f"need --prior_std > 0 and --prior_weight >= 0; got {self.prior_std}, {self.prior_weight}")


def result_record(result: StabilityResult) -> dict[str, Any]:
    """The JSON-able fields of a ``StabilityResult`` (all but the direction), plus its plain reading."""
    refinement = getattr(result, "refinement", None)
    return {
        "alpha_star": result.alpha_star if math.isfinite(result.alpha_star) else None,
        "eigenvalues": result.eigenvalues,
        "converged": result.converged,
        "iterations": result.iterations,
        "tolerance": result.tolerance,
        "damping": result.damping,
        "shift": result.shift,
        "curvature": result.curvature,
        "lowest_curvature": result.lowest_curvature if math.isfinite(result.lowest_curvature) else None,
        "curvature_products": result.products,
        "stopped": result.stopped,
        "fallback": getattr(result, "fallback", None),
        "num_parameters": sum(value.numel() for value in result.direction.values()),
        "refinement": None if refinement is None else {
            key: value for key, value in vars(refinement).items() if key != "params"},
        "reading": result.summary(),
    }


def stopping(result: StabilityResult) -> str:
    """One line: how many Lanczos steps and products alpha* took, and the criterion that stopped them."""
    criterion = {
        "residuals": f"every Ritz residual below tol x lambda_max (tol {result.tolerance:.2g})",
        "stable": (f"the top eigenvalues changed by less than tol x lambda_max (tol {result.tolerance:.2g}) over the "
                   f"last {STABLE_STEPS} steps"),
        "exhausted": "the Krylov space was exhausted (the eigenvalues are exact)",
        "max_iter": "--max_iter reached before convergence (a rough estimate)",
    }[result.stopped]
    return f"stopped after {result.iterations} Lanczos steps ({result.products} products with V): {criterion}"


def report(result: StabilityResult) -> str:
    """What ``renyi-lora critical-alpha`` prints: the refinement, alpha*, how Lanczos stopped, the top eigenvalues and
    the plain reading."""
    eigenvalues = ", ".join(f"{value:.4g}" for value in result.eigenvalues)
    if result.alpha_star < 1 - WELL_SPECIFIED:
        at_one = "at alpha = 1 (the mixture likelihood) members separate: one adapter cannot fit this data"
    elif result.alpha_star <= 1 + WELL_SPECIFIED:
        at_one = ("alpha* ~ 1: one adapter fits this data (well specified); alpha = 1 is the flat boundary, members "
                  "separate only above it")
    else:
        at_one = "at alpha = 1 (the mixture likelihood) members stay together, locally"
    refinement = getattr(result, "refinement", None)
    lines = [] if refinement is None else [refinement.summary()]
    kind = " (Gauss-Newton curvature)" if result.curvature == "gauss-newton" else ""
    return "\n".join([
        *lines,
        f"alpha* = {result.alpha_star:.4g}{kind}",
        stopping(result),
        f"top eigenvalues of J x = lambda V x: {eigenvalues}",
        result.summary(),
        at_one,
    ])


def run_critical_alpha(args: CriticalAlphaArguments) -> tuple[CriticalAlphaResult, dict[str, Any]]:
    """``renyi-lora critical-alpha``: estimate alpha* and write ``args.output`` (JSON) if set.

    Returns:
        ``(result, record)``: the ``CriticalAlphaResult`` and the JSON-able record that was written.
    """
    check_model_exists(args.model)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    dataset = load_sft_dataset(args.data, tokenizer, args.max_length)
    config = EnsembleConfig(num_members=1, rank=args.rank, target_modules=args.target_modules)
    result = estimate_critical_alpha(
        args.model, tokenizer, dataset, args.adapters, member=args.member, max_examples=args.max_examples,
        batch_size=args.batch_size, max_length=args.max_length, length_normalize=args.length_normalize,
        prior_weight=args.prior_weight, prior_std=args.prior_std, refine=args.refine, refine_steps=args.refine_steps,
        refine_tolerance=args.refine_tolerance, refined_output=args.refined_output, curvature=args.curvature,
        ensemble_config=config, dtype=getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code,
        seed=args.seed, num_eigenvalues=args.num_eigenvalues, max_iter=args.max_iter, tol=args.tol,
        damping=args.damping, cg_max_iter=args.cg_max_iter,
    )
    record = {
        "model": args.model, "data": args.data, "adapters": args.adapters, "member": args.member,
        "num_examples": min(len(dataset), args.max_examples), "length_normalize": args.length_normalize,
        "prior_curvature": args.prior_weight / args.prior_std**2,
        **result_record(result),
    }
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    return result, record
