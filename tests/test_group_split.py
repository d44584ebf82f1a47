"""Members split by group with the default flags, judged on held-out prompt combinations (issue #13, item 10).

Data (``conftest.answer_records``): every group answers the same ten questions with its own random words, each
example holds several answers of one group to a combination of questions, and every combination occurs in every
group. Training sets only what a user must give: the model (a tiny random Llama), the data, K = the number of
groups, alpha = 1, the learning rate and the steps; everything else, the alpha warm-up included, is RenyiConfig's
default. A split is judged where it matters, on question combinations never trained on: the group x member matrix
of mean responsibilities over held-out examples must give every group a different owner, and its purity (the mean
over groups of the owner's share) must exceed 0.9. On the training rows a split by example looks as good.

Measured on this machine, seeds 0-9 (docs/specialisation.md has the other data sets and warm-up lengths):

- two groups, two answers per example: the default (alpha raised over the first half of training) splits 9 of 10
  seeds (seed 0 ends split by example: each member owns half of every group's training rows);
- four groups, three answers per example: the default splits 9 of 10 (seed 2: two members share a group), without
  warm-up 1 of 5 (seed 2 the one; in the others a member takes two groups);
- four groups with two answers per example split in only 6 of 10 even with the warm-up: not asserted here, and
  documented as a case where a split cannot be expected.

The default suite trains seeds 1 and 3 of each setting (four runs). Behind ``-m slow``: all ten seeds of each
setting (about 5 min), and the four-group setting without warm-up over seeds 0-4, where fewer seeds must split than
with the default (measured: 1 of 5 against 4 of 5).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import answer_records, make_trainer

NUM_QUESTIONS, REPEATS, STEPS, HELD_OUT = 10, 6, 600, 40
# (number of groups, answers per example): the settings the default is asserted on.
SETTINGS = {"two groups": (2, 2), "four groups": (4, 3)}


def split_records(seed: int, groups: int, answers: int) -> tuple[list[dict], list[dict]]:
    """Training records of ``groups`` groups and, for up to HELD_OUT question combinations that no training row asks
    (in any order), one held-out record per group."""
    word_rng = random.Random(seed + 7)

    def other_words(known: dict) -> dict:  # groups C, D: their own random words for the same questions
        return {q: "".join(word_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4)) for q in known["A"]}

    extra = {name: other_words for name in "CD"[: groups - 2]}
    train = answer_records(seed, answers, NUM_QUESTIONS, REPEATS, derived=extra)
    words: dict[str, dict[str, str]] = {}
    for record in train:
        for question, word in zip(record["prompt"][:-1].split(","), record["completion"][:-1].split(","), strict=True):
            words.setdefault(record["group"], {})[question] = word
    asked = {frozenset(record["prompt"][:-1].split(",")) for record in train}
    fresh = [c for c in itertools.combinations(sorted(words["A"]), answers) if frozenset(c) not in asked]
    random.Random(seed + 1000).shuffle(fresh)
    held_out = [{"prompt": ",".join(c) + ":", "completion": ",".join(words[g][q] for q in c) + ".", "group": g}
                for c in fresh[:HELD_OUT] for g in words]
    return train, held_out


def held_out_routing(tmp_path, seed: int, groups: int, answers: int, **flags) -> torch.Tensor:
    """Train with the default flags (plus ``flags``); the group x member mean responsibility on held-out rows [G, K]."""
    train, held_out = split_records(seed, groups, answers)
    # What a user must give: model, data, K, alpha, learning rate, steps; the rest is RenyiConfig's default
    # (``conftest.make_trainer`` only keeps the run quiet and on the CPU).
    run = make_trainer(tmp_path, train, max_length=64, model_seed=seed, hidden_size=128, num_members=groups,
                       alpha=1.0, learning_rate=3e-3, max_steps=STEPS, seed=seed, logging_strategy="no", **flags)
    held_out_set = run.load(held_out, "held_out.jsonl")
    run.trainer.train()
    routing = run.trainer.routing_summary(held_out_set)["routing"]  # at the target alpha
    return torch.tensor(list(routing.values()))  # [G, K]


def splits_by_group(routing: torch.Tensor) -> bool:
    """Every group has its own owning member and the owners' mean share (purity) exceeds 0.9."""
    owners = routing.argmax(1)
    return len(set(owners.tolist())) == len(owners) and routing.max(1).values.mean().item() > 0.9


@pytest.fixture(scope="module")
def routing_of(tmp_path_factory):
    """``held_out_routing`` trained once per (seed, setting, warm-up flag) in this module: the slow tests share runs."""
    runs = {}

    def routing(seed: int, setting: str, **flags) -> torch.Tensor:
        key = (seed, setting, tuple(sorted(flags.items())))
        if key not in runs:
            runs[key] = held_out_routing(tmp_path_factory.mktemp("run"), seed, *SETTINGS[setting], **flags)
        return runs[key]

    return routing


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("seed", [1, 3])
def test_default_flags_split_by_group_on_held_out_combinations(routing_of, one_thread, setting, seed):
    routing = routing_of(seed, setting)
    assert splits_by_group(routing), routing


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_default_flags_split_by_group_in_nine_of_ten_seeds(routing_of, one_thread, setting):
    routings = [routing_of(seed, setting) for seed in range(10)]
    assert sum(map(splits_by_group, routings)) >= 9, routings


@pytest.mark.slow
def test_without_warmup_four_groups_split_in_fewer_seeds(routing_of, one_thread):
    """Why the default exists, as a rate over seeds 0-4 rather than one seed's fate: with alpha = 1 from the first
    step, routing sharpens on the members' early random differences and a member often ends up with two groups.
    Measured: without warm-up 1 of 5 seeds split (seed 2), with the default 4 of 5 (all but seed 2, from the ten
    seeds above)."""
    default = [splits_by_group(routing_of(seed, "four groups")) for seed in range(5)]
    without = [splits_by_group(routing_of(seed, "four groups", alpha_warmup_steps=0)) for seed in range(5)]
    assert sum(without) < sum(default), (
        f"without warm-up {sum(without)} of 5 seeds split, with it {sum(default)}: the limit that "
        "docs/specialisation.md gives as the default's reason is gone; update the page (and this test)")
