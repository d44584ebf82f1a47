"""What a trainer is given, turned into what it trains: a model id, path or ``PreTrainedModel`` into a ``LoraEnsemble``
(shaped by ``RenyiConfig`` or by a ``peft.LoraConfig``), and data (a file, a ``datasets`` object or folder, a hub
id, a list of dicts) into tokenised examples.

Every check that can fail runs before the base model's weights load: the model path, the target modules (matched on
an empty skeleton of the model, so a typo fails in seconds), the data (read and validated whole).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from renyi_lora.config import EnsembleConfig, RenyiConfig
from renyi_lora.data.sft import TokenizedDataset
from renyi_lora.ensemble import LoraEnsemble, find_target_modules
from renyi_lora.io import read_ensemble_config
from renyi_lora.models import check_model_exists, load_model_and_tokenizer, load_tokenizer, resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# peft.LoraConfig field -> EnsembleConfig field
PEFT_FIELDS = {"r": "rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
               "target_modules": "target_modules", "layers_to_transform": "layers_to_transform"}


def ensemble_config(args: RenyiConfig, peft_config: Any = None) -> EnsembleConfig:
    """The ensemble's shape: ``args``' fields, with those a ``peft.LoraConfig`` sets (r, lora_alpha, lora_dropout,
    target_modules, layers_to_transform) taking their place, so a PEFT user's config carries over."""
    config = args.ensemble_config()
    if peft_config is None:
        return config
    unsupported = {name: getattr(peft_config, name, None) for name in ("use_dora", "use_rslora", "modules_to_save")}
    unsupported = {name: value for name, value in unsupported.items() if value}
    if unsupported or getattr(peft_config, "bias", "none") != "none":
        raise ValueError(f"peft_config: only plain LoRA carries over (no DoRA, rsLoRA, modules_to_save or bias); "
                         f"got {unsupported or {'bias': peft_config.bias}}")
    values = {ours: getattr(peft_config, theirs) for theirs, ours in PEFT_FIELDS.items()
              if getattr(peft_config, theirs, None) is not None}
    if isinstance(values.get("target_modules"), (set, frozenset)):
        values["target_modules"] = sorted(values["target_modules"])
    if isinstance(values.get("layers_to_transform"), int):
        values["layers_to_transform"] = [values["layers_to_transform"]]
    return dataclasses.replace(config, **values)


def check_target_modules(model_name: str, config: EnsembleConfig | None, adapters: str | None = None,
                         trust_remote_code: bool = False) -> None:
    """Match the target modules (or the saved ``adapters``' modules) on an empty skeleton of the base model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(resolve_model_path(model_name), trust_remote_code=trust_remote_code)
    with init_empty_weights():  # parameters on the meta device: no memory, no weights read
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    if not adapters:
        find_target_modules(skeleton, config.target_modules, config.layers_to_transform)
        return
    _, module_names, _ = read_ensemble_config(adapters)
    existing = dict(skeleton.named_modules())
    missing = [name for name in module_names if name not in existing]
    if missing:
        raise ValueError(f"adapters {adapters}: the base model {model_name} has no module(s) {missing[:5]} that this "
                         "ensemble adapts; was it trained on another base model?")


def prepare_tokenizer(model: Any, processing_class: PreTrainedTokenizerBase | None,
                      trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``processing_class``, or the tokenizer of ``model`` (a name or path, a ``PreTrainedModel`` or an ensemble)."""
    if processing_class is not None:
        return processing_class
    name = model_name(model)
    if not name:
        raise ValueError("processing_class is required: the model was given as an object without a name to load "
                         "its tokenizer from")
    check_model_exists(name)
    return load_tokenizer(name, trust_remote_code)


def model_name(model: Any) -> str | None:
    """The name or path a model was given by or loaded from (for the model card), or None."""
    if isinstance(model, LoraEnsemble):
        model = model.model
    return model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None) or None


def check_model(model: Any, args: RenyiConfig, peft_config: Any = None, adapters: str | None = None,
                *, trust_remote_code: bool = False) -> None:
    """The checks that do not need the weights (model path, target modules), for a model given by name."""
    if isinstance(model, str):
        check_model_exists(model)
        check_target_modules(model, ensemble_config(args, peft_config), adapters, trust_remote_code)


def prepare_ensemble(model: str | nn.Module | LoraEnsemble, args: RenyiConfig, peft_config: Any = None,
                     adapters: str | None = None, *, trust_remote_code: bool = False,
                     model_init_kwargs: dict | None = None) -> LoraEnsemble:
    """A ``LoraEnsemble`` from a model name or path (loaded with ``model_init_kwargs``: ``torch_dtype``,
    ``quantization``), a ``PreTrainedModel`` or an ensemble (returned as it is); fresh members shaped by ``args`` /
    ``peft_config``, or those saved in ``adapters``."""
    if isinstance(model, LoraEnsemble):
        return model
    if isinstance(model, str):
        kwargs = {"torch_dtype": torch.float32, **(model_init_kwargs or {})}
        model, _ = load_model_and_tokenizer(model, trust_remote_code, **kwargs)
    if adapters:
        return LoraEnsemble.from_pretrained(model, adapters)
    return LoraEnsemble(model, ensemble_config(args, peft_config))


def is_tokenized(*datasets: Any) -> bool:
    """Whether every dataset given is already tokenised examples (a torch ``Dataset``) or None."""
    return all(data is None or isinstance(data, torch.utils.data.Dataset) for data in datasets)


def prepare_dataset(data: Any, tokenizer: PreTrainedTokenizerBase, max_length: int,
                    loader: Callable[..., TokenizedDataset], *, split: str | None = None,
                    config: str | None = None) -> TokenizedDataset | None:
    """Tokenised examples from ``data`` (see ``renyi_lora.data.sources``); a torch ``Dataset`` of tokenised examples
    (e.g. a ``TokenizedDataset``) and None pass through."""
    if is_tokenized(data):
        return data
    return loader(data, tokenizer, max_length, split=split, config=config)
