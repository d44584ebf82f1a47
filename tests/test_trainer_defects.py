"""Regressions of the trainer and its config (issue #13): metrics kept with logging off, the logged alpha during
warm-up, winner-take-all training that moves every member, and one meaning per seed flag."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama
from transformers import HfArgumentParser, TrainerCallback

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.io import CONFIG_NAME, read_ensemble_config, save_ensemble
from renyi_lora.training.trainer import RenyiConfig

INF = float("inf")
RECORDS = [{"prompt": f"q{i}:", "completion": f" a{i % 3}b", "group": f"g{i % 2}"} for i in range(8)]
# Three members on conftest's tiny Llama (seed 1), four steps of four examples (``tiny_trainer``).
SETTINGS = {"model_seed": 1, "num_members": 3, "max_steps": 4, "learning_rate": 1e-2, "per_device_train_batch_size": 4}


class CountMetrics(TrainerCallback):
    """Records how many per-batch metric entries the trainer holds at the end of every step."""

    def __init__(self):
        self.trainer, self.counts = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(sum(len(values) for values in self.trainer._metrics["train"].values()))


def test_logging_off_keeps_no_per_batch_metrics(tiny_trainer, one_thread):
    trainer = tiny_trainer(RECORDS, **SETTINGS, logging_strategy="no").trainer
    counter = CountMetrics()
    counter.trainer = trainer
    trainer.add_callback(counter)
    trainer.train()
    assert counter.counts == [0, 0, 0, 0]  # nothing would ever read or clear them
    assert trainer._routing == {}


@pytest.mark.parametrize("alpha", [4.0, INF])
def test_logged_alpha_is_the_alpha_used_in_the_logged_step(tiny_trainer, one_thread, alpha):
    trainer = tiny_trainer(RECORDS, **SETTINGS | {"max_steps": 6}, alpha=alpha, alpha_warmup_steps=4,
                           logging_steps=1).trainer
    used = {}
    data_term = trainer.data_term

    def recording(model, inputs):
        used[trainer.state.global_step + 1] = trainer.alpha  # the step being computed, as the log numbers it
        return data_term(model, inputs)

    trainer.data_term = recording
    trainer.train()
    logged = {entry["step"]: entry["renyi/alpha"] for entry in trainer.state.log_history if "renyi/alpha" in entry}
    if alpha == 4.0:
        assert [used[step] for step in range(1, 7)] == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]
    else:  # alpha = s / (N - s); the log leaves out the non-finite alpha = inf of steps 5 and 6
        assert [used[step] for step in range(1, 7)] == pytest.approx([0.0, 1 / 3, 1.0, 3.0, INF, INF])
    assert logged == pytest.approx({step: value for step, value in used.items() if value < INF})


def test_winner_take_all_training_moves_every_member(tiny_trainer, one_thread):
    # At initialisation B = 0, so every member ties on every example; argmax routing gave member 0 every
    # gradient and the other members kept lora_B exactly 0 for good.
    trainer = tiny_trainer(RECORDS, **SETTINGS | {"max_steps": 3}, alpha=INF).trainer
    trainer.train()
    B = torch.stack([torch.stack([layer.lora_B[k].abs().sum() for layer in trainer.ensemble.lora_layers().values()])
                     for k in range(3)])  # [K, layers]
    assert (B.sum(1) > 0).all(), B.sum(1)


def test_one_seed_flag_per_meaning(tmp_path):
    parser = HfArgumentParser(RenyiConfig)
    actions = {action.dest: action for action in parser._actions}
    assert "--seed" in actions["seed"].option_strings and "Random seed" in actions["seed"].help  # the Trainer's
    assert "--init_seed" in actions["init_seed"].option_strings and "--seed" in actions["init_seed"].help
    (config,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--seed", "5", "--use_cpu", "true"])
    assert config.init_seed is None and config.ensemble_config().init_seed == 5  # default: --seed draws A
    (other,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--seed", "5", "--init_seed", "7",
                                                   "--use_cpu", "true"])
    assert other.ensemble_config().init_seed == 7 and other.seed == 5

    def lora_A(config: EnsembleConfig) -> torch.Tensor:
        ensemble = LoraEnsemble(make_llama(101), config)
        return torch.cat([layer.lora_A.flatten() for layer in ensemble.lora_layers().values()])

    from_cli = lora_A(config.ensemble_config())
    assert torch.equal(from_cli, lora_A(EnsembleConfig(num_members=config.num_members, init_seed=5)))
    assert not torch.equal(from_cli, lora_A(other.ensemble_config()))
    assert torch.equal(lora_A(EnsembleConfig()), lora_A(EnsembleConfig(init_seed=0)))  # in Python: 0


def test_saved_configs_with_the_old_seed_name_still_load(tmp_path):
    save_ensemble(LoraEnsemble(make_llama(101), EnsembleConfig(num_members=2, init_seed=3)), tmp_path)
    assert read_ensemble_config(tmp_path)[0].init_seed == 3
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    raw["ensemble"]["seed"] = raw["ensemble"].pop("init_seed")  # as written before the rename
    (tmp_path / CONFIG_NAME).write_text(json.dumps(raw))
    config = read_ensemble_config(tmp_path)[0]
    assert config.init_seed == 3 and config.num_members == 2
