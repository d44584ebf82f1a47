"""alpha-Renyi DPO: the K = 1 loss is TRL's sigmoid DPO, one shared reference forward, and members that
take opposite sides of a rule-based conflict at alpha > 1 (docs/specialisation.md)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_llama, make_trainer
from torch.nn import functional as F

from renyi_lora.training.dpo import preference_loglik


def case_records(seed: int, repeats: int, num_prompts: int = 24) -> list[dict]:
    """Same prompts, opposite tastes: group 'lower' prefers the lower-case answer, 'upper' the upper-case one.
    The rule shows on every token and applies on every prompt, so parameter sharing carries it."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))

    records = []
    for i in range(num_prompts):
        for _ in range(repeats):
            for group in ("lower", "upper"):
                lower, upper = word(), word().upper()
                chosen, rejected = (lower, upper) if group == "lower" else (upper, lower)
                records.append({"prompt": f"q{i}:", "chosen": chosen, "rejected": rejected, "group": group})
    return records


# The DPO runs of this file (``tiny_trainer`` / ``conftest.make_trainer`` with ``preference=True``).
DPO = {"preference": True, "max_length": 64, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
       "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64, "logging_steps": 10_000,
       "prior_weight": 0.0, "beta": 0.5}


def full_logps(model_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Slow oracle: summed completion log-probs from full logits ``[R, T, V]`` -> ``[R]``."""
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(model_logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (labels != -100)).sum(-1)


def draw_lora_b(ensemble) -> None:
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(std=0.2)


def test_k1_loss_is_sigmoid_dpo(tiny_trainer):
    run = tiny_trainer(case_records(0, 1)[:6], **DPO | {"beta": 0.3}, setup=draw_lora_b, num_members=1, init_seed=0,
                       alpha=1.0)
    trainer, ensemble, dataset = run.trainer, run.ensemble, run.dataset
    pristine = make_llama(len(run.tokenizer))  # the base model as the ensemble wraps it (seed 0)
    batch = run.batch()
    batch.pop("group")
    with torch.no_grad():
        loss, _, _ = trainer.data_term(ensemble, batch)
        policy = full_logps(ensemble(batch["input_ids"], batch["attention_mask"])[0], batch)
        ref = full_logps(pristine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    B = len(dataset)
    expected = -F.logsigmoid(0.3 * ((policy[:B] - ref[:B]) - (policy[B:] - ref[B:]))).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_preference_loglik_by_hand():
    policy_c, policy_r = torch.tensor([[-3.0], [-5.0]]), torch.tensor([[-4.0], [-4.0]])
    loglik, h = preference_loglik(policy_c, policy_r, torch.tensor([-3.5]), torch.tensor([-3.5]), beta=0.5)
    assert h.flatten().tolist() == pytest.approx([0.5, -0.5])
    assert loglik.flatten().tolist() == pytest.approx([F.logsigmoid(torch.tensor(0.5)).item(),
                                                       F.logsigmoid(torch.tensor(-0.5)).item()])


@pytest.mark.parametrize("num_members", [1, 3])
def test_reference_forward_runs_once_per_step(tiny_trainer, num_members):
    rows = []

    def count_rows(ensemble) -> None:
        ensemble.model.base_model.register_forward_hook(lambda module, args, kwargs, out: rows.append(
            (kwargs["input_ids"].shape[0], ensemble.is_disabled)), with_kwargs=True)

    trainer = tiny_trainer(case_records(0, 1), **DPO | {"per_device_train_batch_size": 4}, setup=count_rows,
                           num_members=num_members, init_seed=0, alpha=1.0, max_steps=3).trainer
    trainer.train()
    assert rows == [(num_members * 2 * 4, False), (2 * 4, True)] * 3  # one ensemble pass, one reference pass


def train_case_rule(tmp_path, alpha: float, seed: int):
    run = make_trainer(tmp_path, case_records(seed, 20), **DPO, model_seed=seed, hidden_size=64, num_members=2,
                       init_seed=seed, alpha=alpha, seed=seed, max_steps=300)
    trainer, ensemble, dataset = run.trainer, run.ensemble, run.dataset
    held_out = run.load(case_records(seed + 100, 2), "test.jsonl")
    trainer.train()
    batch = run.collator(held_out.examples)
    group = batch.pop("group")
    with torch.no_grad():
        _, _, loglik = trainer.data_term(ensemble.eval(), batch)
    accuracy = torch.stack([(loglik[:, group == g] > -0.6931).float().mean(1) for g in (0, 1)])  # [G, K]
    probability = torch.stack([loglik[:, group == g].exp().mean(1) for g in (0, 1)])  # [G, K]
    routing = torch.tensor(list(trainer.routing_summary(dataset)["routing"].values()))
    return accuracy, probability, routing


@pytest.mark.parametrize(("alpha", "seed"), [(4.0, 0), (4.0, 1), (float("inf"), 0)])
def test_members_take_opposite_sides_beyond_alpha_one(tmp_path, alpha, seed):
    accuracy, _, routing = train_case_rule(tmp_path, alpha, seed)
    owner = accuracy.argmax(1)  # [G]: the member that agrees with each group on held-out pairs
    assert owner[0] != owner[1], accuracy
    assert accuracy.max(1).values.min() > 0.8, accuracy
    assert routing[torch.arange(2), owner].min() > 0.9, routing  # routing is near a permutation


def test_alpha_zero_members_stay_indifferent(tmp_path):
    _, probability, routing = train_case_rule(tmp_path, 0.0, 0)
    assert (probability - 0.5).abs().max() < 0.1, probability
    assert torch.allclose(routing, torch.full_like(routing, 0.5))
