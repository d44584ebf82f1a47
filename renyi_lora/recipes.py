"""The ``sft`` recipe: arguments, data, model, ensemble, Trainer, and the outputs written at the end.

``run_sft`` is what ``renyi-lora sft`` calls; every step fails early with a clear message (data are
read and validated, the model path, the target modules and ``--resume_from_checkpoint`` checked, before the
model's weights load). Under ``torchrun`` / ``accelerate launch`` every process runs the recipe; only the
first writes the outputs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from renyi_lora.data import SFTCollator, TokenizedDataset, load_sft_dataset
from renyi_lora.ensemble import LoraEnsemble, find_target_modules
from renyi_lora.io import export_all_peft, read_ensemble_config
from renyi_lora.models import (
    DEFAULT_MODEL,
    check_model_exists,
    check_quantization,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)
from renyi_lora.train import RenyiConfig, RenyiTrainer, checkpoint_problem, last_complete_checkpoint, routing_summary

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base causal LM: 'smollm2-135m' (embedded, offline), "
                       "a local Hugging Face folder or a hub id."})
    adapters: str | None = field(default=None, metadata={"help": "Start from a saved ensemble folder instead of "
                                 "fresh adapters (its K, rank and target modules are used)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder/hub."})
    base_dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "dtype of the "
                                                               "frozen base weights (bfloat16 halves their memory on a "
                                                               "GPU); the LoRA members stay float32."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA-style NF4 frozen base through bitsandbytes "
                               "(CUDA only)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit frozen base through bitsandbytes (CUDA only)."})

    def __post_init__(self) -> None:
        if self.base_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--base_dtype must be float32, bfloat16 or float16; got {self.base_dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("give at most one of --load_in_4bit and --load_in_8bit")
        check_quantization(self.quantization)  # before any data or weights are read

    @property
    def quantization(self) -> str | None:
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def load_model(self):
        """The base model as these arguments ask (dtype, quantisation)."""
        model, _ = load_model_and_tokenizer(self.model, self.trust_remote_code, getattr(torch, self.base_dtype),
                                            quantization=self.quantization)
        return model


@dataclass
class DataArguments:
    data: str = field(default=None, metadata={"help": "Training file (.jsonl, .json or .parquet) in TRL's formats."})
    eval_data: str | None = field(default=None, metadata={"help": "Optional evaluation file, same formats."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per example; longer completions are cut "
                            "from the right (counted in train_summary.json)."})

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required: a .jsonl, .json or .parquet training file")
        for path in (self.data, self.eval_data):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"data file not found: {path}")
        if self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2; got {self.max_length}")


def check_target_modules(model_args: ModelArguments, config: RenyiConfig) -> None:
    """Match ``--target_modules`` (or the ``--adapters``' modules) on an empty skeleton of the base model, so that
    a typo fails in seconds instead of after the weights load."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model_args.model)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    with init_empty_weights():  # parameters on the meta device: no memory, no weights read
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=model_args.trust_remote_code)
    if not model_args.adapters:
        find_target_modules(skeleton, config.target_modules, config.layers_to_transform)
        return
    _, module_names, _ = read_ensemble_config(model_args.adapters)
    existing = dict(skeleton.named_modules())
    missing = [name for name in module_names if name not in existing]
    if missing:
        raise ValueError(f"--adapters {model_args.adapters}: the base model {model_args.model} has no module(s) "
                         f"{missing[:5]} that this ensemble adapts; was it trained on another base model?")


def resume_checkpoint(config: RenyiConfig) -> str | None:
    """The checkpoint folder named by ``--resume_from_checkpoint`` (``true``: the last complete one in
    ``--output_dir``), checked before anything loads; None to start afresh."""
    value = config.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false", "none"):
        return None
    if str(value).strip().lower() == "true":
        found = last_complete_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint true: no complete checkpoint-N folder in "
                                    f"--output_dir {config.output_dir}; expected one written by an earlier run")
        logger.info("resuming from %s (the last complete checkpoint)", found)
        return found
    problem = checkpoint_problem(value) if Path(value).is_dir() else "no such folder"
    if problem:
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: {problem}; expected a checkpoint-N folder "
                                "written by an earlier run, or 'true' for the last one in --output_dir")
    return value


def build_ensemble(model_args: ModelArguments, config: RenyiConfig, model) -> LoraEnsemble:
    if model_args.adapters:
        return LoraEnsemble.from_pretrained(model, model_args.adapters)
    return LoraEnsemble(model, config.ensemble_config())


def finish_training(trainer: RenyiTrainer, train_dataset: TokenizedDataset, train_output, extra: dict) -> dict:
    """Write the ensemble, the PEFT exports and ``train_summary.json`` into ``output_dir``; return the summary."""
    args: RenyiConfig = trainer.args
    out = Path(args.output_dir)
    summary = {
        "num_examples": len(train_dataset),
        "num_truncated": train_dataset.num_truncated,
        "groups": train_dataset.group_names,
        "metrics": train_output.metrics,
        "config": {key: value for key, value in asdict(args).items() if isinstance(value, (int, float, str, list))},
        "num_nonfinite_skips": len(trainer.nonfinite_skipped_steps),
        "nonfinite_skipped_steps": trainer.nonfinite_skipped_steps,
        **extra,
    }
    summary.update(routing_summary(trainer, train_dataset, train_dataset.group_names))
    if trainer.is_world_process_zero():
        trainer.ensemble.save_pretrained(out)
        export_all_peft(trainer.ensemble, out / "peft")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("wrote %s, %s and %s", out / "adapters.safetensors", out / "peft", out / "train_summary.json")
    return summary


def run_sft(model_args: ModelArguments, data_args: DataArguments, config: RenyiConfig) -> dict:
    """Train an ensemble by SFT and write its outputs; returns the training summary."""
    check_model_exists(model_args.model)
    resume = resume_checkpoint(config)
    check_target_modules(model_args, config)
    tokenizer = load_tokenizer(model_args.model, model_args.trust_remote_code)
    train_dataset = load_sft_dataset(data_args.data, tokenizer, data_args.max_length)
    eval_dataset = load_sft_dataset(data_args.eval_data, tokenizer, data_args.max_length) if data_args.eval_data \
        else None
    model = model_args.load_model()
    ensemble = build_ensemble(model_args, config, model)
    trainer = RenyiTrainer(
        model=ensemble, args=config, group_names=train_dataset.group_names, train_dataset=train_dataset,
        eval_dataset=eval_dataset, data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    extra = {"eval": trainer.evaluate()} if eval_dataset is not None else {}
    return finish_training(trainer, train_dataset, result, extra)


def run_dpo(model_args: ModelArguments, data_args: DataArguments, config) -> dict:
    """Train an ensemble by alpha-Renyi DPO (``config``: ``DPOConfig``) and write its outputs."""
    from renyi_lora.data import PreferenceCollator, load_preference_dataset
    from renyi_lora.preference import RenyiDPOTrainer

    if config.reference == "initial" and not model_args.adapters:
        raise ValueError("--reference initial needs --adapters DIR (the saved ensemble to start from)")
    check_model_exists(model_args.model)
    resume = resume_checkpoint(config)
    check_target_modules(model_args, config)
    tokenizer = load_tokenizer(model_args.model, model_args.trust_remote_code)
    train_dataset = load_preference_dataset(data_args.data, tokenizer, data_args.max_length)
    eval_dataset = load_preference_dataset(data_args.eval_data, tokenizer, data_args.max_length) \
        if data_args.eval_data else None
    model = model_args.load_model()
    ensemble = build_ensemble(model_args, config, model)
    if config.reference == "initial":
        ensemble.freeze_reference()
    trainer = RenyiDPOTrainer(
        model=ensemble, args=config, group_names=train_dataset.group_names, train_dataset=train_dataset,
        eval_dataset=eval_dataset, data_collator=PreferenceCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    extra = {"eval": trainer.evaluate()} if eval_dataset is not None else {}
    return finish_training(trainer, train_dataset, result, extra)
