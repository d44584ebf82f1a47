"""A thin ``transformers.Trainer`` subclass: the ensemble forward, member log-likelihoods and ``renyi_loss``.

Everything else (optimiser, schedule, logging, checkpointing, mixed precision, multi-process training)
is the Trainer's. Only LoRA parameters reach the optimiser, because the base model is frozen.

Checkpoints hold the adapters (``ensemble_config.json`` + ``adapters.safetensors``) next to the Trainer's
optimizer, scheduler, RNG and ``trainer_state.json`` (global step, hence the data order). A non-finite loss,
member log-likelihood or gradient stops training before the optimizer update (``nonfinite="stop"``) or drops
that update (``"skip"``), naming the step and the members.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter_weights, save_ensemble
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.objective import gaussian_prior, renyi_loss, routed_loss

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A non-finite loss, member log-likelihood or gradient with ``nonfinite="stop"``; the message names the step."""


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
        if self.prior_std <= 0 or self.prior_weight < 0:
            raise ValueError(f"need --prior_std > 0 and --prior_weight >= 0; got {self.prior_std}, {self.prior_weight}")
        if self.member_chunk_size is not None:
            if self.member_chunk_size < 1:
                raise ValueError(f"--member_chunk_size must be >= 1; got {self.member_chunk_size}")
            if self.routing_level != "sequence":
                raise ValueError("--member_chunk_size needs --routing_level sequence (token routing couples tokens)")
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


def responsibility_entropy(w: torch.Tensor) -> torch.Tensor:
    """Entropy over members of the routing ``w [K, B]`` -> ``[B]`` (0 = one member, log K = uniform)."""
    return -(torch.xlogy(w, w)).sum(0)


class RenyiTrainer(Trainer):
    """Trains a ``LoraEnsemble`` on batches with ``input_ids``, ``attention_mask``, ``labels`` and ``group``."""

    def __init__(self, model: LoraEnsemble, args: RenyiConfig, group_names: list[str] | None = None, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.group_names = list(group_names or [])
        self.model_accepts_loss_kwargs = False  # our loss is a per-example mean: let the Trainer scale it
        # Per-batch metrics of this process as 0-dim tensors; `log` averages them over batches and processes.
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                   "eval": defaultdict(list)}
        self._routing: dict[str, torch.Tensor] = {}
        self._nonfinite: torch.Tensor | None = None  # [2, K] bool: log-likelihood, loss, OR-ed over micro-batches

    @property
    def ensemble(self) -> LoraEnsemble:
        return self.accelerator.unwrap_model(self.model)

    @property
    def alpha(self) -> float:
        """The Renyi order in force: ``--alpha``, or during the first N (``RenyiConfig.alpha_warmup_length``) steps of
        training its ramp from 0: ``alpha * s / N`` after s completed steps, or for ``alpha = inf`` ``s / (N - s)`` (1
        halfway, so that ``alpha / (1 + alpha)`` rises linearly to 1, and winner-take-all from step N)."""
        args: RenyiConfig = self.args
        N, s = args.alpha_warmup_length(self.state.max_steps), self.state.global_step
        if N and self.model.training and s < N:
            return s / (N - s) if math.isinf(args.alpha) else args.alpha * s / N
        return args.alpha

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
                           args.length_normalize)

    def member_loglik(self, model, inputs: dict) -> torch.Tensor:
        """``L [K, B]`` of the members that run (all, or the chunk selected with ``ensemble.members``), float32."""
        labels = inputs["labels"]
        token = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), labels=labels)
        loglik = token.float().sum(-1)  # [K, B]
        if self.args.length_normalize:
            loglik = loglik / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
        return loglik

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
        self._record(data_term, prior, w, loglik, group)
        return (loss, {"responsibilities": w, "loglik": loglik}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        chunk = self.args.member_chunk_size
        if chunk is not None and chunk < self.ensemble.num_members:
            loss = self._chunked_training_step(model, inputs, chunk)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of an optimizer step: gradients are complete
            self._check_finite()
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
            data_term, w = renyi_loss(loglik, self.alpha)
        scale = 1.0 / self.current_gradient_accumulation_steps
        prior = torch.zeros((), device=loglik.device)
        order = [chunks[-1], *chunks[:-1]]  # the last chunk's graph exists already: backpropagate it first
        for i, (start, stop) in enumerate(order):
            with ensemble.members(start, stop):
                chunk_loglik = last if i == 0 else self.member_loglik(model, inputs)
                surrogate = -(w[start:stop] * chunk_loglik).sum() / loglik.shape[1]
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
        self._record(data_term, prior, w, loglik, group)
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

    def _record(self, data_term, prior, w, loglik, group) -> None:
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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Checkpoints hold the adapters only (``ensemble_config.json`` + ``adapters.safetensors``)."""
        if not self.args.should_save:  # the Trainer calls this on every process; one writer per folder
            return
        output_dir = output_dir or self.args.output_dir
        save_ensemble(self.ensemble, output_dir, state_dict)  # FSDP / DeepSpeed pass the gathered state dict
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # JSON, not the Trainer's pickled training_args.bin: nothing reads it back, and a pickle can run code on load.
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(self.ensemble, resume_from_checkpoint)


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


@torch.no_grad()
def routing_summary(trainer: RenyiTrainer, dataset: Dataset, group_names: list[str]) -> dict:
    """Mean responsibility and mean NLL of each member per group over ``dataset`` (``"all"`` if no groups).

    Each process scores every ``num_processes``-th example and the sums are all-reduced, so every process must
    call this (as ``finish_training`` does) and gets the same result.
    """
    args: RenyiConfig = trainer.args
    model = trainer.model  # unwrapped: no DDP collectives per batch
    model.eval()
    accelerator = trainer.accelerator
    shard = Subset(dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = DataLoader(shard, batch_size=args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    names = group_names or ["all"]
    K = trainer.ensemble.num_members
    resp, nll, count = torch.zeros(len(names), K), torch.zeros(len(names), K), torch.zeros(len(names))
    bar = tqdm(loader, desc="routing summary", disable=args.disable_tqdm or not trainer.is_world_process_zero())
    for batch in bar:
        group = batch.pop("group")  # [B]
        if not group_names:
            group = torch.zeros_like(group)
        with torch.no_grad():
            _, w, loglik = trainer.data_term(model, trainer._prepare_inputs(batch))
        valid = group >= 0  # examples without a group count in no row
        group, w, loglik = group[valid], w[:, valid].T.float().cpu(), loglik[:, valid].T.float().cpu()
        resp.index_add_(0, group, w)
        nll.index_add_(0, group, -loglik)
        count.index_add_(0, group, torch.ones(len(group)))
    trainer._metrics["eval"].clear()  # data_term recorded these batches as eval metrics; they are not an evaluation
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(torch.cat([resp, nll, count[:, None]], 1).to(args.device), "sum").cpu()
        resp, nll, count = sums[:, :K], sums[:, K:-1], sums[:, -1]
    count = count.clamp(min=1)[:, None]
    return {
        "routing": {name: row.tolist() for name, row in zip(names, resp / count, strict=True)},
        "member_group_nll": {name: row.tolist() for name, row in zip(names, nll / count, strict=True)},
    }
