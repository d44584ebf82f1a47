"""Behavioural tests of the method (docs/specialisation.md), K = 2, tiny Llama, seeded.

(a) Identifiable groups (each example carries four answers of its group, every prompt in both groups):
    alpha = 1 splits the members by group; alpha = 0 keeps them generalists.
(b) One conflicting answer per example (representable as 50/50): alpha = 4 routes every example sharply
    although the group matrix need not split; small alpha keeps a member on the 50/50 answer.
(c) Members with tied A stay identical, so A must be drawn per member.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import answer_records, make_trainer

from renyi_lora.data.sft import SFTCollator
from renyi_lora.objective import responsibilities


def conflicting_records(answers_per_example: int, seed: int, num_prompts: int = 20, repeats: int = 8) -> list[dict]:
    """Two groups, A and B, answer the same questions with different random words (``conftest.answer_records``)."""
    return answer_records(seed, answers_per_example, num_prompts, repeats)


def tie_a(ensemble) -> None:
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_A[1] = layer.lora_A[0]


def train_tiny(tmp_path, records, alpha: float, seed: int, steps: int, tie: bool = False):
    """Train K = 2 members on ``records`` (``conftest.make_trainer``); returns (trainer, dataset, routing summary)."""
    run = make_trainer(tmp_path, records, max_length=64, model_seed=seed, hidden_size=128, setup=tie_a if tie else None,
                       num_members=2, rank=8, lora_alpha=16, init_seed=seed, alpha=alpha, max_steps=steps,
                       learning_rate=3e-3, lr_scheduler_type="constant", per_device_train_batch_size=16,
                       per_device_eval_batch_size=64, seed=seed, logging_steps=10_000)
    run.trainer.train()
    return run.trainer, run.dataset, run.trainer.routing_summary(run.dataset)


# Seed 0 in the default suite, seeds 1 and 2 behind -m slow (the suite's 10-minute budget).
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_identifiable_groups_split_at_alpha_one(tmp_path, seed):
    _, _, summary = train_tiny(tmp_path, conflicting_records(4, seed), alpha=1.0, seed=seed, steps=300)
    routing = torch.tensor([summary["routing"]["A"], summary["routing"]["B"]])  # [G, K]
    owner = routing.argmax(1)
    assert routing.max(1).values.min() > 0.9, summary["routing"]
    assert owner[0] != owner[1], summary["routing"]


def test_alpha_zero_keeps_generalists(tmp_path):
    _, _, summary = train_tiny(tmp_path, conflicting_records(4, 0), alpha=0.0, seed=0, steps=300)
    nll_a, nll_b = summary["member_group_nll"]["A"], summary["member_group_nll"]["B"]
    for k in range(2):
        assert abs(nll_a[k] - nll_b[k]) <= 0.1 * max(nll_a[k], nll_b[k]), (nll_a, nll_b)
    # Both members did learn both groups: an untrained member scores ~90 nats, a specialist's miss ~130.
    assert max(nll_a + nll_b) < 10.0


def _example_routing(trainer, dataset, alpha):
    batch = SFTCollator(0)(dataset.examples)
    batch.pop("group")
    with torch.no_grad():
        _, _, loglik = trainer.data_term(trainer.model.eval(), batch)
    return responsibilities(loglik, alpha), loglik


def test_single_answer_conflict_routes_sharply_at_alpha_four(tmp_path):
    trainer, dataset, summary = train_tiny(tmp_path, conflicting_records(1, 0, repeats=4), alpha=4.0, seed=0, steps=300)
    w, _ = _example_routing(trainer, dataset, 4.0)
    assert w.max(0).values.mean() > 0.9
    # Which member owns which answer is a coin flip per prompt: the group matrix is not asserted to split.


def test_single_answer_conflict_keeps_a_fifty_fifty_member_at_small_alpha(tmp_path):
    trainer, dataset, summary = train_tiny(tmp_path, conflicting_records(1, 0, repeats=4), alpha=0.2, seed=0, steps=300)
    w, _ = _example_routing(trainer, dataset, 0.2)
    nll_a, nll_b = summary["member_group_nll"]["A"], summary["member_group_nll"]["B"]
    for k in range(2):  # both answers at about 1/2: NLL near log 2 on each group (a side-taker pays ~15 nats)
        assert abs(nll_a[k] - nll_b[k]) < 0.3 and max(nll_a[k], nll_b[k]) < math.log(2) + 0.4, (nll_a, nll_b)
    assert w.max(0).values.mean() < 0.6


def test_tied_a_members_stay_identical(tmp_path):
    trainer, _, summary = train_tiny(tmp_path, conflicting_records(4, 0), alpha=1.0, seed=0, steps=30, tie=True)
    for layer in trainer.ensemble.lora_layers().values():
        assert layer.lora_B.abs().sum() > 0
        assert torch.equal(layer.lora_B[0], layer.lora_B[1])
    assert summary["routing"]["A"] == [0.5, 0.5]
