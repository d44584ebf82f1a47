"""A thin ``transformers.Trainer`` subclass: the ensemble forward, member log-likelihoods and ``renyi_loss``.

Everything else (optimiser, schedule, logging, checkpointing, mixed precision, multi-process training)
is the Trainer's. Only LoRA parameters reach the optimiser, because the base model is frozen.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainingArguments

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.objective import gaussian_prior, routed_loss


@dataclass
class RenyiConfig(TrainingArguments, EnsembleConfig):
    """Training arguments: the Trainer's own flags, the ensemble's shape and the objective's knobs."""

    alpha: float = field(default=1.0, metadata={"help": "Renyi order: 0 = variational Bayes (every member fits all "
                         "data), 1 = mixture likelihood (members may specialise), >1 sharper routing, inf = "
                         "winner-take-all."})
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

    def __post_init__(self) -> None:
        EnsembleConfig.__post_init__(self)
        if not self.alpha >= 0:
            raise ValueError(f"--alpha must be >= 0 (or inf); got {self.alpha}")
        if self.prior_std <= 0 or self.prior_weight < 0:
            raise ValueError(f"need --prior_std > 0 and --prior_weight >= 0; got {self.prior_std}, {self.prior_weight}")
        super().__post_init__()

    def ensemble_config(self) -> EnsembleConfig:
        return EnsembleConfig(**{f.name: getattr(self, f.name) for f in fields(EnsembleConfig)})


def responsibility_entropy(w: torch.Tensor) -> torch.Tensor:
    """Entropy over members of the routing ``w [K, B]`` -> ``[B]`` (0 = one member, log K = uniform)."""
    return -(torch.xlogy(w, w)).sum(0)


class RenyiTrainer(Trainer):
    """Trains a ``LoraEnsemble`` on batches with ``input_ids``, ``attention_mask``, ``labels`` and ``group``."""

    def __init__(self, model: LoraEnsemble, args: RenyiConfig, group_names: list[str] | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.group_names = list(group_names or [])
        self.model_accepts_loss_kwargs = False  # our loss is a per-example mean: let the Trainer scale it
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._routing: dict[str, torch.Tensor] = {}

    @property
    def ensemble(self) -> LoraEnsemble:
        return self.accelerator.unwrap_model(self.model)

    def data_term(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean alpha-Renyi loss, responsibilities [K, B], member log-likelihoods [K, B])`` of a batch.

        SFT: token log-likelihoods of the completion, routed per sequence or per token. Subclasses for other
        likelihoods (preferences) override this one method.
        """
        args: RenyiConfig = self.args
        labels = inputs["labels"]
        token = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), labels=labels)
        return routed_loss(token, labels != IGNORE_INDEX, args.alpha, args.routing_level, args.length_normalize)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: RenyiConfig = self.args
        group = inputs.pop("group", None)
        data_term, w, loglik = self.data_term(model, inputs)
        loss = data_term
        prior = torch.zeros((), device=data_term.device)
        if args.prior_weight > 0:
            prior = args.prior_weight * gaussian_prior(self.ensemble.lora_parameters(), w.shape[0], args.prior_std)
            loss = loss + prior
        self._record(data_term, prior, w, loglik, group)
        return (loss, {"responsibilities": w, "loglik": loglik}) if return_outputs else loss

    @torch.no_grad()
    def _record(self, data_term, prior, w, loglik, group) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        entropy = gather(responsibility_entropy(w))  # [B]
        metrics["renyi/data"].append(gather(data_term.detach()).mean().item())
        metrics["renyi/prior"].append(gather(prior.detach()).mean().item())
        metrics["routing/entropy"].append(entropy.mean().item())
        metrics["routing/effective_members"].append(entropy.exp().mean().item())
        for k, nll in enumerate((-gather(loglik.detach().T).T).mean(1).tolist()):
            metrics[f"member_{k}/nll"].append(nll)
        if group is not None and self.group_names:
            group, w = gather(group), gather(w.T).T  # [B], [K, B]
            totals = self._routing.setdefault(mode, torch.zeros(len(self.group_names), w.shape[0] + 1))
            valid = group >= 0
            totals[:, :-1].index_add_(0, group[valid].cpu(), w[:, valid].T.float().cpu())
            totals[:, -1].index_add_(0, group[valid].cpu(), torch.ones(int(valid.sum())))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        totals = self._routing.pop(mode, None)
        if totals is not None:
            for g, name in enumerate(self.group_names):
                if totals[g, -1] > 0:
                    for k, value in enumerate((totals[g, :-1] / totals[g, -1]).tolist()):
                        metrics[f"routing/{name}/member_{k}"] = value
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs = {**logs, **{k: v for k, v in metrics.items() if math.isfinite(v)}}
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Checkpoints hold the adapters only (``ensemble_config.json`` + ``adapters.safetensors``)."""
        output_dir = output_dir or self.args.output_dir
        self.ensemble.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, f"{output_dir}/training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        from renyi_lora.io import WEIGHTS_NAME

        tensors = load_file(f"{resume_from_checkpoint}/{WEIGHTS_NAME}")
        with torch.no_grad():
            for name, layer in self.ensemble.lora_layers().items():
                layer.lora_A.copy_(tensors[f"{name}.lora_A"])
                layer.lora_B.copy_(tensors[f"{name}.lora_B"])


@torch.no_grad()
def routing_summary(trainer: RenyiTrainer, dataset: Dataset, group_names: list[str]) -> dict:
    """Mean responsibility and mean NLL of each member per group over ``dataset`` (``"all"`` if no groups)."""
    args: RenyiConfig = trainer.args
    model = trainer.model
    model.eval()
    loader = DataLoader(dataset, batch_size=args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    names = group_names or ["all"]
    K = trainer.ensemble.num_members
    resp, nll, count = torch.zeros(len(names), K), torch.zeros(len(names), K), torch.zeros(len(names))
    for batch in loader:
        group = batch.pop("group")  # [B]
        if not group_names:
            group = torch.zeros_like(group)
        _, w, loglik = trainer.data_term(model, trainer._prepare_inputs(batch))
        valid = group >= 0  # examples without a group count in no row
        group, w, loglik = group[valid], w[:, valid].T.float().cpu(), loglik[:, valid].T.float().cpu()
        resp.index_add_(0, group, w)
        nll.index_add_(0, group, -loglik)
        count.index_add_(0, group, torch.ones(len(group)))
    count = count.clamp(min=1)[:, None]
    return {
        "routing": {name: row.tolist() for name, row in zip(names, resp / count, strict=True)},
        "member_group_nll": {name: row.tolist() for name, row in zip(names, nll / count, strict=True)},
    }
