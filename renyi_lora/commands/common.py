"""What the commands share: the base-model flags and the one loader of a model and its adapters for inference."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from renyi_lora.config import EnsembleConfig
from renyi_lora.ensemble import LoraEnsemble, load_adapter_mixture
from renyi_lora.models import DEFAULT_MODEL, check_model_exists, load_model_and_tokenizer, resolve_device


@dataclass
class ModelArguments:
    """The base model: ``--model`` and ``--trust_remote_code`` of every command."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base causal LM: 'smollm2-135m' (embedded, offline), "
                       "a local Hugging Face folder or a hub id."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder/hub."})


def load_for_inference(model_name: str, adapters: list[str] | None, members: list[int] | None = None,
                       trust_remote_code: bool = False, device: str = "auto"):
    """``(ensemble, tokenizer)``: the base model in float32 on ``device`` with the adapters of ``adapters`` (a fresh
    disabled-anyway member when there are none, for the base model alone)."""
    check_model_exists(model_name)
    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code, torch_dtype=torch.float32)
    model.to(resolve_device(device)).eval()
    if adapters:
        return load_adapter_mixture(model, adapters, members), tokenizer
    return LoraEnsemble(model, EnsembleConfig(num_members=1)), tokenizer
