"""End to end through the CLI on a tiny model saved to disk: sft writes its outputs, sft -> dpo is a pipeline,
and bad arguments fail before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_llama, make_tokenizer

from renyi_lora.cli import main
from renyi_lora.config import DPOConfig
from renyi_lora.data.preference import PreferenceCollator, load_preference_dataset
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.training.dpo import RenyiDPOTrainer

FAST = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "2", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SFT_RECORDS = [{"prompt": f"q{i}:", "completion": f" answer {i % 3}", "group": "even" if i % 2 == 0 else "odd"}
               for i in range(12)]
PREFERENCE_RECORDS = [{"prompt": f"q{i}:", "chosen": f" yes {i}", "rejected": f" NO {i}", "group": f"g{i % 2}"}
                      for i in range(12)]


def test_sft_writes_ensemble_peft_exports_and_summary(tmp_path, model_dir):
    peft = pytest.importorskip("peft")
    data = write_jsonl(tmp_path / "train.jsonl", SFT_RECORDS)
    out = tmp_path / "out"
    main(["sft", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--num_members", "3",
          "--alpha", "1", "--rank", "4", *FAST])
    summary = json.loads((out / "train_summary.json").read_text())
    assert set(summary["routing"]) == {"even", "odd"} and len(summary["routing"]["even"]) == 3
    assert all(abs(sum(row) - 1) < 1e-5 for row in summary["routing"].values())
    assert set(summary["member_group_nll"]) == {"even", "odd"}
    assert summary["num_examples"] == 12 and summary["num_truncated"] == 0
    ensemble = LoraEnsemble.from_pretrained(make_llama(len(make_tokenizer())), out)
    assert ensemble.num_members == 3 and ensemble.ensemble_config.rank == 4
    assert any(layer.lora_B.abs().sum() > 0 for layer in ensemble.lora_layers().values())  # it trained
    input_ids = torch.randint(4, 100, (2, 8))
    peft_model = peft.PeftModel.from_pretrained(make_llama(len(make_tokenizer())), out / "peft" / "member_2").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=input_ids).logits, ensemble(input_ids)[2], atol=1e-5, rtol=1e-5)


def test_sft_then_dpo_with_the_initial_reference(tmp_path, model_dir):
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    main(["sft", "--model", str(model_dir), "--data", str(write_jsonl(tmp_path / "s.jsonl", SFT_RECORDS)),
          "--output_dir", str(sft_out), "--num_members", "2", *FAST])
    preferences = write_jsonl(tmp_path / "p.jsonl", PREFERENCE_RECORDS)
    # Step 0: with each member's own SFT adapter as reference, every log-ratio is exactly zero.
    tokenizer = make_tokenizer()
    ensemble = LoraEnsemble.from_pretrained(make_llama(len(tokenizer)), sft_out)
    ensemble.freeze_reference()
    dataset = load_preference_dataset(preferences, tokenizer, 64)
    args = DPOConfig(output_dir=str(dpo_out), reference="initial", num_members=2, use_cpu=True, report_to="none")
    trainer = RenyiDPOTrainer(model=ensemble, args=args, train_dataset=dataset,
                              data_collator=PreferenceCollator(tokenizer.pad_token_id))
    batch = PreferenceCollator(tokenizer.pad_token_id)(dataset.examples[:5])
    batch.pop("group")
    with torch.no_grad():
        _, _, loglik = trainer.data_term(ensemble, batch)
    assert torch.equal(loglik, torch.full_like(loglik, torch.nn.functional.logsigmoid(torch.tensor(0.0)).item()))
    assert trainer._metrics["train"]["rewards/margins"] == [0.0]
    # The pipeline through the CLI.
    main(["dpo", "--model", str(model_dir), "--data", str(preferences), "--output_dir", str(dpo_out),
          "--adapters", str(sft_out), "--reference", "initial", "--beta", "0.1", *FAST])
    summary = json.loads((dpo_out / "train_summary.json").read_text())
    assert set(summary["routing"]) == {"g0", "g1"} and (dpo_out / "peft" / "member_1" / "adapter_config.json").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--alpha", "-1"], "alpha"),
    (["--num_members", "0"], "num_members"),
    (["--rank", "0"], "rank"),
    (["--target_modules", "no_such_proj"], "matched no linear module"),
    (["--model", "/no/such/model"], "no such folder"),
    (["--data", "/no/such/file.jsonl"], "not found"),
    (["--base_dtype", "float64"], "base_dtype"),
    (["--load_in_4bit", "true", "--load_in_8bit", "true"], "at most one"),
    pytest.param(["--load_in_4bit", "true"], "needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused on a CPU only")),
])
def test_bad_arguments_fail_cleanly(tmp_path, model_dir, flags, message, capsys):
    # In process (the entry point itself runs as a subprocess in test_bad_data_line_is_reported): an error the CLI
    # does not turn into one line would propagate here as an exception and fail the test.
    data = write_jsonl(tmp_path / "train.jsonl", SFT_RECORDS)
    argv = ["sft", "--model", str(model_dir), "--data", str(data), "--output_dir", str(tmp_path / "o"), *FAST]
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert message in stderr, stderr
    assert not (tmp_path / "o" / "train_summary.json").exists()


def test_bad_data_line_is_reported(tmp_path, model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(SFT_RECORDS[0]) + "\n" + '{"prompt": "x", "completion": 3}\n')
    result = subprocess.run([sys.executable, "-m", "renyi_lora.cli", "sft", "--model", str(model_dir), "--data",
                             str(data), "--output_dir", str(tmp_path / "o"), *FAST], capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "line 2" in result.stderr and "completion" in result.stderr and str(data) in result.stderr
    assert "Traceback" not in result.stderr
