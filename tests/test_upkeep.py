"""Member upkeep: the routing floor and negligible weights of the gradient, dead members revived as noisy copies,
learned mixture weights (issue #19: members collapse on long completions and dead members make CPU steps slow).

The behavioural tests train on generated survey-like data whose completions are long and carry several decisions:
every example answers the same four to six 20-character questions (100-150 target tokens) with yes/no, and each of
four opinion types has its own answers. Everything the members must learn first is shared text, and on such text the
member that starts fastest leads by hundreds of nats: with the alpha warm-up alone, one member takes every example by
alpha ~ 0.3 and the other three stop learning for good (measured: shares 0 / 0 / 1 / 0, their NLL 455-506 nats
against 49).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_trainer

from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.objective import gradient_weights, renyi_loss, routed_loss
from renyi_lora.training.trainer import RenyiConfig, RenyiTrainer
from renyi_lora.training.upkeep import clone_member, dead_members, split_weights


def test_gradient_weights_floor_is_the_gradient_of_the_mixed_objective():
    """floor f: the gradient of (1 - f) l_alpha + f l_0, by autograd of that very mixture."""
    loglik = torch.tensor([[-3.0, -40.0], [-5.0, -2.0], [-9.0, -1.0]], requires_grad=True)
    log_pi = torch.tensor([0.5, 0.3, 0.2]).log()
    loss, w = renyi_loss(loglik, 1.0, log_pi, floor=0.2)
    (grad,) = torch.autograd.grad(loss, loglik)
    reference = torch.tensor([[-3.0, -40.0], [-5.0, -2.0], [-9.0, -1.0]], requires_grad=True)
    mixed = 0.8 * renyi_loss(reference, 1.0, log_pi)[0] + 0.2 * renyi_loss(reference, 0.0, log_pi)[0]
    (expected,) = torch.autograd.grad(mixed, reference)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss, renyi_loss(reference, 1.0, log_pi)[0].detach())  # the value is l_alpha's
    torch.testing.assert_close(gradient_weights(w, 0.2, log_pi), 0.8 * w + 0.2 * log_pi.exp()[:, None])


def test_negligible_weights_give_exact_zero_gradients_not_subnormal_ones():
    loglik = torch.tensor([[-1.0], [-80.0]], requires_grad=True)  # member 1: w = e^-79 ~ 5e-35, a subnormal product
    loss, w = renyi_loss(loglik, 1.0)
    assert 0 < w[1, 0] < 1e-30
    (grad,) = torch.autograd.grad(loss * 1e-5, loglik)  # a downstream factor: w * 1e-5 would be subnormal
    assert grad[1, 0].item() == 0.0 and grad[0, 0].item() == pytest.approx(-1e-5)


def test_a_member_far_behind_gets_exact_zero_gradients_in_a_real_backward_pass(tiny_llama):
    """Through the whole model: member 1 trails by hundreds of nats, so its weight (~1e-100) is negligible; every
    gradient of it is exactly 0 and no gradient anywhere is subnormal (before: ~1e-35-sized products, slow on CPUs)."""
    torch.manual_seed(0)
    ensemble = LoraEnsemble(tiny_llama, RenyiConfig(output_dir="unused", num_members=2, use_cpu=True,
                                                    report_to="none").ensemble_config())
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(0, 0.1)  # both members differ from the base and get gradients in A and B
    input_ids = torch.randint(5, 60, (3, 40))
    labels = input_ids.clone()
    labels[:, :5] = -100
    target = labels != -100
    token = ensemble(input_ids, torch.ones_like(input_ids), labels=labels)  # [K, B, T]
    token = token - torch.tensor([0.0, 2.0])[:, None, None] * target  # member 1 trails by ~70 nats an example
    loss, w, _ = routed_loss(token, target, alpha=1.0)
    assert 0 < w[1].min() and w[1].max() < 1e-25  # negligible, yet not 0 in float32
    loss.backward()
    gradients = [p.grad for p in ensemble.lora_parameters()]
    tiny = torch.finfo(torch.float32).tiny
    assert all(g[1].eq(0).all() for g in gradients)
    assert all(not ((g != 0) & (g.abs() < tiny)).any() for g in gradients)
    assert any(g[0].ne(0).any() for g in gradients)  # member 0 learns


def test_dead_members_are_paired_with_the_most_loaded_and_spread_over_live_ones():
    assert dead_members(torch.tensor([0.5, 0.001, 0.499, 0.0]), 0.01) == [(3, 0), (1, 2)]
    assert dead_members(torch.tensor([0.97, 0.01, 0.01, 0.01]), 0.02) == [(1, 0), (2, 0), (3, 0)]
    assert dead_members(torch.tensor([0.3, 0.3, 0.4]), 0.01) == []
    assert dead_members(torch.tensor([0.3, 0.3, 0.4]), 0.0) == []
    torch.testing.assert_close(split_weights(torch.tensor([0.6, 0.1, 0.3]), [(1, 0)]),
                               torch.tensor([0.3, 0.3, 0.3]) / 0.9)


def test_clone_member_copies_parameters_with_relative_noise_and_the_optimizer_moments():
    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(3, 4, 5))
    optimizer = torch.optim.AdamW([parameter], lr=1e-2)
    parameter.sum().backward()
    optimizer.step()
    before = parameter.detach().clone()
    clone_member([parameter], optimizer.state, dead=2, source=0, noise=0.01,
                 generator=torch.Generator().manual_seed(0))
    difference = parameter[2] - before[0]
    rms = before[0].pow(2).mean().sqrt()
    assert 0.002 * rms < difference.pow(2).mean().sqrt() < 0.05 * rms  # near the source, not equal to it
    assert torch.equal(parameter[:2], before[:2])  # the others untouched
    for state in ("exp_avg", "exp_avg_sq"):
        moments = optimizer.state[parameter][state]
        assert torch.equal(moments[2], moments[0])


def survey_records(seed: int, n: int, types: int = 4, items: int = 6, noise: float = 0.1,
                   proportions: list[float] | None = None, opposite: bool = False) -> list[dict]:
    """Respondents of ``types`` opinion types (in ``proportions``) answering the same ``items`` long questions; with
    ``opposite`` (two types) the second type answers every question the other way."""
    rng = random.Random(seed)
    questions = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(20)) for _ in range(items)]
    stances = [[rng.random() < 0.5 for _ in range(items)] for _ in range(types)]
    if opposite:
        stances[1] = [not stance for stance in stances[0]]
    proportions = proportions or [1 / types] * types
    records = []
    for _ in range(n):
        kind = rng.choices(range(types), proportions)[0]
        lines = [f"{q}: {'yes' if stance != (rng.random() < noise) else 'no'}\n"
                 for q, stance in zip(questions, stances[kind], strict=True)]
        records.append({"prompt": "survey:\n", "completion": "".join(lines), "group": f"type{kind}"})
    return records


def train_survey(tmp_path, records: list[dict], seed: int, steps: int, hidden_size: int = 64, **flags
                 ) -> RenyiTrainer:
    trainer = make_trainer(tmp_path, records, max_length=256, model_seed=seed, hidden_size=hidden_size, alpha=1.0,
                           learning_rate=3e-3, max_steps=steps, seed=seed, per_device_train_batch_size=8,
                           logging_strategy="no", **flags).trainer
    trainer.train()
    return trainer


def member_shares(tmp_path, seed: int, **flags) -> torch.Tensor:
    """Train K = 4 with the default flags (plus ``flags``) on four opinion types; each member's share [K]."""
    records = survey_records(seed, 256, items=4)
    trainer = train_survey(tmp_path, records, seed, steps=150, num_members=4, hidden_size=32, **flags)
    routing = torch.tensor(list(trainer.routing_summary()["routing"].values()))  # [G, K]
    revived = sum("revived" in entry for entry in trainer.state.log_history)
    return routing.mean(0), revived


def test_no_member_dies_on_long_multi_decision_completions_with_default_flags(tmp_path):
    """Default flags (K = 4, warm-up, revival): every member keeps a share of the data, and revival is what keeps
    them. Measured, seed 0: shares 0.11 / 0.33 / 0.21 / 0.36 after 8 revivals; with --revive_threshold 0 the shares
    are 0 / 0 / 1 / 0 (and seed 1: 0.44 / 0.31 / 0.03 / 0.22)."""
    shares, revived = member_shares(tmp_path, 0)
    assert shares.min() > 0.02 and revived > 0, (shares, revived)  # twice the revival threshold


@pytest.mark.slow
def test_no_member_is_dead_at_the_end_over_seeds(tmp_path):
    """Seeds 1-4: no member ends below the revival threshold (0.01) over the whole training set."""
    for seed in range(1, 5):
        shares, _ = member_shares(tmp_path / str(seed), seed)
        assert shares.min() > 0.01, (seed, shares)


def test_learned_weights_recover_group_proportions(tmp_path):
    """Two opinion types in proportion 3:1: with --learn_weights pi ends within 0.05 of the data's proportions
    (measured: 0.762 / 0.238, each type's owner holding 0.986 and 1.000 of it)."""
    records = survey_records(3, 256, types=2, noise=0.02, proportions=[0.75, 0.25], opposite=True)
    share = sum(r["group"] == "type0" for r in records) / len(records)
    trainer = train_survey(tmp_path, records, 3, steps=128, num_members=2, learn_weights=True, member_update_steps=32)
    pi = sorted(trainer.ensemble.mixture_weights.tolist())
    assert pi == pytest.approx(sorted([share, 1 - share]), abs=0.05), (pi, share)
