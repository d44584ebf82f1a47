"""The quality benchmark's machinery: cached trunk states are exact, and the driver runs end to end offline."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from conftest import make_llama

from benchmarks.quality.trunk import TrunkStates, truncated_model
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble

pytestmark = pytest.mark.usefixtures("one_thread")


def padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max(map(len, rows))), pad)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def test_truncated_model_on_cached_states_equals_the_full_model(tokenizer):
    """LoRA members on the top 2 of 4 layers: per-token log-likelihoods of every target equal the full model's, for
    rows cached whole, rows served by their cached prompt (a one-token choice), and rows never cached."""
    model = make_llama(len(tokenizer), num_layers=4)
    pad = tokenizer.pad_token_id
    prompt, choices = [5, 9, 14, 3, 22], [[31], [40]]
    rows = [prompt + c for c in choices] + [[7, 8, 9, 10, 11, 12, 13], [50, 51, 52]]
    trunk = TrunkStates(model, 2, pad)
    trunk.add([prompt, rows[2]], progress=False)  # rows[3] is computed on demand
    config = dict(num_members=3, rank=4, init_seed=1, init_lora_b_std=0.2)
    full = LoraEnsemble(copy.deepcopy(model), EnsembleConfig(**config, layers_to_transform=[2, 3]))
    top = LoraEnsemble(truncated_model(trunk), EnsembleConfig(**config))
    assert len(top.model.model.layers) == 2 and len(model.model.layers) == 4  # the original is untouched
    with torch.no_grad():
        for name, layer in top.lora_layers().items():
            twin = full.lora_layers()[name.replace("layers.0.", "layers.2.").replace("layers.1.", "layers.3.")]
            layer.lora_A.copy_(twin.lora_A)
            layer.lora_B.copy_(twin.lora_B)
    ids, mask = padded(rows, pad)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want, got = full(ids, mask, labels=labels), top(ids, mask, labels=labels)  # [K, B, T]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert tuple(rows[3]) in trunk.states


def test_driver_runs_every_kind_of_row_offline(tokenizer, tmp_path):
    """A tiny model and fake MMLU-shaped files: base, single, deep ensemble and renyi rows give the table and JSON."""
    from benchmarks.quality.run import main

    model = make_llama(len(tokenizer), num_layers=3)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rng = random.Random(0)

    def item(subject: str) -> dict:
        return {"prompt": f"{subject}: {rng.choice('abcdef') * 3}? A. x B. y C. z D. w\nAnswer:",
                "choices": [" A", " B", " C", " D"], "answer": rng.randrange(4), "group": subject}

    for split, subjects, n in (("train", "st", 16), ("val", "st", 4), ("test", "st", 6), ("ood", "o", 4)):
        records = [item(rng.choice(subjects)) for _ in range(n)]
        if split == "train":
            records = [{"prompt": r["prompt"], "completion": r["choices"][r["answer"]], "group": r["group"]}
                       for r in records]
        name = "tiny_train.jsonl" if split == "train" else f"tiny_{split}_mc.jsonl"
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    main(["--task", "tiny", "--data_dir", str(tmp_path), "--model", str(tmp_path / "model"), "--top_layers", "1",
          "--num_members", "2", "--seeds", "0", "--epochs", "1", "--batch_size", "8", "--out", str(tmp_path / "out"),
          "--cache_dir", str(tmp_path / "cache"),
          "--rows", "base model", "LoRA r", "LoRA r + MC dropout x2", "deep ensemble K=2", "renyi K=2 a=1 + prior"])
    results = json.loads((tmp_path / "out" / "quality_tiny.json").read_text())
    assert list(results["summaries"]) == ["base model", "LoRA r", "LoRA r + MC dropout x2", "deep ensemble K=2",
                                          "renyi K=2 a=1 + prior"]
    for per_seed in results["summaries"].values():
        assert 0 <= per_seed[0]["acc"] <= 1 and per_seed[0]["ood_total"] is not None
    assert results["summaries"]["LoRA r"][0]["mi_in"] == 0  # one member: no disagreement
    assert results["summaries"]["renyi K=2 a=1 + prior"][0]["mi_in"] > 0
    assert results["summaries"]["LoRA r + MC dropout x2"][0]["mi_in"] > 0  # the dropout masks differ per member
    table = (tmp_path / "out" / "quality_tiny.md").read_text()
    assert "| deep ensemble K=2 | 1 |" in table
