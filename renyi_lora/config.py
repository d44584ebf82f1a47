"""Configuration: the shape of an ensemble (``EnsembleConfig``, and ``layer_dims`` of the layers it adapts) and the
training arguments (``RenyiConfig``: the Trainer's flags, the ensemble's shape and the objective's knobs).

Kept apart from ``renyi_lora.ensemble`` so that saving and loading (``renyi_lora.io``) need not import the module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import nn
from transformers import TrainingArguments
from transformers.pytorch_utils import Conv1D


@dataclass
class EnsembleConfig:
    """Shape of the ensemble; every field is a CLI flag of ``renyi-lora sft`` / ``dpo``."""

    num_members: int = field(default=4, metadata={"help": "K, the number of LoRA members in the ensemble."})
    rank: int = field(default=8, metadata={"help": "LoRA rank R of every member."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scaling numerator: each update is scaled by lora_alpha / rank."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the LoRA input (0 = none)."})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules to adapt: names or suffixes (q_proj v_proj ...), GPT-2 Conv1D names (c_attn ...), "
                  "or 'all-linear' (every linear layer except the output head)."},
    )
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Adapt only these layer indices (PEFT's name). Layers below the first adapted "
                                "one then run once on B rows instead of K*B (a shared trunk)."}
    )
    init_seed: int | None = field(
        default=None, metadata={"help": "Seed for each member's random LoRA initialisation (its A matrices). Default: "
                                "--seed in `renyi-lora sft` / `dpo`, 0 for an EnsembleConfig built in Python."}
    )
    init_lora_b_std: float = field(
        default=0.0, metadata={"help": "Std of each member's initial LoRA B draw. 0 (PEFT's rule): every member starts "
                               "as the base model and members differ only where the data move them. > 0: each member "
                               "starts from its own random function (a randomised prior, Osband et al. 2018), so "
                               "members keep disagreeing where the data say nothing."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        for name, value, low in (("num_members", self.num_members, 1), ("rank", self.rank, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if not self.init_lora_b_std >= 0:
            raise ValueError(f"init_lora_b_std must be >= 0; got {self.init_lora_b_std}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0; got {self.lora_alpha}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; give module names (q_proj v_proj) or 'all-linear'")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """``(Din, Dout)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored ``[Din, Dout]``)."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


@dataclass
class RenyiConfig(TrainingArguments, EnsembleConfig):
    """Training arguments: the Trainer's own flags, the ensemble's shape and the objective's knobs."""

    alpha: float = field(default=1.0, metadata={"help": "Renyi order: 0 = variational Bayes (every member fits all "
                         "data), 1 = mixture likelihood (members may specialise), >1 sharper routing, inf = "
                         "winner-take-all."})
    alpha_warmup_ratio: float = field(default=0.5, metadata={"help": "Raise alpha from 0 to --alpha over this "
                                      "fraction of the training steps (deterministic annealing): members first fit "
                                      "what all examples share, then split along their largest disagreement, which "
                                      "is what makes them split by group instead of memorising examples one by one "
                                      "(docs/specialisation.md). Linear in alpha; with --alpha inf, alpha = s / (N - "
                                      "s) at step s of N: 1 (the mixture) halfway, winner-take-all from step N. 0 = "
                                      "off."})
    alpha_warmup_steps: int | None = field(default=None, metadata={"help": "Length of the alpha warm-up in optimizer "
                                           "steps; overrides --alpha_warmup_ratio when given (0 = off)."})
    routing_floor: float = field(default=0.0, metadata={"help": "Every member's likelihood gradient on every example "
                                 "is weighted by at least routing_floor * pi_k: the gradient of (1 - floor) * l_alpha "
                                 "+ floor * l_0. Keeps a member that falls behind learning, slowly (revival is the "
                                 "default cure; docs/specialisation.md). 0 = the exact alpha-Renyi gradient."})
    revive_threshold: float = field(default=0.01, metadata={"help": "A member whose mean responsibility over the last "
                                    "--member_update_steps steps is below this is dead (long completions can hand "
                                    "one member every example early on): it is replaced by a noisy copy of the most "
                                    "loaded member, which then shares that member's examples and weight "
                                    "(docs/specialisation.md). 0 = off."})
    learn_weights: bool = field(default=False, metadata={"help": "Learn the mixture weights pi (EM: pi <- each "
                                "member's mean responsibility over the last --member_update_steps steps). Saved with "
                                "the ensemble and used by eval and generate. Off: uniform pi."})
    member_update_steps: int = field(default=10, metadata={"help": "Optimizer steps between updates of the mixture "
                                     "weights (--learn_weights) and checks for dead members (--revive_threshold)."})
    prior_std: float = field(default=1.0, metadata={"help": "Std of the Gaussian prior N(0, prior_std^2) on LoRA "
                             "parameters."})
    prior_weight: float = field(default=1e-4, metadata={"help": "Weight of the prior term (1/K) sum_k ||theta_k||^2 / "
                                "(2 prior_std^2) added to the mean per-example loss; 1/num_examples is the "
                                "Bayesian weight."})
    length_normalize: bool = field(default=False, metadata={"help": "Use the mean instead of the sum of token "
                                   "log-likelihoods, which makes alpha comparable across lengths."})
    routing_level: Literal["sequence", "token"] = field(default="sequence", metadata={"help": "Route whole "
                                                        "examples (sequence) or each token (token) to members."})
    # Defaults that differ from TrainingArguments: LoRA learning rate, frequent logging, our own columns.
    learning_rate: float = field(default=2e-4, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep dataset columns (needed: 'group')."})
    # Every LoRA parameter takes part in every forward and the frozen base has no gradients for DDP to wait on,
    # so the Trainer's default for non-PreTrainedModel models (True) only adds a graph traversal per step.
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP's find_unused_parameters "
                                                    "(not needed: every LoRA parameter is used in every step)."})
    member_chunk_size: int | None = field(default=None, metadata={"help": "Train the members in chunks of this "
                                          "many (default: all at once). Every member's log-likelihood and the "
                                          "routing come first, then each chunk backpropagates -sum_k w[k,b] "
                                          "L[k,b] / B: the same gradients with one chunk's activation memory, for "
                                          "one extra no-grad forward of K - c members."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per example; longer completions are cut "
                            "from the right (counted in train_summary.json)."})
    routing_summary: bool = field(default=True, metadata={"help": "After training, score the training set once more "
                                  "for train_summary.json and the model card: each member's mean responsibility and "
                                  "NLL per group. Skipped at K = 1 (every example goes to the one member)."})
    nonfinite: Literal["stop", "skip"] = field(default="stop", metadata={"help": "On a non-finite loss, member "
                                               "log-likelihood or gradient: 'stop' raises, naming the step and the "
                                               "members (checkpoints already written stay intact); 'skip' drops that "
                                               "step's update and counts it in train_summary.json."})

    def __post_init__(self) -> None:
        EnsembleConfig.__post_init__(self)
        if not self.alpha >= 0:
            raise ValueError(f"--alpha must be >= 0 (or inf); got {self.alpha}")
        if self.alpha_warmup_steps is not None and self.alpha_warmup_steps < 0:
            raise ValueError(f"--alpha_warmup_steps must be >= 0; got {self.alpha_warmup_steps}")
        if not 0 <= self.alpha_warmup_ratio <= 1:
            raise ValueError(f"--alpha_warmup_ratio must be in [0, 1]; got {self.alpha_warmup_ratio}")
        if not 0 <= self.routing_floor <= 1:
            raise ValueError(f"--routing_floor must be in [0, 1]; got {self.routing_floor}")
        if not 0 <= self.revive_threshold < 1:
            raise ValueError(f"--revive_threshold must be in [0, 1) (0 = off); got {self.revive_threshold}")
        if isinstance(self.member_update_steps, bool) or not isinstance(self.member_update_steps, int) \
                or self.member_update_steps < 1:
            raise ValueError(f"--member_update_steps must be an integer >= 1; got {self.member_update_steps!r}")
        if self.prior_std <= 0 or self.prior_weight < 0:
            raise ValueError(f"need --prior_std > 0 and --prior_weight >= 0; got {self.prior_std}, {self.prior_weight}")
        if self.member_chunk_size is not None:
            if self.member_chunk_size < 1:
                raise ValueError(f"--member_chunk_size must be >= 1; got {self.member_chunk_size}")
            if self.routing_level != "sequence":
                raise ValueError("--member_chunk_size needs --routing_level sequence (token routing couples tokens)")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2 (an integer: tokens per example); got {self.max_length!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"--nonfinite must be 'stop' or 'skip'; got {self.nonfinite!r}")
        super().__post_init__()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs CUDA; torch warns on every loader otherwise

    def alpha_warmup_length(self, total_steps: int) -> int:
        """Optimizer steps of the alpha warm-up in a run of ``total_steps``: ``--alpha_warmup_steps`` if given, else
        ``--alpha_warmup_ratio`` of them, rounded up (as the Trainer rounds its learning-rate warm-up)."""
        if self.alpha_warmup_steps is not None:
            return self.alpha_warmup_steps
        return math.ceil(self.alpha_warmup_ratio * total_steps)

    def ensemble_config(self) -> EnsembleConfig:
        """The ``EnsembleConfig`` fields, with ``init_seed`` defaulting to ``--seed`` (the Trainer's seed)."""
        values = {f.name: getattr(self, f.name) for f in fields(EnsembleConfig)}
        if values["init_seed"] is None:
            values["init_seed"] = self.seed
        return EnsembleConfig(**values)


@dataclass
class DPOConfig(RenyiConfig):
    """``RenyiConfig`` plus the preference knobs (TRL's names)."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature beta on the log-ratio margins."})
    reference: Literal["base", "initial"] = field(
        default="base", metadata={"help": "Reference policy: 'base' (adapters disabled) or 'initial' (each member's "
                                  "starting adapter; needs --adapters)."}
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Initial AdamW learning rate."})
    # DPO usually starts from an SFT ensemble whose members have split already; a ramp from alpha = 0 would first
    # train every member on every group's preferences. The warm-up stays available, off by default.
    alpha_warmup_ratio: float = field(default=0.0, metadata={"help": "Raise alpha from 0 to --alpha over this "
                                      "fraction of the training steps (see renyi-lora sft --help). 0 = off."})

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0; got {self.beta}")
        super().__post_init__()
