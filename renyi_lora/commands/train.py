"""``renyi-lora sft`` and ``renyi-lora dpo``: flags into ``RenyiSFTTrainer`` / ``RenyiDPOTrainer``, then train,
evaluate, save (ensemble, PEFT members, ``train_summary.json``, model card) and optionally push to the Hub.

Every check runs before the weights load: flags, ``--resume_from_checkpoint``, the model path, the target modules,
the data (read and validated whole). Under ``torchrun`` / ``accelerate launch`` every process runs the command;
only the first writes the outputs.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from renyi_lora.commands.common import ModelArguments
from renyi_lora.config import RenyiConfig
from renyi_lora.data.sources import check_source
from renyi_lora.io import checkpoint_problem, last_complete_checkpoint
from renyi_lora.models import check_quantization
from renyi_lora.training.dpo import RenyiDPOTrainer
from renyi_lora.training.trainer import RenyiTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainModelArguments(ModelArguments):
    """The base model and where the members start."""

    adapters: str | None = field(default=None, metadata={"help": "Start from a saved ensemble folder instead of "
                                 "fresh adapters (its K, rank and target modules are used)."})
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

    def init_kwargs(self) -> dict:
        """How ``load_model_and_tokenizer`` loads the base: dtype and quantisation."""
        return {"torch_dtype": getattr(torch, self.base_dtype), "quantization": self.quantization}


@dataclass
class DataArguments:
    """Where the data come from."""

    data: str = field(default=None, metadata={"help": "Training data in TRL's formats: a .jsonl, .json or .parquet "
                      "file, a folder written by datasets' save_to_disk, a folder of data files, or a hub dataset id."})
    eval_data: str | None = field(default=None, metadata={"help": "Optional evaluation data, same kinds (a dataset "
                                  "dict's 'test' split is not taken automatically: name it here)."})
    dataset_split: str | None = field(default=None, metadata={"help": "Split of --data when it is a dataset dict or a "
                                      "hub id (default: train); slices such as 'train[:1000]' work for hub ids."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration (subset) of a hub dataset."})

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required: a .jsonl, .json or .parquet file, a datasets folder or a hub id")
        check_source(self.data, self.dataset_split, self.dataset_config)
        if self.eval_data is not None:
            check_source(self.eval_data)


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


def run_training(trainer_class: type[RenyiTrainer], model_args: TrainModelArguments, data_args: DataArguments,
                 config: RenyiConfig, argv: list[str] | None = None) -> dict:
    """Train, evaluate (with ``--eval_data``) and save; returns the training summary. ``argv``: the command's flags,
    recorded in the model card."""
    resume = resume_checkpoint(config)
    trainer = trainer_class(
        model_args.model, config, train_dataset=data_args.data, eval_dataset=data_args.eval_data,
        adapters=model_args.adapters, trust_remote_code=model_args.trust_remote_code,
        model_init_kwargs=model_args.init_kwargs(), dataset_split=data_args.dataset_split,
        dataset_config=data_args.dataset_config)
    if argv is not None:
        command = "sft" if trainer_class is RenyiTrainer else "dpo"
        trainer.card_info["command"] = shlex.join(["renyi-lora", command, *argv])
    trainer.train(resume_from_checkpoint=resume)
    if trainer.eval_dataset is not None:
        trainer.evaluate()
    trainer.save_model()
    return trainer.summary


def run_sft(model_args: TrainModelArguments, data_args: DataArguments, config: RenyiConfig,
            argv: list[str] | None = None) -> dict:
    """What ``renyi-lora sft`` does (see ``run_training``)."""
    return run_training(RenyiTrainer, model_args, data_args, config, argv)


def run_dpo(model_args: TrainModelArguments, data_args: DataArguments, config, argv: list[str] | None = None) -> dict:
    """What ``renyi-lora dpo`` does (``config``: a ``DPOConfig``; see ``run_training``)."""
    return run_training(RenyiDPOTrainer, model_args, data_args, config, argv)


def print_routing(summary: dict) -> None:
    """The routing table of a finished run (once, on the first process)."""
    if int(os.environ.get("RANK", "0")) != 0 or "routing" not in summary:
        return
    print("\nrouting over the training set (mean responsibility of each member):")
    nll = summary.get("member_group_nll", {})
    for group, row in summary["routing"].items():
        cells = [f"{w:5.2f}" + (f" (nll {n:6.2f})" if group in nll else "")
                 for w, n in zip(row, nll.get(group, row), strict=True)]
        print(f"  {group:>16}: {'  '.join(cells)}")
