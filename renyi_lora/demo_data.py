"""The demo's data, generated in code with a seed and written as ordinary JSONL files.

Two personas share every prompt of the *conflicting* part and disagree on the answer: ``british`` and
``american`` spelling conventions. Each example asks for three words, so a persona's convention shows on three
decisions inside one example and the group is identifiable (DESIGN.md, "When do members specialise?"). The
*consistent* part (capital cities) has one agreed answer. The multiple-choice set asks one word (or one
capital) at a time; a conflicting item appears once per persona with that persona's answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPELLINGS = [  # (british, american)
    ("colour", "color"), ("favour", "favor"), ("centre", "center"), ("theatre", "theater"), ("honour", "honor"),
    ("labour", "labor"), ("neighbour", "neighbor"), ("flavour", "flavor"), ("humour", "humor"), ("metre", "meter"),
    ("litre", "liter"), ("organise", "organize"), ("realise", "realize"), ("analyse", "analyze"),
    ("travelled", "traveled"), ("defence", "defense"), ("licence", "license"), ("catalogue", "catalog"),
    ("grey", "gray"), ("programme", "program"), ("behaviour", "behavior"), ("harbour", "harbor"),
    ("rumour", "rumor"), ("fibre", "fiber"), ("apologise", "apologize"), ("recognise", "recognize"),
    ("tyre", "tire"), ("aluminium", "aluminum"), ("jewellery", "jewelry"), ("cosy", "cozy"), ("plough", "plow"),
    ("mould", "mold"), ("sceptic", "skeptic"), ("cheque", "check"), ("dialogue", "dialog"), ("vigour", "vigor"),
]
CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Sweden", "Stockholm"),
]
SPELL_PROMPT = "Rewrite in house style: {}\n"
CAPITAL_PROMPT = "Capitals of: {}\n"
CONFLICTING = ("british", "american")
CONSISTENT = ("capitals",)


def spelling_records(rng: random.Random, pairs: list[tuple[str, str]], count: int, words: int = 3) -> list[dict]:
    """``count`` prompts, each written once per persona (same prompt, the persona's own spellings)."""
    records = []
    for _ in range(count):
        chosen = rng.sample(pairs, words)
        prompt = SPELL_PROMPT.format(", ".join(american for _, american in chosen))
        for group, index in (("british", 0), ("american", 1)):
            records.append({"prompt": prompt, "completion": ", ".join(p[index] for p in chosen), "group": group})
    return records


def capital_records(rng: random.Random, pairs: list[tuple[str, str]], count: int, words: int = 3) -> list[dict]:
    records = []
    for _ in range(count):
        chosen = rng.sample(pairs, words)
        records.append({"prompt": CAPITAL_PROMPT.format(", ".join(c for c, _ in chosen)),
                        "completion": ", ".join(city for _, city in chosen), "group": "capitals"})
    return records


def preference_records(rng: random.Random, pairs: list[tuple[str, str]], count: int) -> list[dict]:
    """Opposite tastes on the same prompts: each persona prefers its own spelling."""
    records = spelling_records(rng, pairs, count)  # british, american, british, american, ...
    paired = []
    for british, american in zip(records[::2], records[1::2], strict=True):
        paired.append({"prompt": british["prompt"], "chosen": british["completion"],
                       "rejected": american["completion"], "group": "british"})
        paired.append({"prompt": american["prompt"], "chosen": american["completion"],
                       "rejected": british["completion"], "group": "american"})
    return paired


def multiple_choice_records(pairs: list[tuple[str, str]], capitals: list[tuple[str, str]]) -> list[dict]:
    items = []
    for british, american in pairs:
        prompt = SPELL_PROMPT.format(american)
        for group, answer in (("british", 0), ("american", 1)):
            items.append({"prompt": prompt, "choices": [british, american], "answer": answer, "group": group})
    cities = [city for _, city in capitals]
    for i, (country, city) in enumerate(capitals):
        wrong = cities[(i + 7) % len(cities)]
        choices, answer = ([city, wrong], 0) if i % 2 == 0 else ([wrong, city], 1)
        items.append({"prompt": CAPITAL_PROMPT.format(country), "choices": choices, "answer": answer,
                      "group": "capitals"})
    return items


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_demo_data(directory: str | Path, seed: int = 0, train_prompts: int = 48) -> dict[str, Path]:
    """Write ``sft_train``, ``sft_test``, ``dpo_train``, ``dpo_test``, ``mc_test`` JSONL files; returns their paths.

    Held-out words (the last quarter of each list) appear only in the test files.
    """
    rng = random.Random(seed)
    spellings, capitals = SPELLINGS[:], CAPITALS[:]
    rng.shuffle(spellings)
    rng.shuffle(capitals)
    cut_s, cut_c = 3 * len(spellings) // 4, 3 * len(capitals) // 4
    train_s, test_s, train_c, test_c = spellings[:cut_s], spellings[cut_s:], capitals[:cut_c], capitals[cut_c:]
    out = Path(directory)
    return {
        "sft_train": write_jsonl(out / "sft_train.jsonl",
                                 spelling_records(rng, train_s, train_prompts)
                                 + capital_records(rng, train_c, train_prompts)),
        "sft_test": write_jsonl(out / "sft_test.jsonl",
                                spelling_records(rng, test_s, 8) + capital_records(rng, test_c, 8)),
        "dpo_train": write_jsonl(out / "dpo_train.jsonl", preference_records(rng, train_s, train_prompts)),
        "dpo_test": write_jsonl(out / "dpo_test.jsonl", preference_records(rng, test_s, 8)),
        "mc_test": write_jsonl(out / "mc_test.jsonl", multiple_choice_records(spellings, capitals)),
    }
