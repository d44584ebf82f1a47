"""The demo's data, generated in code with a seed and written as ordinary JSONL files.

Three parts, each a kind of (dis)agreement (docs/specialisation.md):

- **Conflicting, identifiable**: four house styles share every prompt ("rewrite these three words") and disagree
  on the answer: British or American spelling, lower case or Title Case. A style shows on three words inside one
  example, so one example says which style wrote it: the groups are identifiable, and at alpha >= 1 members
  should become one style's specialist each.
- **Conflicting, one decision**: two annotators answer "tea or coffee with <food>?" with their own taste, one word
  per example. One member answering 50/50 represents this conflict exactly (alpha = 1 is the flat boundary), so
  nothing forces a split.
- **Consistent**: capital cities, one agreed answer (three per example).

The multiple-choice set asks one word (or one capital) at a time; a conflicting item appears once per group with
that group's answer, so no single predictor can be right on both sides of a conflict.
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
    ("Thailand", "Bangkok"), ("Hungary", "Budapest"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("Turkey", "Ankara"), ("Argentina", "Buenos Aires"), ("Australia", "Canberra"),
    ("India", "New Delhi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Vietnam", "Hanoi"),
]
FOODS = [
    "toast", "cake", "biscuits", "pancakes", "scones", "waffles", "muffins", "porridge", "croissants", "cookies",
    "bagels", "doughnuts", "crumpets", "brownies", "shortbread", "cheesecake", "flapjacks", "fruit", "eggs", "jam",
    "pie", "crackers", "cereal", "oatcakes",
]
SPELL_PROMPT = "Rewrite in house style: {}\n"
CAPITAL_PROMPT = "Capitals of: {}\n"
TASTE_PROMPT = "Tea or coffee with {}?\n"
STYLES = {  # group -> (spelling: 0 British / 1 American, case)
    "uk": (0, str.lower), "us": (1, str.lower), "uk_title": (0, str.title), "us_title": (1, str.title),
}
TASTES = {"tea": "tea", "coffee": "coffee"}
CONFLICTING = tuple(STYLES)  # identifiable: a style shows on three words per example
ONE_DECISION = tuple(TASTES)  # a conflict one member can represent as 50/50
CONSISTENT = ("capitals",)


def spelling_records(rng: random.Random, pairs: list[tuple[str, str]], count: int, words: int = 3,
                     styles: tuple[str, ...] = CONFLICTING) -> list[dict]:
    """``count`` prompts, each written once per style (the same prompt, the style's own spellings and case)."""
    records = []
    for _ in range(count):
        chosen = rng.sample(pairs, words)
        prompt = SPELL_PROMPT.format(", ".join(american for _, american in chosen))
        for group in styles:
            spelling, case = STYLES[group]
            records.append({"prompt": prompt, "completion": ", ".join(case(p[spelling]) for p in chosen),
                            "group": group})
    return records


def capital_records(rng: random.Random, pairs: list[tuple[str, str]], count: int, words: int = 3) -> list[dict]:
    records = []
    for _ in range(count):
        chosen = rng.sample(pairs, words)
        records.append({"prompt": CAPITAL_PROMPT.format(", ".join(c for c, _ in chosen)),
                        "completion": ", ".join(city for _, city in chosen), "group": "capitals"})
    return records


def taste_records(foods: list[str]) -> list[dict]:
    """Each food asked once per annotator, answered with that annotator's taste."""
    return [{"prompt": TASTE_PROMPT.format(food), "completion": answer, "group": group}
            for food in foods for group, answer in TASTES.items()]


def preference_records(rng: random.Random, pairs: list[tuple[str, str]], count: int) -> list[dict]:
    """Opposite tastes on the same prompts: the ``uk`` and ``us`` styles each prefer their own spelling."""
    records = spelling_records(rng, pairs, count, styles=("uk", "us"))  # uk, us, uk, us, ...
    paired = []
    for british, american in zip(records[::2], records[1::2], strict=True):
        paired.append({"prompt": british["prompt"], "chosen": british["completion"],
                       "rejected": american["completion"], "group": "uk"})
        paired.append({"prompt": american["prompt"], "chosen": american["completion"],
                       "rejected": british["completion"], "group": "us"})
    return paired


def multiple_choice_records(pairs: list[tuple[str, str]], capitals: list[tuple[str, str]],
                            foods: list[str]) -> list[dict]:
    items = []
    for british, american in pairs:
        prompt = SPELL_PROMPT.format(american)
        for group, (spelling, case) in STYLES.items():
            items.append({"prompt": prompt, "choices": [case(british), case(american)], "answer": spelling,
                          "group": group})
    for food in foods:
        for group in TASTES:
            items.append({"prompt": TASTE_PROMPT.format(food), "choices": list(TASTES.values()),
                          "answer": list(TASTES).index(group), "group": group})
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


def write_demo_data(directory: str | Path, seed: int = 0, train_prompts: int = 32) -> dict[str, Path]:
    """Write ``sft_train``, ``sft_test``, ``dpo_train``, ``dpo_test``, ``mc_test`` JSONL files; returns their paths.

    ``train_prompts`` spelling prompts (each written in all four styles) and as many capital prompts; held-out
    words, countries and foods (the last quarter of each list) appear only in the test files.
    """
    rng = random.Random(seed)
    spellings, capitals, foods = SPELLINGS[:], CAPITALS[:], FOODS[:]
    for values in (spellings, capitals, foods):
        rng.shuffle(values)
    cut_s, cut_c, cut_f = (3 * len(v) // 4 for v in (spellings, capitals, foods))
    train_s, test_s, train_c, test_c = spellings[:cut_s], spellings[cut_s:], capitals[:cut_c], capitals[cut_c:]
    train_f, test_f = foods[:cut_f], foods[cut_f:]
    out = Path(directory)
    return {
        "sft_train": write_jsonl(out / "sft_train.jsonl",
                                 spelling_records(rng, train_s, train_prompts)
                                 + capital_records(rng, train_c, train_prompts) + taste_records(train_f)),
        "sft_test": write_jsonl(out / "sft_test.jsonl", spelling_records(rng, test_s, 8)
                                + capital_records(rng, test_c, 8) + taste_records(test_f)),
        "dpo_train": write_jsonl(out / "dpo_train.jsonl", preference_records(rng, train_s, train_prompts)),
        "dpo_test": write_jsonl(out / "dpo_test.jsonl", preference_records(rng, test_s, 8)),
        "mc_test": write_jsonl(out / "mc_test.jsonl", multiple_choice_records(test_s, test_c, test_f)),
    }
