"""The critical Renyi order alpha* of one LoRA adapter on an SFT data set: glue around ``stability.critical_alpha``.

The point estimate theta is one member: a single trained adapter (saved as a K = 1 ensemble) or member k of a saved
ensemble, loaded as a K = 1 ``LoraEnsemble``. ``params`` are that member's stacked ``lora_A [1, R, Din]`` and
``lora_B [1, Dout, R]`` for every adapted layer, keyed by the ensemble's parameter names, and ``loglik_fn`` is the
per-example completion log-likelihood ``[N]`` computed by ``torch.func.functional_call`` on the ensemble. With no
adapters the point is the base model (a fresh adapter, B = 0); only the B matrices are then parameters, because at
B = 0 the A directions have zero curvature and the A-B cross terms of the Hessian are as large as the gradient, which
makes V indefinite at any point that is not a minimum (and the base model is not one).

The products differentiate the model's backward pass (``curvature.Linearization``: one forward per batch, then
backward passes through the kept graphs), which torch's CPU SDPA attention kernels do not support: models are
switched to ``attn_implementation="eager"``. The output head runs on the positions that predict a target token
alone (``completion_loglik_fn``), and every batch's graphs, those logits ``[M, V]`` included, are held for the whole
estimate, so ``batch_size`` and ``max_examples`` bound the memory.

theta must be a minimum of what the adapter was trained on, mean NLL plus the Gaussian prior (whose curvature is
added to V): by default the adapter is first refined to one by full-batch L-BFGS on the same objective and the same
examples (``refine.refine_point``). ``curvature="auto"`` (the default) then uses the Hessian if the point is a
minimum and falls back to the Gauss-Newton matrix (positive semi-definite anywhere) where a few Hessian-vector
products find negative curvature, logging one line that says so; ``"exact"`` refuses such a point instead,
``"gauss-newton"`` uses G from the start. Hugging Face's Llama computes RMSNorm and the attention softmax in float32
even for a float64 model, so the products carry relative noise of about 1e-7 whatever ``dtype``: keep some damping.
See docs/critical_alpha.md.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from renyi_lora.data.sft import SFTCollator, TokenizedDataset, load_sft_dataset
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.models import check_model_exists, load_tokenizer, resolve_model_path
from renyi_lora.stability.curvature import OutputLoglik, Params
from renyi_lora.stability.lanczos import NotAMinimumError, StabilityResult, critical_alpha
from renyi_lora.stability.refine import RefineResult, refine_point

logger = logging.getLogger(__name__)

WELL_SPECIFIED = 0.01  # |alpha* - 1| below this reads as the well-specified boundary (docs/critical_alpha.md)
NOT_FITTED = ("no adapters given: the point is the base model (a fresh adapter with B = 0), which is not a fitted "
              "minimum of the NLL, so alpha* describes no trained model; train one adapter to convergence "
              "(renyi-lora sft --num_members 1) and pass it as adapters")


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


class _OutputFeatures(nn.Module):
    """``ensemble.output_features`` as a module's forward, for ``functional_call`` (parameters: ``ensemble.<name>``)."""

    def __init__(self, ensemble: LoraEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, nn.Module | None]:
        return self.ensemble.output_features(input_ids, attention_mask)


def completion_loglik_fn(ensemble: LoraEnsemble, length_normalize: bool = False) -> OutputLoglik:
    """``loglik_fn(params, batch) -> [N]``: each example's completion log-likelihood under the K = 1 ``ensemble``
    with ``params`` (names from ``member_params``) swapped in by ``functional_call``.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` ``[N, T]`` (-100 = not a target), as the
    ``SFTCollator`` makes them. The sum over target tokens, or their mean if ``length_normalize``. An
    ``OutputLoglik`` whose outputs are the logits ``[M, V]`` of the M positions that predict a target token, in
    order (example by example): the output head runs on those alone, so every curvature product's passes through the
    vocabulary projection cost M rows, not N * T (on SmolLM2 with short answers to longer prompts, a quarter).
    """
    if ensemble.num_members != 1:
        raise ValueError(f"the point estimate is one adapter (a K = 1 ensemble); got K = {ensemble.num_members}")
    features = _OutputFeatures(ensemble)

    def logits(params: Params, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # [M, V]
        swapped = {f"ensemble.{name}": value for name, value in params.items()}
        hidden, head = functional_call(features, swapped, (batch["input_ids"], batch["attention_mask"]))
        selected = hidden[0, :, :-1][batch["labels"][:, 1:] != IGNORE_INDEX]  # position t - 1 predicts labels[t]
        return selected if head is None else head(selected)  # [M, H] through the head, or already logits [M, V]

    def completion_loglik(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = batch["labels"][:, 1:]  # [N, T-1]
        mask = targets != IGNORE_INDEX
        logits = logits if logits.dtype == torch.float64 else logits.float()  # as likelihoods.token_logliks
        token = logits.log_softmax(-1).gather(-1, targets[mask][:, None]).squeeze(-1)  # [M]
        example = mask.nonzero()[:, 0]  # [M]: the example each target token belongs to
        total = token.new_zeros(targets.shape[0]).index_add(0, example, token)  # [N]
        return total / mask.sum(-1).clamp(min=1) if length_normalize else total

    return OutputLoglik(logits, completion_loglik)


def make_batches(dataset: TokenizedDataset, pad_token_id: int, batch_size: int, max_examples: int | None = None,
                 *, seed: int = 0, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
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
    """A ``StabilityResult`` plus what the refinement did before it (None: the point was taken as given) and, where
    ``curvature="auto"`` fell back to the Gauss-Newton matrix, why (the line it logged; None otherwise)."""

    refinement: RefineResult | None = None
    fallback: str | None = None


def estimate_critical_alpha(
    model: str | nn.Module,
    tokenizer: Any | None,
    data: str | Path | TokenizedDataset,
    adapters: str | Path | None = None,
    *,
    member: int = 0,
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
    curvature: Literal["auto", "exact", "gauss-newton"] = "auto",
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
        batch_size: examples per forward; every batch's graphs are kept for the products.
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
        curvature: ``"exact"`` (the Hessian; refuses a point that is not a minimum), ``"gauss-newton"`` (positive
            semi-definite anywhere) or ``"auto"``: exact, and Gauss-Newton where V has negative curvature at a trained
            adapter (logged in one line and kept in ``fallback``). Without ``adapters`` auto is exact: the base model
            is no fitted point, and G there would describe nothing trained.
        ensemble_config: shape of the fresh adapter when ``adapters`` is None (K must be 1).
        dtype: precision of the refinement and the products (``torch.float64`` for small models or a tight ``tol``).
        trust_remote_code: passed to the loaders when ``model`` is a name.
        seed: seeds the subset and the Lanczos start vector.
        progress: tqdm bars over L-BFGS iterations and Lanczos steps.
        **solver_options: ``num_eigenvalues``, ``max_iter``, ``tol``, ``damping``, ``cg_max_iter``, ``cg_tol``,
            ``curvature_check_steps`` of ``critical_alpha``.

    Returns:
        ``CriticalAlphaResult`` (``alpha_star``, ``eigenvalues``, ``direction`` keyed by the adapter's parameter
        names, ``refinement``, ``fallback``). Raises ``stability.NotAMinimumError`` when V is not positive definite at
        the point and the curvature is exact (asked for, or auto without adapters), with what to do about it.
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
        model.set_attn_implementation("eager")  # the SDPA kernels have no double backward
    dataset = data if isinstance(data, TokenizedDataset) else load_sft_dataset(data, tokenizer, max_length)
    if adapters is None:
        warnings.warn(NOT_FITTED, stacklevel=2)
    ensemble = load_point(model, adapters, member, ensemble_config).to(dtype)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(ensemble.parameters()).device
    batches = make_batches(dataset, pad_token_id, batch_size, max_examples, seed=seed, device=device)
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
    options = dict(prior_curvature=prior_curvature, seed=seed, progress=progress, **solver_options)
    fallback = None
    try:
        result = critical_alpha(loglik_fn, params, batches, curvature="exact" if curvature == "auto" else curvature,
                                **options)
    except NotAMinimumError as error:
        if curvature != "auto" or adapters is None:
            error.hint = _not_a_minimum_hint(adapters, refinement)
            raise
        largest = f" (largest {error.largest:.3g})" if math.isfinite(error.largest) else ""
        fallback = (f"V has curvature {error.curvature:.3g}{largest} at the {'refined ' if refinement else ''}adapter, "
                    "which is not a minimum: using the Gauss-Newton curvature instead (positive semi-definite "
                    "anywhere; --curvature exact refuses)")
    if fallback is not None:  # outside the except block, so the exact products' graphs are freed first
        logger.warning(fallback)
        result = critical_alpha(loglik_fn, params, batches, curvature="gauss-newton", **options)
    return CriticalAlphaResult(**{item.name: getattr(result, item.name) for item in fields(result)},
                               refinement=refinement, fallback=fallback)


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
