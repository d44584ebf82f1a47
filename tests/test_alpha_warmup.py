"""--alpha_warmup_steps: alpha ramps linearly from 0 during training; evaluation and later steps use --alpha.

Behaviour: four groups built from two conventions (answer words A or B, lower or upper case), every prompt in all
four, four answers per example, K = 4, alpha = 1, 300 steps. Case is decided once per example in practice (after
the first letter the rest follows), so early on a member can win two groups at once and another none. Measured on
this machine, seeds 0-4: without warm-up 0 of 5 end with one member per group (in each, a member owns two groups;
seed 1 uses two members only); with alpha raised over the first 120 steps 5 of 5 do (60 steps: 2 of seeds 0-2).
The default suite trains seed 0 with the warm-up; seeds 1-2 and the comparison with no warm-up over seeds 0-4 run
behind ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import answer_records, make_trainer
from transformers import HfArgumentParser

from renyi_lora.config import DPOConfig
from renyi_lora.training.trainer import RenyiConfig

RECORDS = [{"prompt": f"q{i}:", "completion": f" a{i % 3}b", "group": f"g{i % 2}"} for i in range(8)]
# Three members on conftest's tiny Llama (seed 1) whose lora_B start random, so that the routing is not uniform at
# alpha > 0 (``tiny_trainer``).
SETTINGS = {"model_seed": 1, "num_members": 3, "init_seed": 0, "lora_b_std": 1.0, "max_steps": 4}


def test_alpha_ramps_from_zero_and_evaluation_uses_the_target(tiny_trainer):
    run = tiny_trainer(RECORDS, **SETTINGS, alpha=4.0, alpha_warmup_steps=8)
    trainer, batch = run.trainer, run.batch()
    trainer.model.train()
    seen = []
    for step in (0, 2, 8, 20):
        trainer.state.global_step = step
        seen.append(trainer.alpha)
        _, w, _ = trainer.data_term(trainer.model, batch)
        if step == 0:  # alpha = 0: uniform responsibilities, every member fits every example
            torch.testing.assert_close(w, torch.full_like(w, 1 / 3))
    assert seen == [0.0, 1.0, 4.0, 4.0]
    trainer.state.global_step = 0
    trainer.model.eval()
    assert trainer.alpha == 4.0
    _, w, _ = trainer.data_term(trainer.model, batch)
    assert w.max() > 0.9  # the sharp target routing, not the ramp's uniform one


def test_without_warmup_alpha_is_constant(tiny_trainer):
    trainer = tiny_trainer(RECORDS, **SETTINGS, alpha=2.0).trainer
    trainer.model.train()
    assert trainer.alpha == 2.0


def test_warmup_to_winner_take_all_reaches_one_halfway_and_inf_at_the_end(tiny_trainer):
    # alpha = s / (N - s): alpha / (1 + alpha) rises linearly, so the ramp spends its first half below the mixture.
    run = tiny_trainer(RECORDS, **SETTINGS, alpha=float("inf"), alpha_warmup_steps=8)
    trainer, batch = run.trainer, run.batch()
    trainer.model.train()
    seen = []
    for step in (0, 2, 4, 6, 7, 8, 20):
        trainer.state.global_step = step
        seen.append(trainer.alpha)
        _, w, _ = trainer.data_term(trainer.model, batch)
        if step == 0:
            torch.testing.assert_close(w, torch.full_like(w, 1 / 3))
    assert seen == [0.0, 2 / 6, 1.0, 3.0, 7.0, float("inf"), float("inf")]
    assert set(w.flatten().tolist()) <= {0.0, 1.0}  # one-hot from step N on


def test_bad_warmup_is_refused():
    with pytest.raises(ValueError, match="alpha_warmup_steps"):
        RenyiConfig(output_dir="x", alpha_warmup_steps=-1)


def test_default_warmup_ramps_over_half_of_training(tiny_trainer):
    trainer = tiny_trainer(RECORDS, **SETTINGS, alpha=1.0).trainer  # the default --alpha_warmup_ratio 0.5
    trainer.model.train()
    trainer.state.max_steps = 10  # as Trainer.train sets it: the ratio is of the run's length
    seen = []
    for step in (0, 1, 4, 5, 9):
        trainer.state.global_step = step
        seen.append(trainer.alpha)
    assert seen == pytest.approx([0.0, 0.2, 0.8, 1.0, 1.0])


def test_warmup_steps_override_the_ratio_and_zero_turns_it_off():
    assert RenyiConfig(output_dir="x").alpha_warmup_length(301) == 151  # rounded up, like the Trainer's warm-up
    assert RenyiConfig(output_dir="x", alpha_warmup_ratio=0.1, alpha_warmup_steps=7).alpha_warmup_length(300) == 7
    assert RenyiConfig(output_dir="x", alpha_warmup_steps=0).alpha_warmup_length(300) == 0
    assert RenyiConfig(output_dir="x", alpha_warmup_ratio=0.0).alpha_warmup_length(300) == 0
    (parsed,) = HfArgumentParser(RenyiConfig).parse_args_into_dataclasses(["--output_dir", "x",
                                                                           "--alpha_warmup_steps", "0"])
    assert parsed.alpha_warmup_length(300) == 0  # the flag given as 0 is "off", not "not given"
    assert DPOConfig(output_dir="x").alpha_warmup_length(300) == 0  # DPO starts from split members: off


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_bad_warmup_ratio_is_refused(ratio):
    with pytest.raises(ValueError, match="alpha_warmup_ratio"):
        RenyiConfig(output_dir="x", alpha_warmup_ratio=ratio)


def factorial_records(seed: int) -> list[dict]:
    """Groups A, B (different random answer words) and C, D (A's and B's words upper-cased)."""
    upper = {"C": lambda answers: {q: w.upper() for q, w in answers["A"].items()},
             "D": lambda answers: {q: w.upper() for q, w in answers["B"].items()}}
    return answer_records(seed, answers_per_example=4, num_prompts=16, repeats=6, derived=upper)


def group_owners(tmp_path, seed: int, warmup: int) -> tuple[list[int], list[float]]:
    """Train K = 4 at alpha = 1; each group's owning member and its mean responsibility."""
    run = make_trainer(tmp_path, factorial_records(seed), max_length=64, model_seed=seed, hidden_size=128,
                       num_members=4, rank=8, lora_alpha=16, init_seed=seed, alpha=1.0, alpha_warmup_steps=warmup,
                       max_steps=300, learning_rate=3e-3, lr_scheduler_type="constant",
                       per_device_train_batch_size=16, per_device_eval_batch_size=64, seed=seed,
                       logging_steps=10_000)
    run.trainer.train()
    routing = torch.tensor([run.trainer.routing_summary(run.dataset)["routing"][g] for g in "ABCD"])
    return routing.argmax(1).tolist(), routing.max(1).values.tolist()


@pytest.fixture(scope="module")
def owners_of(tmp_path_factory):
    """``group_owners`` trained once per (seed, warm-up) in this module: the slow rate reuses the default runs."""
    runs = {}

    def owners(seed: int, warmup: int) -> tuple[list[int], list[float]]:
        if (seed, warmup) not in runs:
            runs[seed, warmup] = group_owners(tmp_path_factory.mktemp(f"seed{seed}-warmup{warmup}"), seed, warmup)
        return runs[seed, warmup]

    return owners


def one_member_per_group(owners: list[int], sharpness: list[float]) -> bool:
    """A permutation (no member owns two groups, none is unused), each group routed sharply to its owner."""
    return sorted(owners) == [0, 1, 2, 3] and min(sharpness) > 0.9


# Seed 0 in the default suite, seeds 1 and 2 (and the rate over seeds 0-4 below) behind -m slow.
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_warmup_gives_every_group_its_own_member(owners_of, seed):
    owners, sharpness = owners_of(seed, 120)
    assert sorted(owners) == [0, 1, 2, 3], owners  # a permutation: no member owns two groups, none is unused
    assert min(sharpness) > 0.9, sharpness


@pytest.mark.slow
def test_warmup_gives_one_member_per_group_in_more_seeds_than_none(owners_of):
    """The failure the warm-up exists for, as a rate over seeds 0-4 rather than one seed's fate (a change in the
    random stream flips single seeds). Measured: with the warm-up 5 of 5 seeds give one member per group, without it
    0 of 5 (in each, one member owns two groups)."""
    with_warmup = [one_member_per_group(*owners_of(seed, 120)) for seed in range(5)]
    without = [one_member_per_group(*owners_of(seed, 0)) for seed in range(5)]
    assert sum(with_warmup) >= 4, with_warmup
    assert sum(without) < sum(with_warmup), (
        f"without warm-up {sum(without)} of 5 seeds split as often as with it: the limit that docs/specialisation.md "
        "gives as the warm-up's reason is gone; update the page (and this test)")
