"""--alpha_warmup_steps: alpha ramps linearly from 0 during training; evaluation and later steps use --alpha."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama, make_tokenizer

from renyi_lora.data import SFTCollator, load_sft_dataset
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.train import RenyiConfig, RenyiTrainer

RECORDS = [{"prompt": f"q{i}:", "completion": f" a{i % 3}b", "group": f"g{i % 2}"} for i in range(8)]


def make_trainer(tmp_path, **settings) -> tuple[RenyiTrainer, dict]:
    tokenizer = make_tokenizer()
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    dataset = load_sft_dataset(path, tokenizer, 32)
    ensemble = LoraEnsemble(make_llama(len(tokenizer), seed=1), EnsembleConfig(num_members=3))
    with torch.no_grad():  # members that differ, so that the routing is not uniform at alpha > 0
        for layer in ensemble.lora_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(0)))
    config = RenyiConfig(output_dir=str(tmp_path / "out"), num_members=3, use_cpu=True, report_to="none",
                         max_steps=4, save_strategy="no", **settings)
    collator = SFTCollator(tokenizer.pad_token_id)
    trainer = RenyiTrainer(model=ensemble, args=config, group_names=dataset.group_names, train_dataset=dataset,
                           data_collator=collator)
    return trainer, collator(dataset.examples)


def test_alpha_ramps_from_zero_and_evaluation_uses_the_target(tmp_path):
    trainer, batch = make_trainer(tmp_path, alpha=4.0, alpha_warmup_steps=8)
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


def test_without_warmup_alpha_is_constant(tmp_path):
    trainer, _ = make_trainer(tmp_path, alpha=2.0)
    trainer.model.train()
    assert trainer.alpha == 2.0


@pytest.mark.parametrize("settings", [{"alpha_warmup_steps": -1}, {"alpha": float("inf"), "alpha_warmup_steps": 3}])
def test_bad_warmup_is_refused(settings):
    with pytest.raises(ValueError, match="alpha_warmup_steps"):
        RenyiConfig(output_dir="x", **settings)
