"""alpha-Renyi DPO: the Bradley-Terry likelihood of each member, with one shared reference forward.

For member k, ``h_k = beta * [(log pi_k(y_w|x) - log ref(y_w|x)) - (log pi_k(y_l|x) - log ref(y_l|x))]`` and
``L[k, b] = log sigmoid(h_k)`` enters the same ``renyi_loss``; with K = 1 this is exactly TRL's sigmoid DPO
loss. The reference is the base model with adapters disabled, run once per batch on the 2B rows (never K
times), or, with ``reference="initial"``, each member's own starting adapter, held as frozen stacked tensors
inside the same layers (no second model): one no-grad pass over the K*2B rows, so that the log-ratios are
exactly zero at step 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F

from renyi_lora.config import DPOConfig
from renyi_lora.data.preference import PreferenceCollator, load_preference_dataset
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.likelihoods import sequence_loglik
from renyi_lora.objective import renyi_loss
from renyi_lora.training.trainer import RenyiTrainer


def preference_loglik(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry log-likelihood of each member.

    Args:
        policy_chosen, policy_rejected: ``[K, B]`` member sequence log-probs of the chosen / rejected completion.
        ref_chosen, ref_rejected: ``[B]`` (shared reference) or ``[K, B]`` (per-member reference).
        beta: DPO temperature.

    Returns:
        ``(L, h)``: ``L = log sigmoid(h)`` and the implicit reward margins ``h``, both ``[K, B]``.
    """
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return F.logsigmoid(h), h


def _sequence_logps(model, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[K, 2B]`` summed completion log-probs of the chosen-then-rejected rows (K = 1 when disabled)."""
    token = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    return sequence_loglik(token, inputs["labels"])  # float32 under any autocast


class RenyiDPOTrainer(RenyiTrainer):
    """DPO with K members: chosen and rejected go through the ensemble in one forward. Takes what ``RenyiTrainer``
    takes (``args``: a ``DPOConfig``; data in TRL's preference format)."""

    collator_class = PreferenceCollator
    dataset_loader = staticmethod(load_preference_dataset)

    def __init__(self, model, args: DPOConfig | None = None, *rest, adapters: str | None = None, **kwargs):
        args = args if args is not None else self.default_config()
        if args.reference == "initial" and not adapters and not isinstance(model, LoraEnsemble):
            raise ValueError("--reference initial needs --adapters DIR (the saved ensemble to start from)")
        super().__init__(model, args, *rest, adapters=adapters, **kwargs)
        if args.reference == "initial":
            self.ensemble.freeze_reference()

    @staticmethod
    def default_config() -> DPOConfig:
        return DPOConfig(output_dir="renyi-lora-output")

    def _reference(self, model, inputs: dict) -> torch.Tensor:
        """Reference log-probs: ``[K, 2B]`` ("initial", the members that run) or ``[2B]`` ("base", computed once
        per batch and kept in ``inputs``, so member chunks share it too)."""
        if self.args.reference == "initial":
            with torch.no_grad(), self.ensemble.reference_adapters():
                return _sequence_logps(model, inputs)  # each member's own starting adapter
        if "_reference_logps" not in inputs:
            with torch.no_grad(), self.ensemble.adapters_disabled():
                inputs["_reference_logps"] = _sequence_logps(model, inputs)[0]  # one base forward for all members
        return inputs["_reference_logps"]

    def target_counts(self, inputs: dict) -> None:
        return None  # the likelihood is of a preference, not of tokens

    def member_loglik(self, model, inputs: dict) -> torch.Tensor:
        policy = _sequence_logps(model, inputs)  # [K, 2B]
        B = policy.shape[1] // 2
        reference = self._reference(model, inputs)
        return preference_loglik(policy[:, :B], policy[:, B:], reference[..., :B], reference[..., B:],
                                 beta=self.args.beta)[0]

    def data_term(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        args: DPOConfig = self.args
        policy = _sequence_logps(model, inputs)  # [K, 2B]
        B = policy.shape[1] // 2
        reference = self._reference(model, inputs)
        loglik, h = preference_loglik(policy[:, :B], policy[:, B:], reference[..., :B], reference[..., B:],
                                      beta=args.beta)
        loss, w = renyi_loss(loglik, self.alpha, self.log_mixture_weights, self.args.routing_floor)
        self._record_preferences(policy, reference, h, loglik)
        return loss, w, loglik

    @torch.no_grad()
    def _record_preferences(self, policy, reference, h, loglik) -> None:
        args: DPOConfig = self.args
        if not self._keeps_metrics:
            return
        metrics = self._metrics["train" if self.model.training else "eval"]
        B = h.shape[1]
        rewards = args.beta * (policy - reference)  # [K, 2B]
        chosen, rejected = rewards[:, :B], rewards[:, B:]
        member_accuracy = (h > 0).float().mean(1)  # [K]
        mixture_prob = loglik.exp().mean(0)  # [B]: uniform-weight mixture of member preference probabilities
        values = {
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (mixture_prob > 0.5).float().mean(), "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": policy[:, :B].mean(), "logps/rejected": policy[:, B:].mean(),
            "rewards/accuracy_spread": member_accuracy.var(unbiased=False),
        }
        for k in range(h.shape[0]):
            values.update({
                f"member_{k}/rewards/chosen": chosen[k].mean(), f"member_{k}/rewards/rejected": rejected[k].mean(),
                f"member_{k}/rewards/margins": (chosen[k] - rejected[k]).mean(),
                f"member_{k}/rewards/accuracies": member_accuracy[k],
            })
        for key, value in values.items():  # this process's values; `log` averages over steps and processes
            metrics[key].append(value.detach().float())
