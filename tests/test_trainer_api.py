"""The trainer API at TRL's level (``RenyiSFTTrainer`` / ``RenyiDPOTrainer``), the data sources a TRL user keeps data
in, the model card, the Hub push up to the upload, and the CLI's friction fixes (help order, routing pass, per-token
NLL). The README's Python snippets run here as written, on a tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer

from renyi_lora import RenyiConfig, RenyiSFTTrainer
from renyi_lora.cli import main
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.io import read_ensemble_config

datasets = pytest.importorskip("datasets")

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0"]
RECORDS = [{"prompt": f"q{i}:", "completion": f" answer {i % 3}", "group": "even" if i % 2 == 0 else "odd"}
           for i in range(8)]


def readme_trainer_snippets() -> list[str]:
    """The README's Python blocks that use the trainer API, in order (SFT, then DPO from its output)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return [block for block in blocks if "Trainer(" in block]


def test_readme_snippets_train_sft_then_dpo(tmp_path, model_dir, monkeypatch, one_thread):
    snippets = readme_trainer_snippets()
    assert len(snippets) == 2 and all(len(s.strip().splitlines()) <= 10 for s in snippets)
    monkeypatch.chdir(tmp_path)  # the snippets write out/sft and out/dpo
    for snippet in snippets:
        code = snippet.replace('"smollm2-135m"', repr(str(model_dir)))
        code = code.replace("max_steps=20", "max_steps=2, use_cpu=True, report_to='none', disable_tqdm=True")
        exec(compile(code, str(README), "exec"), {})  # noqa: S102 - the README's own code
    for name, groups in (("sft", ["a", "b"]), ("dpo", ["a"])):
        out = tmp_path / "out" / name
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["groups"] == groups and summary["metrics"]["step"] == 2
        assert (out / "peft" / "member_1" / "adapter_config.json").is_file() and (out / "README.md").is_file()
    assert read_ensemble_config(tmp_path / "out" / "dpo")[0].num_members == 2  # started from the SFT ensemble


def test_trainer_api_and_cli_write_the_same_folder(tmp_path, model_dir, one_thread):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    main(["sft", "--model", str(model_dir), "--data", str(data), "--output_dir", str(tmp_path / "cli"),
          "--num_members", "2", "--rank", "4", *FAST])
    args = RenyiConfig(output_dir=str(tmp_path / "api"), num_members=2, rank=4, max_steps=2,
                       per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none",
                       disable_tqdm=True, use_cpu=True, seed=0)
    trainer = RenyiSFTTrainer(model=str(model_dir), args=args, train_dataset=datasets.Dataset.from_list(RECORDS))
    trainer.train()
    trainer.save_model()

    def files(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    assert files(tmp_path / "cli") == files(tmp_path / "api")
    cli = LoraEnsemble.from_pretrained(make_llama(len(make_tokenizer())), tmp_path / "cli")
    api = LoraEnsemble.from_pretrained(make_llama(len(make_tokenizer())), tmp_path / "api")
    for a, b in zip(cli.lora_parameters(), api.lora_parameters(), strict=True):
        torch.testing.assert_close(a, b)  # same data, seed and steps: the same adapters
    card = (tmp_path / "cli" / "README.md").read_text()
    assert "renyi-lora sft --model" in card and "--num_members 2" in card  # the command that produced it


def test_peft_config_shapes_the_members(tmp_path, model_dir):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                           layers_to_transform=[1])
    trainer = RenyiSFTTrainer(model=str(model_dir), args=RenyiConfig(output_dir=str(tmp_path), num_members=2,
                              use_cpu=True, report_to="none"), train_dataset=RECORDS, peft_config=lora)
    config = trainer.ensemble.ensemble_config
    assert (config.num_members, config.rank, config.lora_alpha, config.lora_dropout) == (2, 3, 6, 0.1)
    assert sorted(trainer.ensemble.module_names) == ["model.layers.1.self_attn.q_proj",
                                                     "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="only plain LoRA carries over"):
        RenyiSFTTrainer(model=str(model_dir), args=RenyiConfig(output_dir=str(tmp_path), use_cpu=True),
                        train_dataset=RECORDS, peft_config=peft.LoraConfig(r=3, use_dora=True))


def test_every_data_source_gives_the_same_examples(tmp_path, model_dir):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    dataset = datasets.Dataset.from_list(RECORDS)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    args = RenyiConfig(output_dir=str(tmp_path / "o"), num_members=2, use_cpu=True, report_to="none")
    examples = []
    for source, split in ((path, None), (RECORDS, None), (dataset, None), (tmp_path / "saved", None),
                          (tmp_path / "dict", "test")):
        trainer = RenyiSFTTrainer(model=str(model_dir), args=args, train_dataset=source, dataset_split=split)
        examples.append(trainer.train_dataset.examples)
        assert trainer.group_names == ["even", "odd"]
    assert all(e == examples[0] for e in examples[:4]) and examples[4] == examples[0][:2]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "renyi_lora.cli", *argv], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"})


def test_cli_reads_datasets_folders_and_refuses_an_unreachable_hub_id(tmp_path, model_dir, capsys):
    folder = tmp_path / "data"  # a folder of data files, as on the hub: loaded by datasets.load_dataset
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:4]))
    common = ["--model", str(model_dir), "--num_members", "2", "--rank", "2", *FAST]
    # The local sources in process; the hub id in a subprocess, whose environment is offline from the start.
    main(["sft", "--data", str(folder), "--dataset_split", "test", "--output_dir", str(tmp_path / "o"), *common])
    assert json.loads((tmp_path / "o" / "train_summary.json").read_text())["num_examples"] == 4
    saved = tmp_path / "saved"  # a DatasetDict written by save_to_disk
    dataset = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(str(saved))
    main(["sft", "--data", str(saved), "--dataset_split", "test", "--output_dir", str(tmp_path / "s"), *common])
    assert json.loads((tmp_path / "s" / "train_summary.json").read_text())["num_examples"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as wrong:
        main(["sft", "--data", str(saved), "--dataset_split", "validation", "--output_dir", str(tmp_path / "w"),
              *common])
    stderr = capsys.readouterr().err
    assert wrong.value.code == 2 and "available splits: train, test" in stderr, stderr
    hub = run_cli("sft", "--data", "someone/no-such-dataset", "--output_dir", str(tmp_path / "h"), *common)
    last = hub.stderr.strip().splitlines()[-1]
    assert hub.returncode == 2 and "Traceback" not in hub.stderr, hub.stderr
    assert last.startswith("renyi-lora sft: error: someone/no-such-dataset: could not be loaded"), last


def test_push_to_hub_writes_everything_then_fails_in_one_line_offline(tmp_path, model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "out"
    done = run_cli("sft", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--num_members",
                   "2", "--rank", "2", "--push_to_hub", "true", "--hub_model_id", "me/ensemble", *FAST)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "cannot push" in done.stderr and "me/ensemble" in done.stderr and "offline mode" in done.stderr
    card = (out / "README.md").read_text()  # what would have been uploaded is all there
    assert 'snapshot_download("me/ensemble")' in card and (out / "peft" / "member_1").is_dir()


def test_one_member_skips_the_routing_pass_and_the_flag_turns_it_off(tmp_path, model_dir, one_thread):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    for name, flags in (("k1", ["--num_members", "1"]), ("off", ["--num_members", "2", "--routing_summary", "false"])):
        main(["sft", "--model", str(model_dir), "--data", str(data), "--output_dir", str(tmp_path / name), *flags,
              "--rank", "2", *FAST])
    k1 = json.loads((tmp_path / "k1" / "train_summary.json").read_text())
    assert k1["routing"] == {"even": [1.0], "odd": [1.0]} and "member_group_nll" not in k1
    assert "routing" not in json.loads((tmp_path / "off" / "train_summary.json").read_text())


def test_help_lists_our_flags_before_the_trainers(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    ours = text.index("renyi-lora: the model, the data, the ensemble and the objective")
    theirs = text.index("transformers.TrainingArguments: the Trainer's own flags")
    listed = text[ours:]  # past the usage line, which names every flag once

    def at(flag: str) -> int:
        return listed.index(f"\n  {flag} ")

    assert at("--model") < at("--data") < at("--num_members") < at("--alpha") < theirs - ours < at("--local_rank")
    assert at("--learning_rate") > theirs - ours  # redefaults of Trainer flags stay with the Trainer's


def test_per_token_nll_is_logged_beside_the_per_example_loss(tmp_path, model_dir, one_thread):
    args = RenyiConfig(output_dir=str(tmp_path), num_members=2, rank=2, max_steps=1, per_device_train_batch_size=8,
                       logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True)
    trainer = RenyiSFTTrainer(model=str(model_dir), args=args, train_dataset=RECORDS)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "nll_per_token" in entry)
    tokens = sum(sum(label != -100 for label in e["labels"]) for e in trainer.train_dataset.examples)  # one batch
    member_mean = (logged["member_0/nll"] + logged["member_1/nll"]) / 2  # per example
    assert logged["nll_per_token"] == pytest.approx(member_mean * len(RECORDS) / tokens, rel=1e-5)
