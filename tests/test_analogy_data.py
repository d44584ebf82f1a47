"""The real-text demo's data builder: disjoint, balanced, valid and loadable (no model, no training)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.demo import analogies as analogy_data
from renyi_lora.demo.analogies import NUM_CHOICES, build_analogy_data, read_analogies, write_analogy_data
from renyi_lora.evaluation.multiple_choice import load_multiple_choice

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                                  reason="gensim's questions-words.txt is needed: pip install --no-deps gensim")

CATEGORIES = ["capital-common-countries", "capital-world", "currency", "city-in-state", "family",
              "gram1-adjective-to-adverb", "gram2-opposite", "gram3-comparative", "gram4-superlative",
              "gram5-present-participle", "gram6-nationality-adjective", "gram7-past-tense", "gram8-plural",
              "gram9-plural-verbs"]


@pytest.fixture(scope="module")
def analogies() -> dict:
    return read_analogies()


@pytest.fixture(scope="module")
def built(analogies) -> tuple[list[dict], list[dict]]:
    return build_analogy_data(analogies, seed=0, train_per_group=24, test_per_group=12)


def _answer(item: dict) -> str:
    return item["choices"][item["answer"]].strip()


@needs_gensim
def test_reads_the_fourteen_categories(analogies):
    assert list(analogies) == CATEGORIES
    assert sum(len(lines) for lines in analogies.values()) == 19544  # the file's 19,558 lines less 14 headers


@needs_gensim
def test_balanced_over_categories(built):
    sft, multiple_choice = built
    assert Counter(r["group"] for r in sft) == dict.fromkeys(CATEGORIES, 24)
    assert Counter(r["group"] for r in multiple_choice) == dict.fromkeys(CATEGORIES, 12)
    assert len({(r["prompt"], r["completion"]) for r in sft}) == len(sft)  # no repeated training example
    assert len({r["prompt"] for r in multiple_choice}) == len(multiple_choice)


@needs_gensim
def test_train_and_test_are_disjoint_by_answer_word(built):
    sft, multiple_choice = built
    train_words = {word for r in sft for word in (r["prompt"] + r["completion"]).split()}
    train_pairs = {(r["prompt"], r["completion"].strip()) for r in sft}
    for item in multiple_choice:
        assert (item["prompt"], _answer(item)) not in train_pairs
        choices = {c.strip() for c in item["choices"]}
        assert not choices & train_words, "a test answer or distractor appears in training (in any category)"


@needs_gensim
def test_multiple_choice_items_are_valid(analogies, built):
    _, multiple_choice = built
    lines = {(x.category, x.prompt, x.d): x for group in analogies.values() for x in group}
    valid: dict[tuple[str, str], set[str]] = {}
    for group in analogies.values():
        for x in group:
            valid.setdefault((x.category, x.c), set()).add(x.d)
    for item in multiple_choice:
        assert len(item["choices"]) == NUM_CHOICES and len(set(item["choices"])) == NUM_CHOICES
        assert 0 <= item["answer"] < NUM_CHOICES and all(c.startswith(" ") for c in item["choices"])
        analogy = lines[(item["group"], item["prompt"], _answer(item))]  # the file's d for this prompt
        distractors = {c.strip() for i, c in enumerate(item["choices"]) if i != item["answer"]}
        assert not distractors & valid[(analogy.category, analogy.c)]
        assert not distractors & {analogy.a, analogy.b, analogy.c}
    assert len({item["answer"] for item in multiple_choice}) == NUM_CHOICES  # answers are shuffled


@needs_gensim
def test_seeded(analogies, built):
    assert build_analogy_data(analogies, seed=0) == built
    assert build_analogy_data(analogies, seed=1) != built


@needs_gensim
def test_loadable(tmp_path, tokenizer):
    paths = write_analogy_data(tmp_path, seed=0, train_per_group=4, test_per_group=3)
    dataset = load_sft_dataset(paths["sft_train"], tokenizer, max_length=64)
    assert len(dataset) == 4 * len(CATEGORIES) and dataset.group_names == CATEGORIES
    assert dataset.num_truncated == 0
    items = load_multiple_choice(paths["mc_test"])
    assert len(items) == 3 * len(CATEGORIES)
    assert [item.group for item in items] == [r["group"] for r in map(json.loads, paths["mc_test"].open())]


def test_missing_gensim_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(analogy_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim"):
        read_analogies()
