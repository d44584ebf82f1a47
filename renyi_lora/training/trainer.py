"""A thin ``transformers.Trainer`` subclass: the ensemble forward, member log-likelihoods and ``renyi_loss``.

Everything else (optimiser, schedule, logging, checkpointing, mixed precision, multi-process training)
is the Trainer's. Only LoRA parameters reach the optimiser, because the base model is frozen.

Checkpoints hold the adapters (``ensemble_config.json`` + ``adapters.safetensors``) next to the Trainer's
optimizer, scheduler, RNG and ``trainer_state.json`` (global step, hence the data order). A non-finite loss,
member log-likelihood or gradient stops training before the optimizer update (``nonfinite="stop"``) or drops
that update (``"skip"``), naming the step and the members.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from renyi_lora.config import RenyiConfig
from renyi_lora.data.sft import SFTCollator, load_sft_dataset
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.io import last_complete_checkpoint
from renyi_lora.likelihoods import IGNORE_INDEX, sequence_loglik
from renyi_lora.objective import (
    alpha_schedule,
    gaussian_prior,
    gradient_weights,
    renyi_loss,
    routed_loss,
    weighted_loglik_loss,
)
from renyi_lora.training import prepare
from renyi_lora.training.outputs import SavingMixin, routing_summary
from renyi_lora.training.upkeep import MemberUpkeep, set_weights

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A non-finite loss, member log-likelihood or gradient with ``nonfinite="stop"``; the message names the step."""


def responsibility_entropy(w: torch.Tensor) -> torch.Tensor:
    """Entropy over members of the routing ``w [K, B]`` -> ``[B]`` (0 = one member, log K = uniform)."""
    return -(torch.xlogy(w, w)).sum(0)


class RenyiTrainer(SavingMixin, Trainer):
    """Trains a ``LoraEnsemble`` on batches with ``input_ids``, ``attention_mask``, ``labels`` and ``group``."""

    collator_class: type = SFTCollator
    dataset_loader = staticmethod(load_sft_dataset)

    def __init__(self, model: str | PreTrainedModel | LoraEnsemble, args: RenyiConfig | None = None,
                 train_dataset=None, eval_dataset=None, processing_class: PreTrainedTokenizerBase | None = None,
                 data_collator=None, group_names: list[str] | None = None, peft_config=None,
                 adapters: str | None = None, model_init_kwargs: dict | None = None, trust_remote_code: bool = False,
                 dataset_split: str | None = None, dataset_config: str | None = None, **kwargs):
        """``model``: a hub id or local path, a ``PreTrainedModel`` or a ``LoraEnsemble``; fresh members are shaped by
        ``args`` or by ``peft_config`` (a ``peft.LoraConfig``), or come from a saved ensemble folder (``adapters``).
        ``train_dataset`` / ``eval_dataset``: a data file, a ``datasets`` object or folder, a hub dataset id (with
        ``dataset_split`` / ``dataset_config``), a list of dicts (TRL's formats), or tokenised examples. Data and
        target modules are checked before the base model's weights load (``renyi_lora.training.prepare``)."""
        args = args if args is not None else self.default_config()
        data_names = [str(data) for data in (train_dataset, eval_dataset) if isinstance(data, (str, os.PathLike))]
        tokenizer = processing_class
        if tokenizer is None and not (isinstance(model, LoraEnsemble) and prepare.is_tokenized(train_dataset,
                                                                                               eval_dataset)):
            tokenizer = prepare.prepare_tokenizer(model, processing_class, trust_remote_code)
        prepare.check_model(model, args, peft_config, adapters, trust_remote_code=trust_remote_code)
        train_dataset, eval_dataset = (
            prepare.prepare_dataset(data, tokenizer, args.max_length, self.dataset_loader, split=split,
                                    config=dataset_config)
            for data, split in ((train_dataset, dataset_split), (eval_dataset, None)))
        # For the model card; the CLI adds the command that produced the run.
        self.card_info = {"base_model": prepare.model_name(model), "datasets": data_names, "command": None}
        model = prepare.prepare_ensemble(model, args, peft_config, adapters, trust_remote_code=trust_remote_code,
                                         model_init_kwargs=model_init_kwargs)
        if data_collator is None and tokenizer is not None:
            data_collator = self.collator_class(tokenizer.pad_token_id)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, data_collator=data_collator, **kwargs)
        self.group_names = list(group_names or getattr(train_dataset, "group_names", None) or [])
        self.model_accepts_loss_kwargs = False  # our loss is a per-example mean: let the Trainer scale it
        # Per-batch metrics of this process as 0-dim tensors; `log` averages them over batches and processes.
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                   "eval": defaultdict(list)}
        self._routing: dict[str, torch.Tensor] = {}
        self._nonfinite: torch.Tensor | None = None  # [2, K] bool: log-likelihood, loss, OR-ed over micro-batches
        self.upkeep = MemberUpkeep(args)

    @staticmethod
    def default_config() -> RenyiConfig:
        return RenyiConfig(output_dir="renyi-lora-output")

    @property
    def ensemble(self) -> LoraEnsemble:
        return self.accelerator.unwrap_model(self.model)

    @property
    def in_alpha_warmup(self) -> bool:
        """Whether training is still raising alpha towards ``--alpha``."""
        N = self.args.alpha_warmup_length(self.state.max_steps)
        return bool(N) and self.model.training and self.state.global_step < N

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.learn_weights and self.ensemble.num_members > 1:  # the last EM step, on the whole training set
            set_weights(self.ensemble.mixture_weights, torch.tensor(self.routing_summary()["load"]))
        return output

    @property
    def alpha(self) -> float:
        """The Renyi order in force: ``--alpha``, or while training, ``objective.alpha_schedule`` over the first
        ``RenyiConfig.alpha_warmup_length`` steps."""
        args: RenyiConfig = self.args
        if not self.model.training:
            return args.alpha
        return alpha_schedule(args.alpha, self.state.global_step, args.alpha_warmup_length(self.state.max_steps))

    def data_term(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean alpha-Renyi loss, responsibilities [K, B], member log-likelihoods [K, B])`` of a batch.

        SFT: token log-likelihoods of the completion, routed per sequence or per token. Subclasses for other
        likelihoods (preferences) override this one method.
        """
        args: RenyiConfig = self.args
        labels = inputs["labels"]
        token = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), labels=labels)
        # float32 whatever the autocast dtype: a bf16 logsumexp over members loses the routing signal.
        return routed_loss(token.float(), labels != IGNORE_INDEX, self.alpha, args.routing_level,
                           length_normalize=args.length_normalize, floor=args.routing_floor,
                           log_weights=self.log_mixture_weights)

    @property
    def log_mixture_weights(self) -> torch.Tensor:
        """``[K]`` log pi, the ensemble's mixture weights (uniform unless learned, ``--learn_weights``)."""
        return self.ensemble.mixture_weights.log()

    def member_loglik(self, model, inputs: dict) -> torch.Tensor:
        """``L [K, B]`` of the members that run (all, or the chunk selected with ``ensemble.members``), float32."""
        labels = inputs["labels"]
        token = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), labels=labels)
        return sequence_loglik(token, labels, self.args.length_normalize)  # [K, B]

    def target_counts(self, inputs: dict) -> torch.Tensor | None:
        """``[B]`` target tokens of each example, for the per-token NLL metric (None where the likelihood is not one of
        tokens, as in DPO)."""
        return (inputs["labels"] != IGNORE_INDEX).sum(-1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: RenyiConfig = self.args
        group = inputs.pop("group", None)
        data_term, w, loglik = self.data_term(model, inputs)
        loss = data_term
        prior = torch.zeros((), device=data_term.device)
        if args.prior_weight > 0:
            prior = args.prior_weight * gaussian_prior(self.ensemble.lora_parameters(), w.shape[0], args.prior_std)
            loss = loss + prior
        if self.model.training:  # checked once per optimizer step, in `_check_finite`
            bad = torch.stack([~torch.isfinite(loglik.detach()).all(1), ~torch.isfinite(loss.detach()).expand(len(w))])
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            self.upkeep.add(w)
        self._record(data_term, prior, w, loglik, group, self.target_counts(inputs))
        return (loss, {"responsibilities": w, "loglik": loglik}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        chunk = self.args.member_chunk_size
        if chunk is not None and chunk < self.ensemble.num_members:
            loss = self._chunked_training_step(model, inputs, chunk)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of an optimizer step: gradients are complete
            self._check_finite()
            self.upkeep.step(self)
        return loss

    def _chunked_training_step(self, model, inputs: dict, chunk: int) -> torch.Tensor:
        """Member chunks: the objective couples members only through the (stop-gradient) responsibilities, so
        ``d loss / d theta_k = -sum_b w[k, b] grad L[k, b] / B``.

        Pass 1 gets every ``L [K, B]``: the members before the last chunk in one no-grad forward (no graph is kept,
        so running them together costs one layer's activations, not a chunk's graph), the last chunk with
        gradients. Then ``w``; the last chunk's surrogate is backpropagated at once and every other chunk runs
        again with gradients. One extra forward of K - c members per step, never more than one chunk's graph
        alive. Returns the alpha-Renyi loss.
        """
        args: RenyiConfig = self.args
        ensemble = self.ensemble
        model.train()
        inputs = self._prepare_inputs(inputs)
        group = inputs.pop("group", None)
        K = ensemble.num_members
        chunks = [(start, min(start + chunk, K)) for start in range(0, K, chunk)]
        first_of_last = chunks[-1][0]
        with torch.no_grad(), ensemble.members(0, first_of_last):
            early = self.member_loglik(model, inputs)  # [K - c, B]
        with ensemble.members(first_of_last, K):
            last = self.member_loglik(model, inputs)  # [c, B], graph kept
        with torch.no_grad():
            loglik = torch.cat([early, last.detach()])  # [K, B]
            log_pi = self.log_mixture_weights
            data_term, w = renyi_loss(loglik, self.alpha, log_pi)
            weights = gradient_weights(w, args.routing_floor, log_pi)  # [K, B]
        scale = 1.0 / self.current_gradient_accumulation_steps
        prior = torch.zeros((), device=loglik.device)
        order = [chunks[-1], *chunks[:-1]]  # the last chunk's graph exists already: backpropagate it first
        for i, (start, stop) in enumerate(order):
            with ensemble.members(start, stop):
                chunk_loglik = last if i == 0 else self.member_loglik(model, inputs)
                surrogate = weighted_loglik_loss(chunk_loglik.new_zeros(()), chunk_loglik, weights[start:stop]).mean()
                if args.prior_weight > 0:  # this chunk's share of (1/K) sum_k ||theta_k||^2 / (2 prior_std^2)
                    params = [p[start:stop] for p in ensemble.lora_parameters()]
                    share = args.prior_weight * gaussian_prior(params, K, args.prior_std)
                    surrogate, prior = surrogate + share, prior + share.detach()
                final = i == len(order) - 1
                sync = model.no_sync() if not final and hasattr(model, "no_sync") else nullcontext()
                with sync:  # DDP: all-reduce the gradients once, after the last backward
                    self.accelerator.backward(surrogate * scale)
        loss = data_term + prior
        bad = torch.stack([~torch.isfinite(loglik).all(1), ~torch.isfinite(loss).expand(len(w))])
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        self.upkeep.add(w)
        self._record(data_term, prior, w, loglik, group, self.target_counts(inputs))
        return loss.detach() * scale

    def _check_finite(self) -> None:
        """Stop, or drop this step's update, if a member's log-likelihood, the loss or a gradient was non-finite.

        Runs on the complete (all-reduced) gradients before the Trainer clips them: clipping by a NaN norm would
        spread the NaN to every member and hide which one failed. Under DDP the flags are all-reduced so that
        every process takes the same decision.
        """
        num_members = self.ensemble.num_members
        flags = self._nonfinite
        self._nonfinite = None
        if flags is None:
            flags = torch.zeros(2, num_members, dtype=torch.bool, device=self.args.device)
        grad = torch.zeros_like(flags[0])
        for parameter in self.ensemble.lora_parameters():
            if parameter.grad is not None:  # [K, ...] -> [K]
                grad |= ~torch.isfinite(parameter.grad).flatten(1).all(1)
        flags = torch.cat([flags, grad[None]])  # [3, K]: log-likelihood, loss, gradient
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags.float(), "sum") > 0
        if not flags.any():
            return
        step = self.state.global_step + 1  # the step being computed; checkpoint-N holds the state after step N
        loglik_members, grad_members = flags[0].nonzero().flatten().tolist(), flags[2].nonzero().flatten().tolist()
        what = [f"{name} of member(s) {members}" for name, members in
                (("log-likelihood", loglik_members), ("gradient", grad_members)) if members] or ["loss (prior term)"]
        problem = f"step {step}: non-finite {' and '.join(what)}"
        if self.args.nonfinite == "stop":
            checkpoint = last_complete_checkpoint(self.args.output_dir)
            raise NonFiniteError(f"{problem}; stopped before the optimizer update, so the adapters and the last "
                                 f"checkpoint ({checkpoint or 'none written yet'}) are unaffected. Lower "
                                 "--learning_rate, check the data, or pass --nonfinite skip to skip such steps")
        for parameter in self.ensemble.lora_parameters():
            parameter.grad = None  # the optimizer skips parameters without a gradient: no update, moments unchanged
        # log_history is saved in every checkpoint's trainer_state.json, so a resumed run keeps the count.
        self.state.log_history.append({"step": step, "nonfinite_skipped": problem})
        logger.warning("%s; skipped this update (--nonfinite skip)", problem)

    @property
    def nonfinite_skipped_steps(self) -> list[int]:
        """Steps whose update was dropped by ``nonfinite="skip"``, including those before a resume."""
        return [entry["step"] for entry in self.state.log_history if "nonfinite_skipped" in entry]

    @property
    def _keeps_metrics(self) -> bool:
        """False while training with logging off: nothing would ever read (and clear) per-batch metrics."""
        return not (self.model.training and self.args.logging_strategy == "no")

    def _record(self, data_term, prior, w, loglik, group, targets=None) -> None:
        """Keep this process's batch metrics; ``log`` averages them (one collective per log, none per step)."""
        if not self._keeps_metrics:
            return
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        entropy = responsibility_entropy(w)  # [B]
        metrics["renyi/data"].append(data_term.detach().float())
        metrics["renyi/prior"].append(prior.detach().float())
        metrics["routing/entropy"].append(entropy.mean())
        metrics["routing/effective_members"].append(entropy.exp().mean())
        if self.model.training and self.args.alpha_warmup_length(self.state.max_steps):
            # the alpha of this step: `log` runs after the step
            metrics["renyi/alpha"].append(torch.tensor(self.alpha, device=data_term.device))
        for k, nll in enumerate(-loglik.detach().float().mean(1)):
            metrics[f"member_{k}/nll"].append(nll)
        if targets is not None:  # per target token, as TRL's SFT `loss`; ours and member_k/nll sum over each example
            sums = loglik.detach().float() * (targets if self.args.length_normalize else 1)  # [K, B]
            metrics["nll_per_token"].append(-sums.sum(1).mean() / targets.sum().clamp(min=1))
        if group is not None and self.group_names:
            group = group.to(w.device)
            totals = self._routing.setdefault(mode, w.new_zeros(len(self.group_names), w.shape[0] + 1))
            valid = group >= 0
            totals[:, :-1].index_add_(0, group[valid], w[:, valid].T.float())
            totals[:, -1].index_add_(0, group[valid], torch.ones_like(group[valid], dtype=totals.dtype))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        # Every process logs at the same steps with the same keys; per-process means are averaged (equal batch
        # sizes per process, so this is the mean over the global batch up to the padding of a last short batch).
        names = sorted(key for key, values in self._metrics[mode].items() if values)
        metrics = {}
        if names:
            means = torch.stack([torch.stack(self._metrics[mode][key]).float().mean() for key in names])  # [M]
            metrics = dict(zip(names, self.accelerator.reduce(means, "mean").tolist(), strict=True))
        totals = self._routing.pop(mode, None)
        if totals is not None:
            totals = self.accelerator.reduce(totals, "sum").cpu()  # [G, K + 1]: responsibility sums, counts
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

    def routing_summary(self, dataset: Dataset | None = None) -> dict:
        """Mean responsibility and mean NLL of each member per group over ``dataset`` (default: the training set), and
        each member's mean responsibility over all of it (``load``); see ``outputs.routing_summary``. Every process
        must call it (the sums are all-reduced)."""
        return routing_summary(self, self.train_dataset if dataset is None else dataset)


RenyiSFTTrainer = RenyiTrainer  # TRL's name (``trl.SFTTrainer``) for the same trainer
