"""Faults: a run killed by SIGKILL resumes bit for bit; a save killed midway leaves the previous one loadable;
loading says what differs; a non-finite loss or gradient stops (naming step and member) or skips the step;
bf16 autocast keeps the objective in float32."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_llama, make_tokenizer, make_trainer
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from renyi_lora import io
from renyi_lora.commands.train import resume_checkpoint
from renyi_lora.config import DPOConfig
from renyi_lora.data.preference import PreferenceCollator, load_preference_dataset
from renyi_lora.data.sft import SFTCollator, load_sft_dataset
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.io import last_complete_checkpoint
from renyi_lora.training.dpo import RenyiDPOTrainer
from renyi_lora.training.trainer import NonFiniteError, RenyiConfig, RenyiTrainer

SFT_RECORDS = [{"prompt": f"q{i}:", "completion": f" answer {i % 3}", "group": "even" if i % 2 == 0 else "odd"}
               for i in range(16)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cli_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RENYI_LORA_DEBUG"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- Resume exactly --------------------------------------------------------------------------------------------

# The run to be killed sleeps before each step (numerics untouched) so that the kill lands mid-run.
SLOW_CLI = ("import sys, time\n"
            "from renyi_lora.training.trainer import RenyiTrainer\n"
            "step = RenyiTrainer.training_step\n"
            "RenyiTrainer.training_step = lambda self, *args: (time.sleep(0.25), step(self, *args))[1]\n"
            "from renyi_lora.cli import main\n"
            "main(sys.argv[1:])\n")
RESUME_FLAGS = ["--num_members", "2", "--rank", "4", "--max_steps", "10", "--per_device_train_batch_size", "4",
                "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1",
                "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0",
                "--dataloader_num_workers", "0", "--full_determinism", "true"]


def test_sigkill_then_resume_true_is_bit_exact(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", SFT_RECORDS)  # 16 examples, batch 4: 4 steps per epoch

    def argv(out):
        return ["sft", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *RESUME_FLAGS]

    reference = subprocess.Popen([sys.executable, "-m", "renyi_lora.cli", *argv(tmp_path / "reference")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env())
    out = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv(out)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-6" / "trainer_state.json").exists():  # the 2nd checkpoint: mid-epoch 2
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before its 2nd checkpoint"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (out / "train_summary.json").exists() and not (out / "checkpoint-9").exists()
    checkpoint = out / "checkpoint-6"
    saved = {path.name for path in checkpoint.iterdir()}
    assert {"adapters.safetensors", "ensemble_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "training_args.json"} <= saved
    assert not saved & {"model.safetensors", "training_args.bin"}  # adapters only, and no pickled arguments

    resumed = subprocess.run([sys.executable, "-m", "renyi_lora.cli", *argv(out), "--resume_from_checkpoint", "true"],
                             capture_output=True, text=True, env=cli_env(), timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint} (the last complete checkpoint)" in resumed.stderr
    assert reference.wait(timeout=240) == 0, reference.stderr.read()[-3000:]
    expected, got = load_file(tmp_path / "reference" / "adapters.safetensors"), load_file(out / "adapters.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert json.loads((out / "train_summary.json").read_text())["metrics"]["train_loss"] > 0


def write_checkpoint(folder, complete: bool = True, truncated_state: bool = False) -> None:
    folder.mkdir(parents=True)
    for name in ("ensemble_config.json", "adapters.safetensors"):
        (folder / name).write_text("{}")
    if complete:
        (folder / "trainer_state.json").write_text('{"global_step": 1' if truncated_state else '{"global_step": 1}')


def test_resume_picks_the_last_complete_checkpoint(tmp_path):
    write_checkpoint(tmp_path / "checkpoint-2")
    write_checkpoint(tmp_path / "checkpoint-10")  # numeric, not lexicographic, order
    write_checkpoint(tmp_path / "checkpoint-12", complete=False)  # killed before trainer_state.json
    write_checkpoint(tmp_path / "checkpoint-14", truncated_state=True)  # killed while writing it
    (tmp_path / "checkpoint-final").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    config = RenyiConfig(output_dir=str(tmp_path), resume_from_checkpoint="true", use_cpu=True, report_to="none")
    assert resume_checkpoint(config) == str(tmp_path / "checkpoint-10")
    config.resume_from_checkpoint = str(tmp_path / "checkpoint-2")
    assert resume_checkpoint(config) == str(tmp_path / "checkpoint-2")
    for value in ("false", None, ""):
        config.resume_from_checkpoint = value
        assert resume_checkpoint(config) is None
    for bad, message in ((tmp_path / "checkpoint-12", "no trainer_state.json"), (tmp_path / "checkpoint-14",
                         "truncated"), (tmp_path / "checkpoint-99", "no such folder")):
        config.resume_from_checkpoint = str(bad)
        with pytest.raises(FileNotFoundError, match=message):
            resume_checkpoint(config)
    config.output_dir, config.resume_from_checkpoint = str(tmp_path / "empty"), "true"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resume_checkpoint(config)


# --- Never a broken save ---------------------------------------------------------------------------------------

def ensemble_with_b(value: float, num_members: int = 2) -> LoraEnsemble:
    torch.manual_seed(0)
    ensemble = LoraEnsemble(make_llama(len(make_tokenizer())), EnsembleConfig(num_members=num_members, rank=4))
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.fill_(value)
    return ensemble


def b_values(directory) -> set[float]:
    tensors = load_file(directory / "adapters.safetensors")
    return {v for name, t in tensors.items() if name.endswith("lora_B") for v in t.unique().tolist()}


@pytest.mark.parametrize("failing_rename", [0, 1])  # killed before renaming the weights, or the config
def test_save_interrupted_before_the_rename_keeps_a_loadable_ensemble(tmp_path, monkeypatch, failing_rename):
    ensemble_with_b(1.0).save_pretrained(tmp_path)
    renames = []

    def replace(source, target):
        if len(renames) == failing_rename:
            raise KeyboardInterrupt("killed")  # the temp file is written, the rename never happens
        renames.append(target)
        os.rename(source, target)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        ensemble_with_b(2.0).save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = LoraEnsemble.from_pretrained(make_llama(len(make_tokenizer())), tmp_path)
    # One whole save or the other, never a mix: before the weights' rename the old ones, after it the new ones.
    assert b_values(tmp_path) == ({1.0} if failing_rename == 0 else {2.0})
    assert loaded.num_members == 2


SAVE_LOOP = ("import sys, torch\n"
             "sys.path.insert(0, sys.argv[2])\n"
             "from conftest import make_llama, make_tokenizer\n"
             "from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble\n"
             "ensemble = LoraEnsemble(make_llama(len(make_tokenizer())), EnsembleConfig(num_members=2, rank=4))\n"
             "for i in range(1, 100000):\n"
             "    with torch.no_grad():\n"
             "        for layer in ensemble.lora_layers().values():\n"
             "            layer.lora_B.fill_(float(i))\n"
             "    ensemble.save_pretrained(sys.argv[1])\n"
             "    print(i, flush=True)\n")


def test_sigkill_during_repeated_saves_leaves_one_whole_save(tmp_path):
    tests_dir = os.path.dirname(__file__)
    for delay in (0.0, 0.02):  # killed right after a save returned, and somewhere inside the next one
        out = tmp_path / f"delay-{delay}"
        saver = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(out), tests_dir], stdout=subprocess.PIPE,
                                 text=True, env=cli_env())
        for _ in range(3):
            saver.stdout.readline()
        time.sleep(delay)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        loaded = LoraEnsemble.from_pretrained(make_llama(len(make_tokenizer())), out)
        values = {v for layer in loaded.lora_layers().values() for v in layer.lora_B.unique().tolist()}
        assert len(values) == 1 and next(iter(values)) >= 3, values  # every tensor from one and the same save


# --- Loading says what differs ---------------------------------------------------------------------------------

def damage_missing_tensor(directory):
    tensors = load_file(directory / "adapters.safetensors")
    del tensors[sorted(tensors)[0]]
    save_file(tensors, directory / "adapters.safetensors")


def damage_config(directory, **changes):
    path = directory / "ensemble_config.json"
    raw = json.loads(path.read_text())
    raw["ensemble"].update(changes.get("ensemble", {}))
    raw["module_names"] = changes.get("module_names", raw["module_names"])
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(("damage", "message"), [
    (damage_missing_tensor, "missing \\['model.layers.0.mlp.down_proj.lora_A'\\]"),
    (lambda d: damage_config(d, ensemble={"num_members": 3}), "K=3, rank=4\\) need \\[3, 4,"),
    (lambda d: damage_config(d, ensemble={"rank": 2}), "K=2, rank=2\\) need"),
    (lambda d: damage_config(d, module_names=["model.layers.0.mlp.no_such_proj"]), "no module"),
    (lambda d: (d / "adapters.safetensors").write_bytes((d / "adapters.safetensors").read_bytes()[:100]),
     "not a readable safetensors file"),
    (lambda d: (d / "ensemble_config.json").write_text('{"ensemble": {"num_memb'), "not a valid ensemble config"),
    (lambda d: (d / "adapters.safetensors").unlink(), "adapters.safetensors not found"),
])
def test_load_says_what_differs(tmp_path, damage, message):
    ensemble_with_b(0.5).save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        LoraEnsemble.from_pretrained(make_llama(len(make_tokenizer())), tmp_path)


def test_resuming_into_another_shape_is_refused(tmp_path):
    ensemble_with_b(0.5, num_members=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="K=3, rank=4 .* this run has K=2"):
        io.load_adapter_weights(ensemble_with_b(0.0, num_members=2), tmp_path)


# --- Non-finite loss or gradient -------------------------------------------------------------------------------

class Poison(TrainerCallback):
    """At step ``step`` (1-based) make member ``member``'s output of one layer NaN (``"output"``: its
    log-likelihood, then every gradient through the mixture, is non-finite) or only its gradient (``"grad"``)."""

    def __init__(self, ensemble: LoraEnsemble, member: int, step: int, where: str) -> None:
        self.member, self.step, self.where, self.armed = member, step, where, False
        self.num_members = ensemble.num_members
        layer = ensemble.lora_layers()["model.layers.1.self_attn.q_proj"]
        layer.register_forward_hook(self._output)
        layer.lora_B.register_hook(self._grad)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 == self.step

    def _output(self, module, inputs, output):
        if self.armed and self.where == "output":
            output = output.clone()
            output.view(self.num_members, -1, output.shape[-1])[self.member] = float("nan")  # member-major rows
            return output

    def _grad(self, grad):
        if self.armed and self.where == "grad":
            grad = grad.clone()
            grad[self.member] = float("nan")
            return grad


class Snapshots(TrainerCallback):
    """The LoRA parameters after every optimizer step."""

    def __init__(self, ensemble: LoraEnsemble) -> None:
        self.ensemble, self.after = ensemble, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = [p.detach().clone() for p in self.ensemble.lora_parameters()]


def poisoned_trainer(tmp_path, member: int, step: int, where: str, **overrides):
    snapshots = []

    def poison(ensemble: LoraEnsemble) -> dict:
        snapshots.append(Snapshots(ensemble))
        return {"callbacks": [Poison(ensemble, member, step, where), snapshots[0]]}

    run = make_trainer(tmp_path, SFT_RECORDS, max_length=64, setup=poison, pass_tokenizer=True, num_members=2,
                       rank=4, init_seed=0, per_device_train_batch_size=4, max_steps=5, learning_rate=1e-3,
                       save_strategy="steps", save_steps=2, logging_steps=1, **overrides)
    return run.trainer, run.dataset, snapshots[0]


def test_nonfinite_loglik_stops_naming_step_and_member_and_keeps_the_checkpoint(tmp_path):
    trainer, _, snapshots = poisoned_trainer(tmp_path, member=1, step=3, where="output")
    with pytest.raises(NonFiniteError) as raised:
        trainer.train()
    message = str(raised.value)
    assert message.startswith("step 3: non-finite log-likelihood of member(s) [1]") and "\n" not in message
    assert "checkpoint-2" in message and "--nonfinite skip" in message
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    kept = LoraEnsemble.from_pretrained(make_llama(len(make_tokenizer())), out / "checkpoint-2")
    for saved, after_step_2 in zip(kept.lora_parameters(), snapshots.after[2], strict=True):
        assert torch.equal(saved, after_step_2)
    # Stopped before the update: the adapters in memory are still those of step 2.
    for current, after_step_2 in zip(trainer.ensemble.lora_parameters(), snapshots.after[2], strict=True):
        assert torch.equal(current, after_step_2)


def test_nonfinite_gradient_stops_naming_only_that_member(tmp_path):
    trainer, _, _ = poisoned_trainer(tmp_path, member=0, step=2, where="grad")
    with pytest.raises(NonFiniteError, match=r"^step 2: non-finite gradient of member\(s\) \[0\]; .*none written"):
        trainer.train()


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path):
    trainer, dataset, snapshots = poisoned_trainer(tmp_path, member=1, step=3, where="grad", nonfinite="skip")
    result = trainer.train()
    assert result.global_step == 5 and trainer.nonfinite_skipped_steps == [3]
    for before, after in zip(snapshots.after[2], snapshots.after[3], strict=True):
        assert torch.equal(before, after)  # no optimizer update at step 3 ...
    assert not all(torch.equal(a, b) for a, b in zip(snapshots.after[3], snapshots.after[4], strict=True))
    assert all(state["step"] == 4 for state in trainer.optimizer.state_dict()["state"].values())  # ... nor moments
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "nonfinite_skipped" in e] == [3]  # survives a resume
    trainer.save_model()
    summary = trainer.summary
    written = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["num_nonfinite_skips"] == written["num_nonfinite_skips"] == 1
    assert written["nonfinite_skipped_steps"] == [3]
    assert all(torch.isfinite(p).all() for p in trainer.ensemble.lora_parameters())


# --- Mixed precision -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("routing_level", ["sequence", "token"])
def test_bf16_autocast_keeps_the_objective_in_float32(tmp_path, routing_level):
    tokenizer = make_tokenizer()
    ensemble = LoraEnsemble(make_llama(len(tokenizer)).to(torch.bfloat16), EnsembleConfig(num_members=2, rank=4))
    args = RenyiConfig(output_dir=str(tmp_path), num_members=2, rank=4, routing_level=routing_level, use_cpu=True,
                       report_to="none")
    trainer = RenyiTrainer(model=ensemble, args=args)
    dataset = load_sft_dataset(write_jsonl(tmp_path / "train.jsonl", SFT_RECORDS), tokenizer, 64)
    batch = SFTCollator(tokenizer.pad_token_id)(dataset.examples[:3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, (w, loglik) = trainer.compute_loss(ensemble, dict(batch), return_outputs=True)[0], \
            trainer.data_term(ensemble, {k: v for k, v in batch.items() if k != "group"})[1:]
    assert loss.dtype == w.dtype == loglik.dtype == torch.float32
    preferences = [{"prompt": f"q{i}:", "chosen": f" yes {i}", "rejected": f" NO {i}"} for i in range(3)]
    dataset = load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", preferences), tokenizer, 64)
    dpo = RenyiDPOTrainer(model=ensemble, args=DPOConfig(output_dir=str(tmp_path), num_members=2, rank=4,
                                                         use_cpu=True, report_to="none"))
    batch = PreferenceCollator(tokenizer.pad_token_id)(dataset.examples)
    batch.pop("group")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, w, loglik = dpo.data_term(ensemble, batch)
    assert loss.dtype == w.dtype == loglik.dtype == torch.float32
