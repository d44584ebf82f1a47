"""Saving, loading and PEFT export of a ``LoraEnsemble``.

An ensemble directory holds ``ensemble_config.json`` (the ``EnsembleConfig``, the adapted module names and
the base model's name) and ``adapters.safetensors`` (stacked tensors ``<module>.lora_A [K, R, Din]`` and
``<module>.lora_B [K, Dout, R]``). Each member also exports as a standard PEFT LoRA adapter folder.
Files are written to a temporary name and renamed, so a crash mid-save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble, layer_dims

CONFIG_NAME = "ensemble_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n"))


def _base_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def save_ensemble(ensemble: LoraEnsemble, directory: str | os.PathLike) -> None:
    """Write ``ensemble_config.json`` and ``adapters.safetensors`` into ``directory``."""
    from renyi_lora import __version__

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in ensemble.lora_layers().items():
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().contiguous().cpu()
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_json(out / CONFIG_NAME, {
        "ensemble": asdict(ensemble.ensemble_config),
        "module_names": ensemble.module_names,
        "base_model_name_or_path": _base_name(ensemble.model),
        "format_version": FORMAT_VERSION,
        "renyi_lora_version": __version__,
    })


def read_ensemble_config(directory: str | os.PathLike) -> tuple[EnsembleConfig, list[str], dict]:
    """``(config, module_names, raw json)`` of a saved ensemble; clear error if the folder is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved ensemble: {CONFIG_NAME} not found")
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(EnsembleConfig)}
    config = EnsembleConfig(**{k: v for k, v in raw["ensemble"].items() if k in known})
    return config, raw["module_names"], raw


def load_ensemble(model: nn.Module, directory: str | os.PathLike, members: list[int] | None = None) -> LoraEnsemble:
    """Restore a saved ensemble onto ``model`` (optionally only the listed ``members``), validating shapes."""
    config, module_names, _ = read_ensemble_config(directory)
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    existing = dict(model.named_modules())
    missing = [n for n in module_names if n not in existing]
    if missing:
        raise ValueError(f"{directory}: the base model has no module(s) {missing[:5]} that this ensemble adapts; "
                         f"was it trained on another base model?")
    for name in module_names:
        din, dout = layer_dims(existing[name])
        expected = {"lora_A": (config.num_members, config.rank, din), "lora_B": (config.num_members, dout, config.rank)}
        for kind, shape in expected.items():
            got = tuple(tensors[f"{name}.{kind}"].shape)
            if got != shape:
                raise ValueError(f"{directory}: {name}.{kind} has shape {list(got)} but the base model and "
                                 f"config (K={config.num_members}, rank={config.rank}) need {list(shape)}")
    if members is not None:
        bad = [m for m in members if not 0 <= m < config.num_members]
        if bad or not members:
            raise ValueError(f"members {members} must be a non-empty list of indices in [0, {config.num_members})")
        index = torch.tensor(members)
        tensors = {k: v.index_select(0, index) for k, v in tensors.items()}
        config = EnsembleConfig(**{**asdict(config), "num_members": len(members)})
    ensemble = LoraEnsemble(model, config, module_names)
    with torch.no_grad():
        for name, layer in ensemble.lora_layers().items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
    return ensemble


def export_peft(ensemble: LoraEnsemble, directory: str | os.PathLike, member: int) -> Path:
    """Write member ``member`` as a standard PEFT LoRA adapter (``adapter_config.json`` + safetensors).

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then gives that member's logits.
    """
    from renyi_lora.ensemble import Conv1D

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = ensemble.ensemble_config
    tensors, conv1d = {}, False
    for name, layer in ensemble.lora_layers().items():
        conv1d |= isinstance(layer.base_layer, Conv1D)
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[member].detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[member].detach().contiguous().cpu()
    _atomic_write(out / "adapter_model.safetensors",
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_json(out / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_name(ensemble.model),
        "r": config.rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(ensemble.module_names),
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    })
    return out


def export_all_peft(ensemble: LoraEnsemble, directory: str | os.PathLike) -> list[Path]:
    """Export every member to ``directory/member_<k>``."""
    return [export_peft(ensemble, Path(directory) / f"member_{k}", k) for k in range(ensemble.num_members)]
