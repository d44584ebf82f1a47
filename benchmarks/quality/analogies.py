"""Word analogies as a quality-benchmark task: categories seen in training vs categories held out entirely.

gensim's ``questions-words.txt`` (Mikolov et al., 2013; Apache-2.0 with gensim) holds 14 categories of analogies
("Athens is to Greece as Baghdad is to" -> " Iraq"). A 135M model answers them well above chance after a little
fine-tuning, so they test what MMLU at this size cannot: calibration and out-of-distribution detection where the
single adapter is clearly above chance. ``renyi_lora.demo.analogies`` draws the questions (answers disjoint between
training and evaluation); here the in-distribution categories are split into train / validation / test and the
held-out categories give the out-of-distribution items. Usage:

    python -m benchmarks.quality.analogies --out benchmarks/quality/data [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from renyi_lora.demo.analogies import build_analogy_data, read_analogies, write_jsonl

OOD_CATEGORIES = ("currency", "family", "gram2-opposite", "gram5-present-participle")
SIZES = {False: {"train": 48, "val": 12, "test": 24}, True: {"train": 24, "val": 8, "test": 10}}


def build_analogies(out_dir: str | Path, seed: int = 0, quick: bool = False, questions: str | Path | None = None,
                    ood_categories: tuple[str, ...] = OOD_CATEGORIES) -> dict[str, int]:
    """Write ``analogies_train.jsonl`` (SFT), ``analogies_{val,test,ood}_mc.jsonl``; returns the record counts."""
    analogies = read_analogies(questions)
    unknown = set(ood_categories) - set(analogies)
    if unknown:
        raise ValueError(f"unknown OOD categories {sorted(unknown)}; the file has {sorted(analogies)}")
    sizes = SIZES[quick]
    sft, mc = build_analogy_data(analogies, seed, sizes["train"], sizes["val"] + sizes["test"])
    files: dict[str, list[dict]] = {"train": [r for r in sft if r["group"] not in ood_categories],
                                    "val_mc": [], "test_mc": [], "ood_mc": []}
    rng = random.Random(f"{seed}-analogies-split")
    for category in analogies:
        items = [r for r in mc if r["group"] == category]
        rng.shuffle(items)
        if category in ood_categories:
            files["ood_mc"] += items[: sizes["test"]]
        else:
            files["val_mc"] += items[: sizes["val"]]
            files["test_mc"] += items[sizes["val"]:]
    out = Path(out_dir)
    for name, records in files.items():
        write_jsonl(out / f"analogies_{name}.jsonl", records)
    counts = {name: len(records) for name, records in files.items()}
    (out / "analogies_manifest.json").write_text(json.dumps({"seed": seed, "quick": quick, "sizes": sizes,
                                                             "ood_categories": list(ood_categories),
                                                             "counts": counts}, indent=1) + "\n")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/quality/data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(build_analogies(args.out, args.seed, args.quick))


if __name__ == "__main__":
    main()
