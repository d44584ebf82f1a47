"""The critical Renyi order alpha* of one LoRA adapter on an SFT data set: glue around ``stability.critical_alpha``.

The point estimate theta is one member: a single trained adapter (saved as a K = 1 ensemble) or member k of a saved
ensemble, loaded as a K = 1 ``LoraEnsemble``. ``params`` are that member's stacked ``lora_A [1, R, Din]`` and
``lora_B [1, Dout, R]`` for every adapted layer, keyed by the ensemble's parameter names, and ``loglik_fn`` is the
per-example completion log-likelihood ``[N]`` computed by ``torch.func.functional_call`` on the ensemble. With no
adapters the point is the base model (a fresh adapter, B = 0); only the B matrices are then parameters, because at
B = 0 the A directions have zero curvature and the A-B cross terms of the Hessian are as large as the gradient, which
makes V indefinite at any point that is not a minimum (and the base model is not one).

The products go through ``torch.func`` (forward-mode jvp and forward-over-reverse), which torch's CPU SDPA attention
kernels do not support: models are switched to ``attn_implementation="eager"``. They also go through the full logits
``[B, T, V]`` rather than the chunked, checkpointed head of ``likelihoods.token_logliks`` (``torch.func`` does not
support checkpointing's saved-tensor hooks), so ``batch_size`` bounds the memory.

theta must be a minimum of what the adapter was trained on, mean NLL plus the Gaussian prior (whose curvature is
added to V): by default the adapter is first refined to one by full-batch L-BFGS on the same objective and the same
examples (``refine.refine_point``); a point that is still not a minimum is refused after a few Hessian-vector
products. ``curvature="gauss-newton"`` uses the Gauss-Newton matrix instead of the Hessian (positive semi-definite
anywhere). Hugging Face's Llama computes RMSNorm and the attention softmax in float32 even for a float64 model, so
the products carry relative noise of about 1e-7 whatever ``dtype``: keep some damping. See docs/critical_alpha.md.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from renyi_lora.curvature import OutputLoglik, Params
from renyi_lora.data import SFTCollator, TokenizedDataset, load_sft_dataset
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.models import DEFAULT_MODEL, check_model_exists, load_tokenizer, resolve_model_path
from renyi_lora.refine import RefineResult, refine_point
from renyi_lora.stability import NotAMinimumError, StabilityResult, critical_alpha

WELL_SPECIFIED = 0.01  # |alpha* - 1| below this reads as the well-specified boundary (DESIGN.md section 2)
NOT_FITTED = ("no adapters given: the point is the base model (a fresh adapter with B = 0), which is not a fitted "
              "minimum of the NLL, so alpha* describes no trained model; train one adapter to convergence "
              "(renyi-lora sft --num_members 1) and pass it as adapters")


@dataclass
class CriticalAlphaArguments:
    """Flags of ``renyi-lora critical-alpha``."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base causal LM: 'smollm2-135m' (embedded, offline), "
                       "a local Hugging Face folder or a hub id."})
    data: str = field(default=None, metadata={"help": "SFT data file (.jsonl, .json or .parquet) in TRL's formats."})
    adapters: str | None = field(default=None, metadata={"help": "Saved ensemble folder holding the point estimate: a "
                                 "single adapter trained to convergence (K = 1) or an ensemble whose --member is used. "
                                 "Without it the base model is the point (a warning: not a fitted minimum)."})
    member: int = field(default=0, metadata={"help": "Which member of --adapters is the point estimate."})
    max_examples: int = field(default=64, metadata={"help": "Use at most this many examples (a seeded random subset): "
                              "every Lanczos step passes over them a few dozen times."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward (the full logits [B, T, V] are kept)."})
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
    curvature: Literal["exact", "gauss-newton"] = field(default="exact", metadata={"help": "V: 'exact' (Hessian of the "
                                                        "mean NLL) or 'gauss-newton' (positive semi-definite anywhere; "
                                                        "close to exact at a well-specified minimum)."})
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
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder/hub."})

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
        if self.curvature not in ("exact", "gauss-newton"):
            raise ValueError(f"--curvature must be 'exact' or 'gauss-newton'; got {self.curvature!r}")
        for name in ("max_examples", "batch_size", "num_eigenvalues", "max_iter", "cg_max_iter", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        if self.member < 0:
            raise ValueError(f"--member must be >= 0; got {self.member}")
        if self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2; got {self.max_length}")
        if self.prior_std <= 0 or self.prior_weight < 0:
            raise ValueError(f"need --prior_std > 0 and --prior_weight >= 0; got {self.prior_std}, {self.prior_weight}")


def load_point(model: nn.Module, adapters: str | Path | None = None, member: int = 0,
               ensemble_config: EnsembleConfig | None = None) -> LoraEnsemble:
    """The point estimate as a K = 1 ensemble on ``model`` (modified in place): member ``member`` of the saved
    ensemble ``adapters``, or a fresh adapter (B = 0, shape from ``ensemble_config``) if ``adapters`` is None."""
    if adapters is not None:
        ensemble = LoraEnsemble.from_pretrained(model, str(adapters), members=[member])
    else:
        config = ensemble_config or EnsembleConfig(num_members=1)
        if config.num_members != 1:
            raise ValueError(f"the point estimate is one adapter: ensemble_config.num_members must be 1; got "
                             f"{config.num_members}")
        ensemble = LoraEnsemble(model, config)
    return ensemble.eval()


def member_params(ensemble: LoraEnsemble, include_lora_A: bool = True) -> Params:
    """The adapter's tensors, keyed by the ensemble's parameter names: ``...lora_A [1, R, Din]`` (if
    ``include_lora_A``) and ``...lora_B [1, Dout, R]`` for every adapted layer, detached."""
    if ensemble.num_members != 1:
        raise ValueError(f"the point estimate is one adapter (a K = 1 ensemble); got K = {ensemble.num_members}")
    kinds = ("lora_A", "lora_B") if include_lora_A else ("lora_B",)
    return {name: value.detach() for name, value in ensemble.named_parameters() if name.rsplit(".", 1)[-1] in kinds}


def completion_loglik_fn(ensemble: LoraEnsemble, length_normalize: bool = False) -> OutputLoglik:
    """``loglik_fn(params, batch) -> [N]``: each example's completion log-likelihood under the K = 1 ``ensemble``
    with ``params`` (names from ``member_params``) swapped in by ``functional_call``.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` ``[N, T]`` (-100 = not a target), as the
    ``SFTCollator`` makes them. The sum over target tokens, or their mean if ``length_normalize``. An
    ``OutputLoglik``: the logits ``[N, T, V]`` are its outputs, for the Gauss-Newton curvature.
    """
    if ensemble.num_members != 1:
        raise ValueError(f"the point estimate is one adapter (a K = 1 ensemble); got K = {ensemble.num_members}")

    def logits(params: Params, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(ensemble, params, (batch["input_ids"], batch["attention_mask"]))[0]  # [N, T, V]

    def completion_loglik(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"][:, 1:]  # [N, T-1]: position t-1 predicts the token at t
        mask = labels != IGNORE_INDEX
        logp = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # [N, T-1, V]
        token = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask  # [N, T-1]
        total = token.sum(-1)  # [N]
        return total / mask.sum(-1).clamp(min=1) if length_normalize else total

    return OutputLoglik(logits, completion_loglik)


def make_batches(dataset: TokenizedDataset, pad_token_id: int, batch_size: int, max_examples: int | None = None,
                 seed: int = 0, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """At most ``max_examples`` examples (a seeded random subset), sorted by length and padded into batches of
    ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (every example weighs the same in V and J)."""
    examples = list(dataset.examples)
    if max_examples is not None and len(examples) > max_examples:
        examples = random.Random(seed).sample(examples, max_examples)
    examples.sort(key=lambda example: len(example["input_ids"]))
    collate = SFTCollator(pad_token_id)
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        batch.pop("group")
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def _load_eager(name_or_path: str, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    check_model_exists(name_or_path)
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=torch.float32,
                                                attn_implementation="eager", trust_remote_code=trust_remote_code)


@dataclass
class CriticalAlphaResult(StabilityResult):
    """A ``StabilityResult`` plus what the refinement did before it (None: the point was taken as given)."""

    refinement: RefineResult | None = None


def estimate_critical_alpha(
    model: str | nn.Module,
    tokenizer: Any | None,
    data: str | Path | TokenizedDataset,
    adapters: str | Path | None = None,
    member: int = 0,
    *,
    max_examples: int | None = 64,
    batch_size: int = 8,
    max_length: int = 256,
    length_normalize: bool = False,
    prior_weight: float = 1e-4,
    prior_std: float = 1.0,
    refine: bool = True,
    refine_steps: int = 500,
    refine_tolerance: float = 1e-5,
    refined_output: str | Path | None = None,
    curvature: Literal["exact", "gauss-newton"] = "exact",
    ensemble_config: EnsembleConfig | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    seed: int = 0,
    progress: bool = True,
    **solver_options: Any,
) -> CriticalAlphaResult:
    """alpha* (``stability.critical_alpha``) at one LoRA member over (a subset of) an SFT data set, by default after
    refining the member to a minimum of its training objective on those examples (``refine.refine_point``).

    Args:
        model: a model name or folder (loaded with eager attention), or a loaded causal LM, which is modified in
            place: switched to eager attention, wrapped by the adapter and cast to ``dtype``.
        tokenizer: its tokenizer (for the pad token and for tokenising ``data``); None to load it from ``model``'s
            name.
        data: an SFT file or an already tokenised dataset.
        adapters: saved ensemble folder with the point estimate; None for the base model (warns: not a minimum).
        member: which member of ``adapters``.
        max_examples: use a seeded random subset of at most this many examples (None = all).
        batch_size: examples per forward; the full logits ``[B, T, V]`` of a batch are kept for the products.
        max_length: tokens per example when ``data`` is a file.
        length_normalize: mean instead of sum of the completion's token log-likelihoods.
        prior_weight: the training's ``prior_weight`` (default: the training default); with ``prior_std`` it adds
            the prior's curvature ``prior_weight / prior_std^2`` to V, and its term to the refined objective. 0 for a
            plain NLL fit.
        prior_std: the training's ``prior_std``.
        refine: refine the adapter first by full-batch L-BFGS (A and B; only with ``adapters``).
        refine_steps: most L-BFGS iterations.
        refine_tolerance: stop refining once the objective's gradient norm is at most this.
        refined_output: save the refined adapter here (a K = 1 ensemble folder).
        curvature: ``"exact"`` (the Hessian) or ``"gauss-newton"`` (positive semi-definite anywhere).
        ensemble_config: shape of the fresh adapter when ``adapters`` is None (K must be 1).
        dtype: precision of the refinement and the products (``torch.float64`` for small models or a tight ``tol``).
        trust_remote_code: passed to the loaders when ``model`` is a name.
        seed: seeds the subset and the Lanczos start vector.
        progress: tqdm bars over L-BFGS iterations and Lanczos steps.
        **solver_options: ``num_eigenvalues``, ``max_iter``, ``tol``, ``damping``, ``cg_max_iter``, ``cg_tol``,
            ``curvature_check_steps`` of ``critical_alpha``.

    Returns:
        ``CriticalAlphaResult`` (``alpha_star``, ``eigenvalues``, ``direction`` keyed by the adapter's parameter
        names, ``refinement``). Raises ``stability.NotAMinimumError`` when V is not positive definite at the point,
        with what to do about it.
    """
    if isinstance(model, str):
        if tokenizer is None:
            tokenizer = load_tokenizer(model, trust_remote_code)
        if not isinstance(data, TokenizedDataset):
            data = load_sft_dataset(data, tokenizer, max_length)  # validate the data before loading the model
        model = _load_eager(model, trust_remote_code)
    elif tokenizer is None:
        raise ValueError("tokenizer is required when model is a loaded model rather than a name")
    elif hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # torch.func has no forward-mode rule for the SDPA kernels
    dataset = data if isinstance(data, TokenizedDataset) else load_sft_dataset(data, tokenizer, max_length)
    if adapters is None:
        warnings.warn(NOT_FITTED, stacklevel=2)
    ensemble = load_point(model, adapters, member, ensemble_config).to(dtype)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(ensemble.parameters()).device
    batches = make_batches(dataset, pad_token_id, batch_size, max_examples, seed, device)
    params = member_params(ensemble, include_lora_A=adapters is not None)
    prior_curvature = prior_weight / prior_std**2
    loglik_fn = completion_loglik_fn(ensemble, length_normalize)
    refinement = None
    if refine and adapters is not None:
        refinement = refine_point(loglik_fn, params, batches, prior_curvature=prior_curvature, max_steps=refine_steps,
                                  tolerance=refine_tolerance, progress=progress)
        params = refinement.params
        if refined_output is not None:
            with torch.no_grad():
                for name, parameter in ensemble.named_parameters():
                    if name in params:
                        parameter.copy_(params[name])
            ensemble.save_pretrained(str(refined_output))
    try:
        result = critical_alpha(loglik_fn, params, batches, curvature=curvature, prior_curvature=prior_curvature,
                                seed=seed, progress=progress, **solver_options)
    except NotAMinimumError as error:
        error.hint = _not_a_minimum_hint(adapters, refinement)
        raise
    return CriticalAlphaResult(**{item.name: getattr(result, item.name) for item in fields(result)},
                               refinement=refinement)


def _not_a_minimum_hint(adapters: str | Path | None, refinement: RefineResult | None) -> str:
    """What to do when the point (after any refinement) is not a minimum."""
    if adapters is None:
        return NOT_FITTED
    if refinement is None:
        return ("the adapter was taken as saved (--refine false): let critical-alpha refine it to a minimum (the "
                "default), or use --curvature gauss-newton")
    if refinement.stopped == "max_steps":
        return (f"{refinement.summary()}: raise --refine_steps, train the adapter longer, or use --curvature "
                "gauss-newton")
    return (f"{refinement.summary()}: the refined point is still a saddle. Where its negative curvature is tiny next "
            "to the largest, a larger --damping (e.g. 1e-3) treats those nearly flat directions as flat; or use "
            "--curvature gauss-newton")


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
        "num_parameters": sum(value.numel() for value in result.direction.values()),
        "refinement": None if refinement is None else {
            key: value for key, value in vars(refinement).items() if key != "params"},
        "reading": result.summary(),
    }


def report(result: StabilityResult) -> str:
    """What ``renyi-lora critical-alpha`` prints: the refinement, alpha*, the top eigenvalues and the plain reading."""
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
        args.model, tokenizer, dataset, args.adapters, args.member, max_examples=args.max_examples,
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
