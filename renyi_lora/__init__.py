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
    "RenyiTrainer": "renyi_lora.train",
    "RenyiSFTTrainer": "renyi_lora.train",
    "DPOConfig": "renyi_lora.config",
    "RenyiDPOTrainer": "renyi_lora.preference",
    # data
    "load_sft_dataset": "renyi_lora.data",
    "SFTCollator": "renyi_lora.data",
    "load_preference_dataset": "renyi_lora.preference_data",
    "PreferenceCollator": "renyi_lora.preference_data",
    "load_multiple_choice": "renyi_lora.evaluate",
    "DataError": "renyi_lora.records",
    # models
    "load_model_and_tokenizer": "renyi_lora.models",
    # evaluation, uncertainty, generation
    "evaluate_multiple_choice": "renyi_lora.evaluate",
    "evaluate_sft": "renyi_lora.sft_eval",
    "load_for_inference": "renyi_lora.inference",
    "posterior_weights": "renyi_lora.routing",
    "decompose_uncertainty": "renyi_lora.uncertainty",
    "token_uncertainty": "renyi_lora.token_uncertainty",
    "generate": "renyi_lora.generate",
    # critical alpha
    "critical_alpha": "renyi_lora.stability",
    "estimate_critical_alpha": "renyi_lora.critical",
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
    from renyi_lora.critical import estimate_critical_alpha
    from renyi_lora.data import SFTCollator, load_sft_dataset
    from renyi_lora.ensemble import LoraEnsemble, load_adapter_mixture
    from renyi_lora.evaluate import evaluate_multiple_choice, load_multiple_choice
    from renyi_lora.generate import generate
    from renyi_lora.inference import load_for_inference
    from renyi_lora.models import load_model_and_tokenizer
    from renyi_lora.objective import gaussian_prior, renyi_loss, renyi_per_example, responsibilities, routed_loss
    from renyi_lora.preference import RenyiDPOTrainer
    from renyi_lora.preference_data import PreferenceCollator, load_preference_dataset
    from renyi_lora.records import DataError
    from renyi_lora.routing import posterior_weights
    from renyi_lora.sft_eval import evaluate_sft
    from renyi_lora.stability import critical_alpha
    from renyi_lora.token_uncertainty import token_uncertainty
    from renyi_lora.train import RenyiConfig, RenyiSFTTrainer, RenyiTrainer
    from renyi_lora.uncertainty import decompose_uncertainty
