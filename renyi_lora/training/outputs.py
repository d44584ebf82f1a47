"""What a run saves and publishes: checkpoints (the adapters), and at the end, besides the ensemble, each member as a
PEFT adapter (``peft/member_k``), ``train_summary.json`` (data, metrics, configuration, routing table) and the model
card (``README.md``), uploaded to the Hub on request.

``RenyiTrainer`` takes the saving methods from ``SavingMixin``; its ``save_model()`` calls ``write_outputs`` on every
process (the routing summary is all-reduced), and only the first process writes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm
from transformers import Trainer

from renyi_lora.io import export_all_peft, load_adapter_weights, save_ensemble
from renyi_lora.training.model_card import SUMMARY_NAME, push_to_hub, write_model_card

logger = logging.getLogger(__name__)


def _last_log(trainer: Trainer, key: str) -> dict[str, Any]:
    """The last ``log_history`` entry holding ``key`` (the Trainer's final train metrics, the last evaluation)."""
    return next((dict(entry) for entry in reversed(trainer.state.log_history) if key in entry), {})


@torch.no_grad()
def routing_summary(trainer: Trainer, dataset: Dataset) -> dict:
    """Mean responsibility and mean NLL of each member per group over ``dataset`` (``"all"`` if there are no groups),
    and each member's mean responsibility over the examples with a group (``load``, [K]).

    Each process scores every ``num_processes``-th example and the sums are all-reduced, so every process must
    call this (as ``save_model`` does) and gets the same result.
    """
    args = trainer.args
    group_names = list(getattr(dataset, "group_names", None) or trainer.group_names)
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
    trainer._metrics["eval"].clear()  # data_term recorded these batches as eval metrics, not an evaluation
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(torch.cat([resp, nll, count[:, None]], 1).to(args.device), "sum").cpu()
        resp, nll, count = sums[:, :K], sums[:, K:-1], sums[:, -1]
    load = resp.sum(0) / count.sum().clamp(min=1)  # [K] mean responsibility over every example
    count = count.clamp(min=1)[:, None]
    return {
        "load": load.tolist(),
        "routing": {name: row.tolist() for name, row in zip(names, resp / count, strict=True)},
        "member_group_nll": {name: row.tolist() for name, row in zip(names, nll / count, strict=True)},
    }


def training_summary(trainer: Trainer) -> dict[str, Any]:
    """The run in numbers: data, final metrics, configuration, skipped steps and the routing table (see
    ``RenyiTrainer.routing_summary``; at K = 1, or with ``routing_summary=False``, no second pass is made)."""
    args, dataset = trainer.args, trainer.train_dataset
    summary = {
        "num_examples": len(dataset),
        "num_truncated": getattr(dataset, "num_truncated", 0),
        "groups": trainer.group_names,
        "metrics": _last_log(trainer, "train_runtime"),
        "config": {key: value for key, value in asdict(args).items() if isinstance(value, (int, float, str, list))},
        "num_nonfinite_skips": len(trainer.nonfinite_skipped_steps),
        "nonfinite_skipped_steps": trainer.nonfinite_skipped_steps,
    }
    evaluation = _last_log(trainer, "eval_loss")
    if evaluation:
        summary["eval"] = evaluation
    if trainer.ensemble.num_members == 1:  # every example goes to the one member: nothing to measure
        summary["routing"] = {name: [1.0] for name in trainer.group_names or ["all"]}
    elif args.routing_summary:
        summary.update(trainer.routing_summary())
    return summary


def write_outputs(trainer: Trainer, output_dir: str | Path) -> dict[str, Any]:
    """Write the PEFT exports, ``train_summary.json`` and the model card next to the saved ensemble; returns the
    summary (on every process)."""
    summary = training_summary(trainer)
    if trainer.is_world_process_zero():
        out = Path(output_dir)
        export_all_peft(trainer.ensemble, out / "peft")
        (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        info = trainer.card_info
        write_model_card(out, info["base_model"] or "unknown", datasets=info["datasets"], command=info["command"],
                         repo_id=trainer.args.hub_model_id if trainer.args.push_to_hub else None)
        logger.info("wrote %s: the ensemble, peft/, %s and README.md", out, SUMMARY_NAME)
    return summary


class SavingMixin:
    """The saving side of ``RenyiTrainer`` (a ``transformers.Trainer``): adapters-only checkpoints, the final outputs,
    the upload to the Hub."""

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``_internal_call``): the adapters. Called by the user after ``train()``: the run's outputs
        (``renyi_lora.training.outputs``): ensemble, PEFT exports, ``train_summary.json``, model card; pushed to the
        Hub with ``push_to_hub``. Every process must call it (the routing summary is all-reduced)."""
        super().save_model(output_dir, _internal_call=True)
        if not _internal_call:
            self.summary = write_outputs(self, output_dir or self.args.output_dir)
            if self.args.push_to_hub:
                self.push_to_hub()

    def push_to_hub(self, commit_message: str | None = "End of training", **kwargs) -> str | None:
        """Upload ``output_dir`` (ensemble, PEFT members, card, summary; no checkpoints) to ``--hub_model_id``."""
        if not self.is_world_process_zero():
            return None
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).name
        return push_to_hub(self.args.output_dir, repo_id, token=self.args.hub_token,
                           private=self.args.hub_private_repo, commit_message=commit_message)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No repository is created before training: ``push_to_hub`` creates it when the outputs exist."""

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints are not pushed (the final outputs are; see ``save_model``)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(self.ensemble, resume_from_checkpoint)
