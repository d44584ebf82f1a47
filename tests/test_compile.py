"""``torch.compile`` traces the training forward of SFT and DPO as one graph: no graph break, no data-dependent shape.

``torch._dynamo.explain`` traces without compiling, so this stays cheap; that the traced graph computes the eager
numbers is checked through the Trainer (``test_member_chunks.test_torch_compile_flag_trains_the_same_adapters``) and
on every architecture (``test_architectures``, ``fixed-shapes``).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.objective import renyi_loss, routed_loss
from renyi_lora.training.dpo import _sequence_logps, preference_loglik

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ensemble(tiny_llama) -> LoraEnsemble:
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3, rank=4))
    ensemble.freeze_reference()
    return ensemble.train()


def batch(rows: int) -> dict[str, torch.Tensor]:
    """Right-padded rows ``[rows, 12]``: a 5-token prompt, then targets; the last row ends 3 tokens early."""
    input_ids = torch.randint(4, 60, (rows, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :5] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def assert_one_graph(function, inputs: dict[str, torch.Tensor]) -> None:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(function)(inputs)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("routing_level", ["sequence", "token"])
def test_sft_forward_and_objective_have_no_graph_break(ensemble, routing_level):
    """What ``RenyiTrainer.data_term`` runs: the member token log-likelihoods and ``routed_loss``."""

    def sft(inputs):
        token = ensemble(inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"])  # [K, B, T]
        return routed_loss(token.float(), inputs["labels"] != IGNORE_INDEX, 1.0, routing_level)[0]

    assert_one_graph(sft, batch(2))


@pytest.mark.parametrize("reference", ["base", "initial"])
def test_dpo_forward_and_objective_have_no_graph_break(ensemble, reference):
    """What ``RenyiDPOTrainer.data_term`` runs: the policy forward over chosen-then-rejected rows, the no-grad
    reference forward (adapters disabled, or each member's frozen starting adapter) and the Bradley-Terry loss."""

    def dpo(inputs):
        policy = _sequence_logps(ensemble, inputs)  # [K, 2B]
        switch = ensemble.adapters_disabled() if reference == "base" else ensemble.reference_adapters()
        with torch.no_grad(), switch:
            ref = _sequence_logps(ensemble, inputs)  # [1, 2B] or [K, 2B]
        B = policy.shape[1] // 2
        loglik, _ = preference_loglik(policy[:, :B], policy[:, B:], ref[..., :B], ref[..., B:], beta=0.1)
        return renyi_loss(loglik, 1.0)[0]

    assert_one_graph(dpo, batch(4))
