"""A Hub model card (``README.md``) for a trained ensemble folder, and the upload of that folder to the Hub.

``model_card`` reads only files in the folder (``ensemble_config.json``, ``train_summary.json``,
``adapters.safetensors``' header) and, for the license, the base model's local ``README.md`` front matter; it
makes no network call. ``upload_files`` is the pure selection of what ``push_to_hub`` uploads: the ensemble,
the PEFT member folders, the card and the summary, never ``checkpoint-*`` folders or optimizer states.

Not exercised offline (the tests run with ``HF_HUB_OFFLINE=1``): the real ``create_repo`` + ``upload_folder``
and the Hub's rendering of the metadata; offline, ``push_to_hub`` is tested only to fail with one clear line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from renyi_lora.data.sources import HUB_ID
from renyi_lora.io import CONFIG_NAME, WEIGHTS_NAME, read_ensemble_config

SUMMARY_NAME = "train_summary.json"
CARD_NAME = "README.md"
# Trainer checkpoints (their own adapters, optimizer, scheduler, RNG states), DeepSpeed shards and the temporary
# files of an interrupted atomic save. Patterns as in ``upload_folder``: fnmatch on the relative path, where "*"
# also crosses "/".
IGNORE_PATTERNS = ["checkpoint-*", "*/checkpoint-*", "global_step*", "*/global_step*", "*optimizer*.pt",
                   "*scheduler*.pt", "*rng_state*.pth", "*.tmp-*"]
# Aliases of ``renyi_lora.models.EMBEDDED``: (hub id of the original, its license).
KNOWN_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def _is_hub_id(name: str) -> bool:
    """``org/name`` (or a bare legacy name) that is neither an existing local path nor a data file name."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists() and not name.endswith(_DATA_SUFFIXES)


def base_model_info(base_model: str) -> tuple[str | None, str | None]:
    """``(hub id for the metadata or None, license or None)`` of ``base_model``: an embedded alias, a local folder
    (license from its README.md front matter) or a hub id (license from its README.md if already in the local HF
    cache; no download)."""
    if base_model in KNOWN_BASES:
        return KNOWN_BASES[base_model]
    readme: str | os.PathLike | None = None
    hub_id = base_model if _is_hub_id(base_model) else None
    if Path(base_model).expanduser().is_dir():
        readme = Path(base_model).expanduser() / CARD_NAME
    elif hub_id is not None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, CARD_NAME)
        readme = cached if isinstance(cached, str) else None
    license_ = None
    if readme is not None and Path(readme).is_file():
        try:
            license_ = ModelCard.load(readme).data.to_dict().get("license")
        except Exception:  # noqa: BLE001 - a malformed third-party card must not stop ours; the license is omitted
            license_ = None
    return hub_id, license_ if isinstance(license_, str) else None


def _adapter_dtype(folder: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_NAME), "pt") as handle:
        dtype = str(handle.get_slice(next(iter(handle.keys()))).get_dtype())
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dtype, dtype)


def _table(rows: dict[str, list[float]], k: int, fmt: str) -> str:
    head = "| group | " + " | ".join(f"member {m}" for m in range(k)) + " |"
    lines = [head, "|---" * (k + 1) + "|"]
    lines += [f"| {group} | " + " | ".join(format(v, fmt) for v in row) + " |" for group, row in rows.items()]
    return "\n".join(lines)


def model_card(output_dir: str | os.PathLike, base_model: str, datasets: list[str] | None = None,
               command: str | None = None, *, license: str | None = None, repo_id: str | None = None) -> ModelCard:
    """The card of a trained ensemble folder (``ensemble_config.json`` + ``train_summary.json``).

    ``base_model``: the ``--model`` the run used; ``datasets``: its data (hub ids go into the metadata, local files
    only into the text); ``command``: the command line that produced the folder; ``license``: overrides the one
    read from the base model; ``repo_id``: where the folder will be pushed, for the loading snippets.
    """
    folder = Path(output_dir)
    config, module_names, raw = read_ensemble_config(folder)
    path = folder / SUMMARY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: {SUMMARY_NAME} not found; a model card is written after training")
    summary = json.loads(path.read_text())
    run = summary.get("config", {})
    k, task = config.num_members, "dpo" if "beta" in run else "sft"
    hub_base, base_license = base_model_info(base_model)
    datasets = list(datasets or [])
    # library_name "renyi-lora", not "peft": the Hub's "peft" snippet loads an adapter_config.json at the repo root,
    # which this repo does not have (the members sit in peft/member_k/, the root holds the stacked ensemble), so it
    # would fail. The tags "peft" and "lora" keep it findable and base_model_relation "adapter" lists it among the
    # base model's adapters; the card itself shows both ways to load it.
    data = ModelCardData(
        base_model=hub_base, base_model_relation="adapter" if hub_base else None, library_name="renyi-lora",
        license=license or base_license, pipeline_tag="text-generation",
        datasets=[d for d in datasets if _is_hub_id(d)] or None,
        tags=["renyi-lora", "lora", "peft", "ensemble", task, "uncertainty"],
    )
    steps = run.get("max_steps", -1)
    length = f"{steps} steps" if isinstance(steps, int) and steps > 0 else f"{run.get('num_train_epochs')} epochs"
    precision = "bf16 autocast" if run.get("bf16") else "fp16 autocast" if run.get("fp16") else "float32"
    where = repo_id or folder.name
    shown_base = hub_base or base_model
    objective = (f"alpha-Renyi DPO (beta {run.get('beta')}, reference: {run.get('reference')})" if task == "dpo"
                 else "alpha-Renyi SFT")
    facts = [
        ("members K", k), ("alpha", run.get("alpha")), ("objective", objective),
        ("LoRA rank / lora_alpha / dropout", f"{config.rank} / {config.lora_alpha:g} / {config.lora_dropout:g}"),
        ("target modules", ", ".join(config.target_modules) + f" ({len(module_names)} modules)"),
        ("layers", config.layers_to_transform or "all"), ("routing level", run.get("routing_level")),
        ("training", f"{length}, learning rate {run.get('learning_rate')}, batch size "
                     f"{run.get('per_device_train_batch_size')} x {run.get('gradient_accumulation_steps', 1)} "
                     f"accumulation, seed {run.get('seed')}"),
        ("examples (truncated)", f"{summary.get('num_examples')} ({summary.get('num_truncated', 0)})"),
        ("final train loss", format(summary.get("metrics", {}).get("train_loss", float("nan")), ".4g")),
        ("precision", f"{precision}; adapters stored as {_adapter_dtype(folder)}"),
        ("non-finite steps skipped", summary.get("num_nonfinite_skips", 0)),
    ]
    lines = [f"# {where}: a Rényi LoRA ensemble of {k} members on {shown_base}", "",
             f"{k} LoRA adapters (members) on one frozen `{shown_base}`, trained jointly by renyi-lora "
             f"{raw.get('renyi_lora_version', '')} with the alpha-Renyi objective (alpha = "
             f"{run.get('alpha')}): each example is weighted towards the members that explain it best, so members "
             "may specialise by group, and their disagreement measures uncertainty.", ""]
    if base_model in KNOWN_BASES:
        lines += [f"Base: the embedded alias `{base_model}`, i.e. {hub_base} as shipped in a Q4_1 GGUF and "
                  "dequantised; its weights differ slightly from the original's.", ""]
    elif hub_base is None:
        lines += [f"Base: the local folder `{base_model}` (not a hub id, so not in the metadata).", ""]
    lines += ["| | |", "|---|---|", *[f"| {name} | {value} |" for name, value in facts], ""]
    if datasets:
        lines += ["Training data: " + ", ".join(f"`{d}`" for d in datasets), ""]
    if summary.get("routing"):
        lines += ["## Routing", "", "Mean responsibility of each member on each training group (rows sum to 1):", "",
                  _table(summary["routing"], k, ".3f"), ""]
    if summary.get("member_group_nll"):
        lines += ["Each member's mean negative log-likelihood per group (lower: the member explains it better):", "",
                  _table(summary["member_group_nll"], k, ".3f"), ""]
    fetch = (f'folder = snapshot_download("{repo_id}")' if repo_id
             else f'folder = "{where}"  # this folder; once pushed: snapshot_download("<user>/<repo>")')
    lines += [
        "## Use", "", "The whole ensemble, with renyi-lora:", "", "```python",
        "from huggingface_hub import snapshot_download", "from renyi_lora import LoraEnsemble",
        "from renyi_lora.models import load_model_and_tokenizer", "", fetch,
        f'model, tokenizer = load_model_and_tokenizer("{base_model}")  # the base exactly as trained on',
        "ensemble = LoraEnsemble.from_pretrained(model, folder)",
        'logits = ensemble(tokenizer("Hello", return_tensors="pt").input_ids)  # [K, batch, seq, vocab]',
        "```", "", "One member as a plain PEFT adapter:", "", "```python",
        "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
        f'base = AutoModelForCausalLM.from_pretrained("{shown_base}")',
        'member = PeftModel.from_pretrained(base, f"{folder}/peft/member_0")  # member_0 ... member_' + f"{k - 1}",
        "```", "", "Evaluate (calibration, uncertainty, routing) and generate with the CLI:", "", "```bash",
        *([f"folder=$(hf download {repo_id} --quiet)  # --adapters takes a local folder"] if repo_id else
          [f"folder={where}"]),
        f"renyi-lora eval --model {base_model} --adapters $folder --data mc.jsonl",
        f'renyi-lora generate --model {base_model} --adapters $folder --prompt "..." --mode mixture', "```", ""]
    if command:
        lines += ["## Training command", "", "```bash", command, "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(output_dir: str | os.PathLike, base_model: str, datasets: list[str] | None = None,
                     command: str | None = None, *, license: str | None = None, repo_id: str | None = None) -> Path:
    """Write ``model_card(...)`` to ``<output_dir>/README.md``; returns its path."""
    card = model_card(output_dir, base_model, datasets, command, license=license, repo_id=repo_id)
    path = Path(output_dir) / CARD_NAME
    card.save(path)
    return path


class PushError(RuntimeError):
    """An upload to the Hub failed; the message is one line naming the repo and the cause."""


def upload_files(output_dir: str | os.PathLike) -> list[str]:
    """The relative paths ``push_to_hub`` uploads (sorted), filtered exactly as ``upload_folder`` filters them."""
    folder = Path(output_dir)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed upload raises: OSError (HfHubHTTPError, ConnectionError, OfflineModeIsEnabled, no token),
    ValueError (a bad repo id or card metadata) and the HTTP client's own errors (httpx2 / httpx, by version)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module in ("httpx2", "httpx"):
        if importlib.util.find_spec(module) is not None:
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


def push_to_hub(output_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None,
                *, commit_message: str = "Upload renyi-lora ensemble") -> str:
    """Create ``repo_id`` (if needed) and upload ``upload_files(output_dir)``; returns the commit URL.

    Any failure (offline mode, no network, no or a bad token, the Hub refusing) is raised as one ``PushError``
    line naming the repo and the cause.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.constants import is_offline_mode

    folder = Path(output_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"cannot push {folder} to {repo_id}: {name} not found; not a trained ensemble")
    if is_offline_mode():
        raise PushError(f"cannot push {folder} to the Hub repo {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); "
                           "unset it, or upload later with `hf upload`")
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 ignore_patterns=list(IGNORE_PATTERNS))
    except _hub_errors() as error:
        cause = (str(error).strip().splitlines() or [""])[0]
        raise PushError(f"push of {folder} to the Hub repo {repo_id} failed: {type(error).__name__}: {cause}") \
            from None
    return str(getattr(info, "commit_url", info))
