"""Multi-process training (DDP over gloo on CPU, launched by torchrun) gives the single-process adapters.

Data order: the Trainer's sampler draws one permutation from ``--seed`` (accelerate's seedable sampler), and
accelerate's ``BatchSamplerShard`` hands process r the per-process batches r, r + 2, ... of that permutation.
So a step of 2 processes x 2 examples covers exactly the 4 examples of one process's step with batch 4, and
DDP's all-reduce averages the two half-batch gradients into the full-batch mean.

Tolerance: the runs differ only in float32 summation order (two means of 2 averaged by the all-reduce,
against one mean of 4), i.e. gradient differences at the level of float32 rounding. AdamW divides each element
by its own running RMS, so an element whose gradient nearly cancels over the batch can step visibly differently
(in the worst case by up to the learning rate). Measured at lr = 1e-3 after 4 steps: max |difference| ~2e-7
(sft) and ~8e-8 (dpo). ``atol = 1e-5`` (1% of one step's update, ``rtol = 0``) is 50x that and 100x below what a
sharding mistake causes: a wrong, missing or duplicated example shifts most elements' update by O(lr) = 1e-3,
and the adapters must have moved by more than 100x the tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_llama, make_tokenizer
from safetensors.torch import load_file

ATOL = 1e-5
COMMON = ["--num_members", "2", "--rank", "4", "--max_steps", "4", "--learning_rate", "1e-3", "--logging_steps", "2",
          "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0",
          "--dataloader_num_workers", "0"]
SFT_RECORDS = [{"prompt": f"q{i}:", "completion": f" answer {i % 3}", "group": "even" if i % 2 == 0 else "odd"}
               for i in range(16)]
PREFERENCE_RECORDS = [{"prompt": f"q{i}:", "chosen": f" yes {i}", "rejected": f" NO {i}", "group": f"g{i % 2}"}
                      for i in range(16)]


def cli_env() -> dict[str, str]:
    """One thread per process (2 processes share 2 cores) and no debug re-raise."""
    env = {key: value for key, value in os.environ.items() if key != "RENYI_LORA_DEBUG"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(command: str, model_dir, data, out, per_device_batch: int, processes: int) -> subprocess.Popen:
    """``renyi-lora <command>`` in a subprocess; with ``processes > 1`` through torchrun (``--standalone`` picks a
    free port, so parallel test runs do not collide)."""
    launcher = [sys.executable, "-m", "renyi_lora.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(processes), "-m", "renyi_lora.cli"]
    argv = [*launcher, command, "--model", str(model_dir), "--data", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", str(per_device_batch), *COMMON]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, model_dir):
    runs = {}
    for command, records in (("sft", SFT_RECORDS), ("dpo", PREFERENCE_RECORDS)):
        data = tmp_path / f"{command}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        # All four runs at once: the test's time is one start-up, not four.
        runs[command, 1] = launch(command, model_dir, data, tmp_path / f"{command}-1", 4, processes=1)
        runs[command, 2] = launch(command, model_dir, data, tmp_path / f"{command}-2", 2, processes=2)
    logs = {key: process.communicate(timeout=300)[0] for key, process in runs.items()}
    for key, process in runs.items():
        assert process.returncode == 0, f"{key}:\n{logs[key][-3000:]}"
    for command in ("sft", "dpo"):
        single, ddp = tmp_path / f"{command}-1", tmp_path / f"{command}-2"
        one, two = load_file(single / "adapters.safetensors"), load_file(ddp / "adapters.safetensors")
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=ATOL, rtol=0, msg=f"{command}: {name}")
        moved = max(one[name].abs().max().item() for name in one if name.endswith("lora_B"))
        assert moved > 100 * ATOL, f"{command}: the adapters barely trained ({moved})"
        # The summary is written once, by process 0, and its routing (scored in shards, all-reduced) agrees.
        summary_one = json.loads((single / "train_summary.json").read_text())
        summary_two = json.loads((ddp / "train_summary.json").read_text())
        assert summary_two["num_examples"] == 16 and summary_two["metrics"]["train_loss"] == pytest.approx(
            summary_one["metrics"]["train_loss"], rel=1e-5)
        for group, row in summary_one["routing"].items():
            assert summary_two["routing"][group] == pytest.approx(row, abs=1e-5)
            nll = summary_one["member_group_nll"][group]
            assert summary_two["member_group_nll"][group] == pytest.approx(nll, rel=1e-5)
        assert not list(ddp.glob(".*.tmp-*")), "a temporary file was left behind"


def test_save_takes_the_adapters_from_a_gathered_state_dict(tmp_path):
    """Under FSDP / DeepSpeed the layers hold shards and the Trainer passes ``_save`` the gathered full state dict:
    the checkpoint's adapters must come from it."""
    from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
    from renyi_lora.training.trainer import RenyiConfig, RenyiTrainer

    tokenizer = make_tokenizer()
    ensemble = LoraEnsemble(make_llama(len(tokenizer)), EnsembleConfig(num_members=2, rank=4))
    trainer = RenyiTrainer(model=ensemble, args=RenyiConfig(output_dir=str(tmp_path), num_members=2, rank=4,
                                                            use_cpu=True, report_to="none"))
    gathered = {name: value + 1 for name, value in ensemble.state_dict().items()}  # differs from the layers
    trainer._save(str(tmp_path / "checkpoint"), state_dict=gathered)
    saved = load_file(tmp_path / "checkpoint" / "adapters.safetensors")
    for name, layer in ensemble.lora_layers().items():
        assert torch.equal(saved[f"{name}.lora_B"], gathered[f"model.{name}.lora_B"])
        assert torch.equal(saved[f"{name}.lora_A"], layer.lora_A.detach() + 1)
    assert json.loads((tmp_path / "checkpoint" / "training_args.json").read_text())["num_members"] == 2
