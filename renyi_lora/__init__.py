"""renyi-lora: ensembles of K LoRA adapters on one frozen LM, trained jointly with an alpha-Renyi objective.

The nouns of the main workflows are importable from the top level::

    from renyi_lora import RenyiConfig, RenyiSFTTrainer

They load on first use (importing ``renyi_lora`` alone does not import torch or transformers).
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports at the bottom name the lazy exports for type checkers)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    # the ensemble and the objective
    "EnsembleConfig": "renyi_lora.config",
    "LoraEnsemble": "renyi_lora.ensemble",
    "load_adapter_mixture": "renyi_lora.ensemble",
    "renyi_loss": "renyi_lora.objective",
    "renyi_per_example": "renyi_lora.objective",
    "responsibilities": "renyi_lora.objective",
    "routed_loss": "renyi_lora.objective",
    "gaussian_prior": "renyi_lora.objective",
    # training
    "RenyiConfig": "renyi_lora.config",
    "RenyiTrainer": "renyi_lora.training.trainer",
    "RenyiSFTTrainer": "renyi_lora.training.trainer",
    "DPOConfig": "renyi_lora.config",
    "RenyiDPOTrainer": "renyi_lora.training.dpo",
    # data
    "load_sft_dataset": "renyi_lora.data.sft",
    "SFTCollator": "renyi_lora.data.sft",
    "load_preference_dataset": "renyi_lora.data.preference",
    "PreferenceCollator": "renyi_lora.data.preference",
    "load_multiple_choice": "renyi_lora.evaluation.multiple_choice",
    "DataError": "renyi_lora.data.records",
    # models
    "load_model_and_tokenizer": "renyi_lora.models",
    # evaluation, uncertainty, generation
    "evaluate_multiple_choice": "renyi_lora.evaluation.multiple_choice",
    "evaluate_sft": "renyi_lora.evaluation.sequences",
    "load_for_inference": "renyi_lora.evaluation.inference",
    "posterior_weights": "renyi_lora.evaluation.routing",
    "decompose_uncertainty": "renyi_lora.uncertainty",
    "token_uncertainty": "renyi_lora.evaluation.token_uncertainty",
    "generate": "renyi_lora.evaluation.generate",
    # critical alpha
    "critical_alpha": "renyi_lora.stability.lanczos",
    "estimate_critical_alpha": "renyi_lora.stability.critical",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from renyi_lora.config import DPOConfig, EnsembleConfig
    from renyi_lora.data.preference import PreferenceCollator, load_preference_dataset
    from renyi_lora.data.records import DataError
    from renyi_lora.data.sft import SFTCollator, load_sft_dataset
    from renyi_lora.ensemble import LoraEnsemble, load_adapter_mixture
    from renyi_lora.evaluation.generate import generate
    from renyi_lora.evaluation.inference import load_for_inference
    from renyi_lora.evaluation.multiple_choice import evaluate_multiple_choice, load_multiple_choice
    from renyi_lora.evaluation.routing import posterior_weights
    from renyi_lora.evaluation.sequences import evaluate_sft
    from renyi_lora.evaluation.token_uncertainty import token_uncertainty
    from renyi_lora.models import load_model_and_tokenizer
    from renyi_lora.objective import gaussian_prior, renyi_loss, renyi_per_example, responsibilities, routed_loss
    from renyi_lora.stability.critical import estimate_critical_alpha
    from renyi_lora.stability.lanczos import critical_alpha
    from renyi_lora.training.dpo import RenyiDPOTrainer
    from renyi_lora.training.trainer import RenyiConfig, RenyiSFTTrainer, RenyiTrainer
    from renyi_lora.uncertainty import decompose_uncertainty
