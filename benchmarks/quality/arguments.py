"""The flags every quality driver shares (``run``, ``survey_run``, ``epochs``): the model, the ensemble's size and
rank, where results and caches go, and the torch threads. Each driver's arguments dataclass extends this one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ModelArguments:
    model: str = field(default="smollm2-135m", metadata={"help": "Base causal LM (Llama-family decoder)."})
    num_members: int = 4
    rank: int = 8
    tag: str = field(default="", metadata={"help": "Suffix of the output files' names (e.g. to keep a sweep apart)."})
    out: str = field(default=str(ROOT / "benchmarks/results"), metadata={"help": "Where the tables, JSON, PNGs go."})
    cache_dir: str = field(default=str(Path.home() / ".cache/renyi-lora/quality"))
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's); 1 on a machine "
                                "busy with other jobs, where contending threads slow each other down."})
