"""Model card and hub upload of a trained folder: the card's metadata and body read back with ``ModelCard.load``,
the license carried over from a local base model, the files an upload selects, and an offline push failing with
one clear line. The real upload is not exercised (no network)."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub import ModelCard

from renyi_lora.cli import main
from renyi_lora.training.model_card import model_card, push_to_hub, upload_files, write_model_card

RECORDS = [{"prompt": f"q{i}:", "completion": f" answer {i % 3}", "group": "even" if i % 2 == 0 else "odd"}
           for i in range(8)]
COMMAND = "renyi-lora sft --model tiny --data train.jsonl --num_members 2 --max_steps 2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir):
    """A K=2 ensemble trained 2 steps, saving a checkpoint at every step (checkpoint-1, checkpoint-2)."""
    root = tmp_path_factory.mktemp("card")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    main(["sft", "--model", str(model_dir), "--data", str(data), "--output_dir", str(root / "out"),
          "--num_members", "2", "--rank", "2", "--alpha", "1", "--max_steps", "2", "--save_steps", "1",
          "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "true",
          "--use_cpu", "true", "--seed", "0"])
    return root / "out", data


def test_card_metadata_and_body(trained, model_dir):
    out, data = trained
    path = write_model_card(out, str(model_dir), datasets=[str(data), "someorg/some-data"], command=COMMAND)
    assert path == out / "README.md"
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["library_name"] == "renyi-lora" and meta["pipeline_tag"] == "text-generation"
    assert {"renyi-lora", "lora", "peft", "ensemble", "sft", "uncertainty"} <= set(meta["tags"])
    assert meta["datasets"] == ["someorg/some-data"]  # the local file only in the text
    assert "base_model" not in meta and "license" not in meta  # a local base folder without README metadata
    summary = json.loads((out / "train_summary.json").read_text())
    body = card.text
    for group in ("even", "odd"):
        routing = " | ".join(f"{w:.3f}" for w in summary["routing"][group])
        nll = " | ".join(f"{v:.3f}" for v in summary["member_group_nll"][group])
        assert f"| {group} | {routing} |" in body and f"| {group} | {nll} |" in body
    assert "| member 0 | member 1 |" in body and "member 2" not in body
    assert "| members K | 2 |" in body and "| alpha | 1.0 |" in body
    assert "| LoRA rank / lora_alpha / dropout | 2 / 16 / 0 |" in body
    assert "LoraEnsemble.from_pretrained(model, folder)" in body
    assert 'PeftModel.from_pretrained(base, f"{folder}/peft/member_0")' in body
    assert "renyi-lora eval" in body and "renyi-lora generate" in body
    assert COMMAND in body and str(data) in body and str(model_dir) in body


def test_hub_base_license_and_dpo(trained, tmp_path):
    out, _ = trained
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n\n# A base model\n")
    assert ModelCard.load(write_model_card(out, str(base))).data.license == "apache-2.0"
    assert model_card(out, str(base), license="mit").data.license == "mit"  # an explicit license wins
    hub = model_card(out, "someorg/some-base", repo_id="me/ensemble")
    assert hub.data.base_model == "someorg/some-base" and hub.data.license is None
    assert 'snapshot_download("me/ensemble")' in hub.text
    alias = model_card(out, "smollm2-135m").data
    assert (alias.base_model, alias.license) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    dpo = tmp_path / "dpo"
    shutil.copytree(out, dpo, ignore=shutil.ignore_patterns("checkpoint-*"))
    summary = json.loads((dpo / "train_summary.json").read_text())
    summary["config"].update(beta=0.1, reference="initial")
    (dpo / "train_summary.json").write_text(json.dumps(summary))
    card = model_card(dpo, "someorg/some-base")
    assert "dpo" in card.data.tags and "sft" not in card.data.tags and "beta 0.1" in card.text


def test_upload_files_excludes_checkpoints(trained, model_dir):
    out, _ = trained
    write_model_card(out, str(model_dir))
    assert (out / "checkpoint-1" / "optimizer.pt").is_file()  # there, and left out
    (out / ".adapters.safetensors.tmp-123").write_text("half written")
    files = upload_files(out)
    assert files == sorted(files)
    assert {"README.md", "adapters.safetensors", "ensemble_config.json", "train_summary.json",
            "peft/member_0/adapter_config.json", "peft/member_0/adapter_model.safetensors",
            "peft/member_1/adapter_model.safetensors"} <= set(files)
    assert not [f for f in files if "checkpoint-" in f or f.endswith((".pt", ".pth")) or ".tmp-" in f], files


def test_push_fails_with_one_clear_line(trained, monkeypatch):
    out, _ = trained
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"me/ensemble: offline mode is on \(HF_HUB_OFFLINE=1\)") as offline:
        push_to_hub(out, "me/ensemble")
    # Online but unreachable: the client's error becomes one line naming the repo and the cause (no network used).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known\n  (a second line)")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    with pytest.raises(RuntimeError, match="me/ensemble failed: ConnectionError: Name or service not known") as down:
        push_to_hub(out, "me/ensemble", token="hf_none")
    for error in (offline, down):
        assert "\n" not in str(error.value) and error.value.__cause__ is None
    with pytest.raises(FileNotFoundError, match="not a trained ensemble"):
        push_to_hub(out / "peft", "me/ensemble")
