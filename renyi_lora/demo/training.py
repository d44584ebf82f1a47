"""What both parts of the demo share: its flags, and training one ensemble the demo's way (top layers only, a few
dozen steps, a constant learning rate)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from renyi_lora.config import RenyiConfig
from renyi_lora.data.sft import SFTCollator
from renyi_lora.demo.analogies import questions_path
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.models import DEFAULT_MODEL, load_model_and_tokenizer
from renyi_lora.training.trainer import RenyiTrainer


@dataclass
class DemoArguments:
    output_dir: str = field(default="demo_output", metadata={"help": "Where data, ensembles, plots and report go."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Base model (the embedded SmolLM2-135M by default)."})
    alphas: list[float] = field(default_factory=lambda: [0.0, 1.0, 4.0], metadata={"help": "Renyi orders to train."})
    num_members: int = field(default=4, metadata={"help": "K for the ensembles (a K = 1 adapter is trained too)."})
    max_steps: int = field(default=64, metadata={"help": "Optimizer steps per training run."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step (per member)."})
    alpha_warmup_steps: int = field(default=24, metadata={"help": "Raise alpha from 0 over the first N steps "
                                    "(deterministic annealing; without it some members can lose every example "
                                    "early and stay unused)."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate."})
    top_layers: int = field(default=8, metadata={"help": "Adapt only the top N decoder layers; the layers below run "
                            "once on B rows (a shared trunk), which keeps the demo fast on a CPU."})
    seed: int = field(default=0, metadata={"help": "Seed for the data, the adapters and the data order."})
    quick: bool = field(default=False, metadata={"help": "A smaller run: half the steps and alphas 0 and 4 only."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})
    real_text: Literal["no", "yes", "only"] = field(default="no", metadata={"help": "Part 2 on real text (gensim's "
                                                    "word analogies): 'yes' after part 1, 'only' instead."})

    def __post_init__(self) -> None:
        if self.quick:
            self.max_steps, self.alphas = max(self.max_steps // 2, 1), [0.0, 4.0]
        if self.num_members < 2 or self.max_steps < 1 or any(a < 0 for a in self.alphas):
            raise ValueError("need --num_members >= 2, --max_steps >= 1 and alphas >= 0")
        if self.real_text not in ("no", "yes", "only"):
            raise ValueError(f"--real_text must be 'no', 'yes' or 'only'; got {self.real_text!r}")
        if self.real_text != "no":
            questions_path()  # no gensim: fail before any training, naming the pip command


def train_ensemble(args: DemoArguments, tokenizer, dataset, alpha: float, num_members: int, out: Path) -> tuple:
    model, _ = load_model_and_tokenizer(args.model, torch_dtype=torch.float32)
    layers = model.config.num_hidden_layers
    config = RenyiConfig(
        output_dir=str(out), alpha=alpha, num_members=num_members,
        alpha_warmup_steps=min(args.alpha_warmup_steps, args.max_steps // 2),
        rank=8, lora_alpha=16,
        layers_to_transform=list(range(max(layers - args.top_layers, 0), layers)), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32, learning_rate=args.learning_rate,
        lr_scheduler_type="constant", seed=args.seed, save_strategy="no", report_to="none", logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
    )
    ensemble = LoraEnsemble(model, config.ensemble_config())
    trainer = RenyiTrainer(model=ensemble, args=config, group_names=dataset.group_names, train_dataset=dataset,
                           data_collator=SFTCollator(tokenizer.pad_token_id))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    ensemble.save_pretrained(out)
    return ensemble.eval(), trainer.routing_summary(), seconds
