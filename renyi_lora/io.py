"""Saving, loading and PEFT export of a ``LoraEnsemble``.

An ensemble directory holds ``ensemble_config.json`` (the ``EnsembleConfig``, the adapted module names and
the base model's name) and ``adapters.safetensors`` (stacked tensors ``<module>.lora_A [K, R, Din]`` and
``<module>.lora_B [K, Dout, R]``). Each member also exports as a standard PEFT LoRA adapter folder.
Files are written to a temporary name, flushed to disk and renamed, so a crash mid-save never leaves a
half-written file: the folder holds the previous save or the new one. Loading checks that the tensors are
exactly those the config and the base model call for (names, K, rank, shapes) and says what differs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from renyi_lora import __version__
from renyi_lora.config import EnsembleConfig, layer_dims

CONFIG_NAME = "ensemble_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT_VERSION = 1
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer's, written last in a checkpoint; not imported
# from there: that module is heavy, and io is on the inference path too
logger = logging.getLogger(__name__)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # the bytes reach the disk before the rename makes them the file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n"))


def _base_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def save_ensemble(ensemble: nn.Module, directory: str | os.PathLike,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``ensemble_config.json`` and ``adapters.safetensors`` into ``directory``.

    ``state_dict``: the ensemble's full state dict gathered by FSDP or DeepSpeed, whose layers then hold only
    shards; the adapters are taken from it (keys ``model.<module>.lora_A``) instead of from the layers.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in ensemble.lora_layers().items():
        for kind in ("lora_A", "lora_B"):
            tensor = getattr(layer, kind) if state_dict is None else state_dict[f"model.{name}.{kind}"]
            tensors[f"{name}.{kind}"] = tensor.detach().contiguous().cpu()
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_json(out / CONFIG_NAME, {
        "ensemble": asdict(ensemble.ensemble_config),
        "module_names": ensemble.module_names,
        "mixture_weights": ensemble.mixture_weights.tolist(),
        "base_model_name_or_path": _base_name(ensemble.model),
        "format_version": FORMAT_VERSION,
        "renyi_lora_version": __version__,
    })


def read_ensemble_config(directory: str | os.PathLike) -> tuple[EnsembleConfig, list[str], dict]:
    """``(config, module_names, raw json)`` of a saved ensemble; clear error if the folder is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved ensemble: {CONFIG_NAME} not found")
    try:
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(EnsembleConfig)}
        values = {k: v for k, v in raw["ensemble"].items() if k in known}
        if "seed" in raw["ensemble"] and "init_seed" not in values:  # saved before `seed` was renamed `init_seed`
            values["init_seed"] = raw["ensemble"]["seed"]
        config = EnsembleConfig(**values)
        module_names = list(raw["module_names"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid ensemble config ({type(error).__name__}: {error}); "
                         "expected the file written by save_pretrained") from None
    return config, module_names, raw


def read_mixture_weights(directory: str | os.PathLike) -> torch.Tensor:
    """The saved mixture weights pi ``[K]`` (normalised; uniform for folders saved before pi was learned)."""
    config, _, raw = read_ensemble_config(directory)
    K = config.num_members
    weights = raw.get("mixture_weights")
    if weights is None:
        return torch.full((K,), 1.0 / K)
    try:
        weights = torch.tensor(weights, dtype=torch.float32)
    except (TypeError, ValueError):
        weights = None
    if weights is None or weights.shape != (K,) or not torch.isfinite(weights).all() or (weights < 0).any() \
            or weights.sum() <= 0:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: mixture_weights must be {K} non-negative numbers with a "
                         f"positive sum (one per member); got {raw.get('mixture_weights')!r}")
    return weights / weights.sum()


def _read_adapter_tensors(directory: str | os.PathLike, config: EnsembleConfig, module_names: list[str],
                          modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The saved ``<module>.lora_A [K, R, Din]`` / ``lora_B [K, Dout, R]`` tensors, checked against ``config``
    and the base ``modules``; raises ``ValueError`` saying what differs."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved ensemble: {WEIGHTS_NAME} not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}); was its save interrupted?") from None
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise ValueError(f"{directory}: the base model has no module(s) {missing[:5]} that this ensemble adapts; "
                         f"was it trained on another base model?")
    expected = {f"{name}.{kind}" for name in module_names for kind in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        absent, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{path}: tensors do not match {CONFIG_NAME}'s modules: missing {absent[:5]}, unexpected "
                         f"{extra[:5]}; the two files belong to different saves")
    for name in module_names:
        din, dout = layer_dims(modules[name])
        shapes = {"lora_A": (config.num_members, config.rank, din), "lora_B": (config.num_members, dout, config.rank)}
        for kind, shape in shapes.items():
            got = tuple(tensors[f"{name}.{kind}"].shape)
            if got != shape:
                raise ValueError(f"{directory}: {name}.{kind} has shape {list(got)} but the base model and "
                                 f"config (K={config.num_members}, rank={config.rank}) need {list(shape)}")
    return tensors


def copy_adapters(ensemble: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``<module>.lora_A`` / ``lora_B`` tensors into the ensemble's layers, in place."""
    with torch.no_grad():
        for name, layer in ensemble.lora_layers().items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])


def load_adapter_weights(ensemble: nn.Module, directory: str | os.PathLike) -> None:
    """Copy a saved ensemble's adapters into ``ensemble`` in place (resuming a run): the saved K, rank and
    adapted modules must be this ensemble's."""
    config, module_names, _ = read_ensemble_config(directory)
    ours = ensemble.ensemble_config
    if (config.num_members, config.rank, module_names) != (ours.num_members, ours.rank, ensemble.module_names):
        raise ValueError(f"{directory} holds K={config.num_members}, rank={config.rank} on {len(module_names)} "
                         f"modules but this run has K={ours.num_members}, rank={ours.rank} on "
                         f"{len(ensemble.module_names)}; resume with the run's --num_members, --rank, --target_modules")
    base_layers = {name: layer.base_layer for name, layer in ensemble.lora_layers().items()}
    copy_adapters(ensemble, _read_adapter_tensors(directory, config, module_names, base_layers))
    ensemble.mixture_weights.copy_(read_mixture_weights(directory))


def read_ensemble(directory: str | os.PathLike, model: nn.Module, members: list[int] | None = None
                  ) -> tuple[EnsembleConfig, list[str], dict[str, torch.Tensor], torch.Tensor]:
    """``(config, module_names, tensors, mixture weights [K])`` of a saved ensemble for ``model`` (optionally only
    the listed ``members``, their weights renormalised), validated against the base model's modules
    (``LoraEnsemble.from_pretrained`` builds on it)."""
    config, module_names, _ = read_ensemble_config(directory)
    tensors = _read_adapter_tensors(directory, config, module_names, dict(model.named_modules()))
    weights = read_mixture_weights(directory)
    if members is not None:
        bad = [m for m in members if not 0 <= m < config.num_members]
        if bad or not members:
            raise ValueError(f"members {members} must be a non-empty list of indices in [0, {config.num_members})")
        index = torch.tensor(members)
        tensors = {k: v.index_select(0, index) for k, v in tensors.items()}
        config = EnsembleConfig(**{**asdict(config), "num_members": len(members)})
        weights = weights[index]
        if weights.sum() <= 0:
            raise ValueError(f"members {members} of {directory} all have mixture weight 0")
        weights = weights / weights.sum()
    return config, module_names, tensors, weights


def export_peft(ensemble: nn.Module, directory: str | os.PathLike, member: int) -> Path:
    """Write member ``member`` as a standard PEFT LoRA adapter (``adapter_config.json`` + safetensors).

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then gives that member's logits.
    """
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


def export_all_peft(ensemble: nn.Module, directory: str | os.PathLike) -> list[Path]:
    """Export every member to ``directory/member_<k>``."""
    return [export_peft(ensemble, Path(directory) / f"member_{k}", k) for k in range(ensemble.num_members)]


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why ``directory`` cannot be resumed from, or None if it can.

    The Trainer writes a checkpoint's ``trainer_state.json`` last (after the adapters, optimizer, scheduler and
    RNG states), so a save that was killed midway lacks it or left it truncated.
    """
    directory = Path(directory)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, TRAINER_STATE_NAME) if not (directory / name).is_file()]
    if missing:
        return f"incomplete checkpoint (no {', '.join(missing)}; was its save interrupted?)"
    try:
        json.loads((directory / TRAINER_STATE_NAME).read_text())
    except ValueError:
        return f"incomplete checkpoint ({TRAINER_STATE_NAME} is truncated; was its save interrupted?)"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The highest-numbered ``checkpoint-N`` folder in ``output_dir`` whose save finished (None if there is none)."""
    folders = [path for path in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", path.name)]
    for folder in sorted(folders, key=lambda path: int(path.name.split("-")[1]), reverse=True):
        if not folder.is_dir():
            continue
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        logger.warning("skipping %s: %s", folder, problem)
    return None



PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def _peft_members(directory: Path) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One member from a PEFT LoRA adapter folder: ``{module: (A [R, Din], scaling * B [Dout, R])}``."""
    try:
        config = json.loads((directory / PEFT_CONFIG_NAME).read_text())
    except ValueError as error:
        raise ValueError(f"{directory / PEFT_CONFIG_NAME}: not valid JSON ({error})") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
        raise ValueError(f"{directory}: only plain LoRA adapters can join a mixture (peft_type LORA, no DoRA, no "
                         f"modules_to_save); got peft_type={config.get('peft_type')!r}, use_dora="
                         f"{config.get('use_dora')!r}, modules_to_save={config.get('modules_to_save')!r}")
    if not (directory / PEFT_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory}: {PEFT_WEIGHTS_NAME} not found (only safetensors adapters are read)")
    tensors = load_file(str(directory / PEFT_WEIGHTS_NAME))
    rank, lora_alpha = config["r"], config["lora_alpha"]
    scaling = lora_alpha / (rank**0.5 if config.get("use_rslora") else rank)
    member = {}
    for key, tensor in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in tensors:
            raise ValueError(f"{directory / PEFT_WEIGHTS_NAME}: {key} has no matching lora_B")
        member[name] = (tensor.float(), scaling * tensors[b_key].float())
    if not member:
        raise ValueError(f"{directory / PEFT_WEIGHTS_NAME}: no LoRA tensors (keys like '*.lora_A.weight')")
    return [member]


def _ensemble_members(directory: Path, model: nn.Module) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Every member of a saved ensemble folder, in the form of ``_peft_members``."""
    config, module_names, _ = read_ensemble_config(directory)
    tensors = _read_adapter_tensors(directory, config, module_names, dict(model.named_modules()))
    return [{name: (tensors[f"{name}.lora_A"][k], config.scaling * tensors[f"{name}.lora_B"][k])
             for name in module_names} for k in range(config.num_members)]


def read_mixture_members(model: nn.Module, directories: list[str | os.PathLike], members: list[int] | None = None
                         ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The members of several adapter folders, ``[{module: (A [R, Din], scaling * B [Dout, R])}, ...]``: saved
    ensembles (every member) and PEFT LoRA adapters (one member each), in the order given; ``members`` then picks
    among them. Checked against the base model's modules (``ensemble.load_adapter_mixture`` builds on it)."""
    found: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for directory in map(Path, directories):
        if (directory / CONFIG_NAME).is_file():
            found += _ensemble_members(directory, model)
        elif (directory / PEFT_CONFIG_NAME).is_file():
            found += _peft_members(directory)
        else:
            raise FileNotFoundError(f"{directory}: neither a saved ensemble ({CONFIG_NAME}) nor a PEFT adapter "
                                    f"({PEFT_CONFIG_NAME})")
    if members is not None:
        if not members or any(not 0 <= m < len(found) for m in members):
            raise ValueError(f"members {members} must be a non-empty list of indices in [0, {len(found)})")
        found = [found[m] for m in members]
    modules = dict(model.named_modules())
    names = sorted({name for member in found for name in member})
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"the base model has no module(s) {missing[:5]} that these adapters adapt; were they "
                         "trained on another base model?")
    return found
