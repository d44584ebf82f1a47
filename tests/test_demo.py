"""The demo's generated data (structure the method's claims rest on) and a whole demo run on a tiny model."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
from conftest import make_tokenizer

from renyi_lora.data.preference import load_preference_dataset
from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.demo import PARTS, DemoArguments, run_demo
from renyi_lora.demo.data import CONFLICTING, CONSISTENT, ONE_DECISION, write_demo_data
from renyi_lora.evaluation.multiple_choice import load_multiple_choice


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo-data"), seed=3)


def test_files_load_with_the_library_readers(demo_files):
    tokenizer = make_tokenizer()
    sft = load_sft_dataset(demo_files["sft_train"], tokenizer, max_length=256)
    assert set(sft.group_names) == {*CONFLICTING, *ONE_DECISION, *CONSISTENT}
    assert len(load_preference_dataset(demo_files["dpo_train"], tokenizer, max_length=256)) > 0
    assert len(load_multiple_choice(demo_files["mc_test"])) > 0


def test_styles_share_every_prompt_and_disagree_on_three_words_each(demo_files):
    by_prompt = defaultdict(dict)
    for record in read(demo_files["sft_train"]):
        if record["group"] in CONFLICTING:
            by_prompt[record["prompt"]][record["group"]] = record["completion"].split(", ")
    assert by_prompt
    for styles in by_prompt.values():
        assert set(styles) == set(CONFLICTING)  # every prompt answered by every style
        for a in CONFLICTING:
            for b in CONFLICTING:
                if a < b:  # identifiable: each pair of styles differs on every one of the three words
                    assert all(x != y for x, y in zip(styles[a], styles[b], strict=True)), (a, b, styles)


def test_one_decision_conflict_and_consistent_part(demo_files):
    records = read(demo_files["sft_train"])
    answers = defaultdict(set)
    for record in records:
        if record["group"] in ONE_DECISION:
            answers[record["prompt"]].add(record["completion"])
            assert " " not in record["completion"]  # one word: one decision per example
    assert answers and all(len(a) == len(ONE_DECISION) for a in answers.values())
    capital_answers = defaultdict(set)
    for record in records:
        if record["group"] in CONSISTENT:
            capital_answers[record["prompt"]].add(record["completion"])
    assert all(len(a) == 1 for a in capital_answers.values())


def test_held_out_words_are_not_trained_on_and_the_seed_fixes_the_files(demo_files, tmp_path):
    train_prompts = {r["prompt"] for r in read(demo_files["sft_train"])}
    train_words = {w for p in train_prompts for w in p.split(": ", 1)[-1].strip().split(", ")}
    for item in read(demo_files["mc_test"]):
        if item["group"] in CONFLICTING:
            assert item["prompt"].split(": ", 1)[1].strip() not in train_words
    assert Counter(i["group"] for i in read(demo_files["mc_test"]))["capitals"] >= 8
    again = write_demo_data(tmp_path, seed=3)
    assert all(again[name].read_text() == path.read_text() for name, path in demo_files.items())


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, model_dir, one_thread):
    args = DemoArguments(output_dir=str(tmp_path / "demo"), model=str(model_dir), alphas=[0.0, 1.0], num_members=2,
                         max_steps=2, batch_size=4, top_layers=1)
    summary = run_demo(args)
    assert list(summary["runs"]) == ["K=2, alpha=0", "K=2, alpha=1", "single adapter (K=1)"]
    for run in summary["runs"].values():
        assert set(run["mi"]) == set(PARTS) and run["seconds_per_step"] > 0
        assert set(run["routing"]) == {*CONFLICTING, *ONE_DECISION, *CONSISTENT}
    report = (tmp_path / "demo" / "report.md").read_text()
    for image in ("routing_alpha_0.png", "routing_alpha_1.png", "mi.png"):
        assert f"images/{image}" in report and (tmp_path / "demo" / "images" / image).stat().st_size > 0
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["wall_seconds"] > 0
    assert "## Generations" in report and "member 1 (owns " in report
