"""The epoch study's driver (benchmarks.quality.epochs): its split, its snapshots, and a run end to end offline."""

from __future__ import annotations

import json
import random

import pytest
from conftest import make_llama

from benchmarks.quality.epochs import EpochArguments, main, split_task

pytestmark = pytest.mark.usefixtures("one_thread")


def write_mc(path, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = [{"prompt": f"q{i}: {rng.choice('abcdef') * 3}? A. x B. y C. z\nAnswer:", "choices": [" A", " B", " C"],
                "answer": rng.randrange(3), "group": "tiny"} for i in range(n)]
    records.append(dict(records[0]))  # an exact duplicate: kept once
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records[:n]


def test_split_is_disjoint_and_sized(tmp_path):
    records = write_mc(tmp_path / "tiny_mc.jsonl", 30)
    args = EpochArguments(task="tiny", data_dir=str(tmp_path), train_items=100, val_items=5, test_items=7,
                          cache_dir=str(tmp_path / "cache"))
    folder = split_task(args)
    read = {name: [json.loads(x) for x in (folder / f"tiny_{name}.jsonl").read_text().splitlines()]
            for name in ("train", "val_mc", "test_mc")}
    assert [len(read[n]) for n in ("train", "val_mc", "test_mc")] == [18, 5, 7]  # 30 distinct: 30 - 5 - 7 left
    prompts = [{r["prompt"] for r in read[n]} for n in read]
    assert sum(map(len, prompts)) == 30 and len(set.union(*prompts)) == 30
    gold = {r["prompt"]: r["choices"][r["answer"]] for r in records}
    assert all(r["completion"] == gold[r["prompt"]] for r in read["train"])
    assert split_task(args) == folder and (folder / "tiny_train.jsonl").read_text().count("\n") == 18  # same seed


def test_driver_scores_every_row_at_every_budget(tokenizer, tmp_path):
    """Tiny model, 16 training items in batches of 8 (2 steps an epoch), budgets 1 and 2 epochs, rows run in two parts
    and merged: every row has test and validation scores at both; the constant schedule makes the 1-epoch snapshot
    of a 2-epoch run equal a 1-epoch run; the K = 1 row has no disagreement, the ensembles do; the table, JSON and
    plot are written."""
    model = make_llama(len(tokenizer), num_layers=3)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_mc(tmp_path / "tiny_mc.jsonl", 26)
    common = ["--task", "tiny", "--data_dir", str(tmp_path), "--model", str(tmp_path / "model"), "--top_layers", "1",
              "--num_members", "2", "--train_items", "16", "--val_items", "4", "--test_items", "6", "--batch_size",
              "8", "--learning_rate", "1e-2", "--cache_dir", str(tmp_path / "cache")]
    rows = ["LoRA r", "deep ensemble K=2", "renyi K=2 a=0", "renyi K=2 a=1"]
    for tag, part in (("a", rows[:2]), ("b", rows[2:])):  # two processes' worth, merged below
        main(common + ["--epochs", "1", "2", "--rows", *part, "--out", str(tmp_path / "parts"), "--tag", tag])
    results = main(["--merge", str(tmp_path / "parts" / "quality_epochs_a.json"),
                    str(tmp_path / "parts" / "quality_epochs_b.json"), "--out", str(tmp_path / "out")])
    assert list(results) == rows
    for row in rows:
        assert sorted(results[row][0]["epochs"]) == [1, 2]
        for got in results[row][0]["epochs"].values():
            assert set(got) == {"val", "test"} and 0 <= got["test"]["acc"] <= 1 and got["test"]["nll"] > 0
    assert results["LoRA r"][0]["epochs"][2]["test"]["mi"] == 0
    assert results["deep ensemble K=2"][0]["epochs"][2]["test"]["mi"] > 0
    assert results["renyi K=2 a=0"][0]["epochs"][2]["test"]["mi"] > 0
    one, two = results["LoRA r"][0]["epochs"][1]["test"], results["LoRA r"][0]["epochs"][2]["test"]
    assert one["nll"] != two["nll"]  # the snapshots differ: the second epoch moved the adapter
    short = main(common + ["--epochs", "1", "--rows", "LoRA r", "--out", str(tmp_path / "short")])
    assert short["LoRA r"][0]["epochs"][1]["test"]["nll"] == pytest.approx(one["nll"], rel=1e-5)
    saved = json.loads((tmp_path / "out" / "quality_epochs.json").read_text())
    assert saved["target"]["epochs"] in (1, 2) and "renyi K=2 a=1" in saved["target"]
    text = (tmp_path / "out" / "quality_epochs.md").read_text()
    assert "| deep ensemble K=2 |" in text and "| renyi K=2 a=0 |" in text and "Target for renyi K=2 a=1" in text
    assert "--tag a" in text and "--tag b" in text  # both commands
    assert (tmp_path / "out" / "quality_epochs.png").stat().st_size > 0
