"""alpha-Renyi DPO: the K = 1 loss is TRL's sigmoid DPO, one shared reference forward, and members that
take opposite sides of a rule-based conflict at alpha > 1 (docs/specialisation.md)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from conftest import make_llama, make_tokenizer
from torch.nn import functional as F

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.preference import DPOConfig, RenyiDPOTrainer, preference_loglik
from renyi_lora.preference_data import PreferenceCollator, load_preference_dataset


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


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dpo_trainer(tmp_path, dataset, ensemble, tokenizer, **overrides) -> RenyiDPOTrainer:
    settings = dict(output_dir=str(tmp_path / "out"), num_members=ensemble.num_members, learning_rate=3e-3,
                    lr_scheduler_type="constant", per_device_train_batch_size=16, per_device_eval_batch_size=64,
                    save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10_000, use_cpu=True,
                    prior_weight=0.0, beta=0.5)
    settings.update(overrides)
    return RenyiDPOTrainer(model=ensemble, args=DPOConfig(**settings), group_names=dataset.group_names,
                           train_dataset=dataset, data_collator=PreferenceCollator(tokenizer.pad_token_id))


def full_logps(model_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Slow oracle: summed completion log-probs from full logits ``[R, T, V]`` -> ``[R]``."""
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(model_logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (labels != -100)).sum(-1)


def test_k1_loss_is_sigmoid_dpo(tmp_path):
    tokenizer = make_tokenizer()
    dataset = load_preference_dataset(write(tmp_path, "p.jsonl", case_records(0, 1)[:6]), tokenizer, 64)
    base = make_llama(len(tokenizer))
    pristine = copy.deepcopy(base)
    ensemble = LoraEnsemble(base, EnsembleConfig(num_members=1))
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(std=0.2)
    trainer = dpo_trainer(tmp_path, dataset, ensemble, tokenizer, alpha=1.0, beta=0.3, num_members=1)
    batch = PreferenceCollator(tokenizer.pad_token_id)(dataset.examples)
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
def test_reference_forward_runs_once_per_step(tmp_path, num_members):
    tokenizer = make_tokenizer()
    dataset = load_preference_dataset(write(tmp_path, "p.jsonl", case_records(0, 1)), tokenizer, 64)
    ensemble = LoraEnsemble(make_llama(len(tokenizer)), EnsembleConfig(num_members=num_members))
    rows = []
    ensemble.model.base_model.register_forward_hook(lambda module, args, kwargs, out: rows.append(
        (kwargs["input_ids"].shape[0], ensemble.is_disabled)), with_kwargs=True)
    trainer = dpo_trainer(tmp_path, dataset, ensemble, tokenizer, alpha=1.0, max_steps=3,
                          per_device_train_batch_size=4)
    trainer.train()
    assert rows == [(num_members * 2 * 4, False), (2 * 4, True)] * 3  # one ensemble pass, one reference pass


def train_case_rule(tmp_path, alpha: float, seed: int):
    tokenizer = make_tokenizer()
    dataset = load_preference_dataset(write(tmp_path, "train.jsonl", case_records(seed, 20)), tokenizer, 64)
    held_out = load_preference_dataset(write(tmp_path, "test.jsonl", case_records(seed + 100, 2)), tokenizer, 64)
    ensemble = LoraEnsemble(make_llama(len(tokenizer), seed=seed, hidden_size=64),
                            EnsembleConfig(num_members=2, init_seed=seed))
    trainer = dpo_trainer(tmp_path, dataset, ensemble, tokenizer, alpha=alpha, seed=seed, max_steps=300)
    trainer.train()
    batch = PreferenceCollator(tokenizer.pad_token_id)(held_out.examples)
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
