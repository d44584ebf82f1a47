"""Real text for the demo: the 14 categories of word-analogy questions shipped in gensim's test data.

``gensim/test/test_data/questions-words.txt`` (Mikolov et al., 2013) holds lines ``a b c d`` ("Athens Greece
Baghdad Iraq") under section headers ``: capital-common-countries`` ... ``: gram9-plural-verbs``. We read the
file from the installed package's folder without importing gensim (only the file is needed), and turn it into a
multi-task data set with one group per category:

- an SFT set of ``{"prompt": "a is to b as c is to", "completion": " d", "group": category}``, the same number
  of examples per category;
- a held-out multiple-choice set with the same prompt and four choices: the answer and three distractors drawn
  from the same category's held-out answers (never a word of the prompt, never another valid answer for ``c``).

Train and test are disjoint by answer word, not only by line: in every category a fraction of the distinct
answers ``d`` is held out, a training line contains no held-out word, and every test question's answer is a
held-out word. A word held out in one category is kept out of every category's training lines, so no test
answer (nor any distractor) ever appears in training, and the fine-tuned adapters cannot win by preferring
words they were trained to emit.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from renyi_lora.demo.data import write_jsonl

QUESTIONS_FILE = Path("test") / "test_data" / "questions-words.txt"
INSTALL_HINT = "pip install --no-deps gensim"
PROMPT = "{} is to {} as {} is to"
NUM_CHOICES = 4


@dataclass(frozen=True)
class Analogy:
    """One line ``a b c d`` of the questions file: ``a`` is to ``b`` as ``c`` is to ``d``."""

    a: str
    b: str
    c: str
    d: str
    category: str

    @property
    def prompt(self) -> str:
        return PROMPT.format(self.a, self.b, self.c)

    @property
    def words(self) -> tuple[str, str, str, str]:
        return self.a, self.b, self.c, self.d


def questions_path() -> Path:
    """Path of ``questions-words.txt`` inside the installed gensim package (found, never imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real-text demo reads gensim's word-analogy test file, but the package 'gensim' "
                                f"is not installed; install it with: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / QUESTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed gensim package; expected gensim's test data "
                                f"(reinstall with: {INSTALL_HINT})")
    return path


def read_analogies(path: str | Path | None = None) -> dict[str, list[Analogy]]:
    """Category -> its analogies in file order (duplicates dropped); ``path`` defaults to gensim's file."""
    path = Path(path) if path is not None else questions_path()
    categories: dict[str, list[Analogy]] = {}
    seen: set[tuple[str, ...]] = set()
    category = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if fields[0] == ":":
            category = " ".join(fields[1:])
            categories.setdefault(category, [])
            continue
        if category is None or len(fields) != 4:
            raise ValueError(f"{path}, line {number}: expected ': category' or four words 'a b c d', got {line!r}")
        if (category, *fields) not in seen:
            seen.add((category, *fields))
            categories[category].append(Analogy(*fields, category=category))
    return categories


def split_answers(analogies: list[Analogy], rng: random.Random, held_out_fraction: float,
                  min_held_out: int = NUM_CHOICES + 2) -> set[str]:
    """A random ``held_out_fraction`` (at least ``min_held_out``) of the category's distinct answers ``d``."""
    answers = sorted({x.d for x in analogies})
    rng.shuffle(answers)
    count = max(round(held_out_fraction * len(answers)), min_held_out)
    if count >= len(answers):
        raise ValueError(f"category {analogies[0].category!r} has only {len(answers)} distinct answers; cannot hold "
                         f"out {count} and keep some for training")
    return set(answers[:count])


def multiple_choice_item(analogy: Analogy, held_out: set[str], valid: set[str], rng: random.Random) -> dict | None:
    """The question with its answer and three distractors from ``held_out`` (excluding the prompt's words and the
    ``valid`` answers for ``c``), shuffled; None if fewer than three distractors are left."""
    pool = sorted(held_out - valid - {analogy.a, analogy.b, analogy.c})
    if len(pool) < NUM_CHOICES - 1:
        return None
    choices = [analogy.d, *rng.sample(pool, NUM_CHOICES - 1)]
    rng.shuffle(choices)
    return {"prompt": analogy.prompt, "choices": [f" {word}" for word in choices], "answer": choices.index(analogy.d),
            "group": analogy.category}


def build_analogy_data(analogies: dict[str, list[Analogy]], seed: int = 0, train_per_group: int = 24,
                       test_per_group: int = 12, held_out_fraction: float = 0.25) -> tuple[list[dict], list[dict]]:
    """``(sft_records, multiple_choice_records)``, balanced over categories and disjoint by answer word.

    Training examples are drawn without replacement from the lines that contain no held-out word (of any
    category); test questions
    cycle over the held-out ``(c, d)`` pairs in random order so that they spread over the held-out answers.
    """
    if train_per_group < 1 or test_per_group < 1:
        raise ValueError(f"train_per_group and test_per_group must be >= 1; got {train_per_group}, {test_per_group}")
    rng = random.Random(seed)
    held_out_by_category = {category: split_answers(lines, rng, held_out_fraction)
                            for category, lines in analogies.items()}
    everywhere = set().union(*held_out_by_category.values())  # capital-world shares countries with the common ones
    sft, multiple_choice = [], []
    for category, lines in analogies.items():
        held_out = held_out_by_category[category]
        train = [x for x in lines if not everywhere.intersection(x.words)]
        if len(train) < train_per_group:
            raise ValueError(f"category {category!r}: only {len(train)} training lines; asked for {train_per_group}")
        sft += [{"prompt": x.prompt, "completion": f" {x.d}", "group": category}
                for x in rng.sample(train, train_per_group)]
        valid: dict[str, set[str]] = {}
        for x in lines:
            valid.setdefault(x.c, set()).add(x.d)
        by_pair: dict[tuple[str, str], list[Analogy]] = {}
        for x in lines:
            if x.d in held_out:
                by_pair.setdefault((x.c, x.d), []).append(x)
        pairs = sorted(by_pair)
        rng.shuffle(pairs)
        items: list[dict] = []
        while len(items) < test_per_group and any(by_pair.values()):
            for pair in pairs:
                candidates = by_pair[pair]
                while candidates and len(items) < test_per_group:
                    item = multiple_choice_item(candidates.pop(rng.randrange(len(candidates))), held_out,
                                                valid[pair[0]], rng)
                    if item is not None:
                        items.append(item)
                        break
        if len(items) < test_per_group:
            raise ValueError(f"category {category!r}: only {len(items)} test questions; asked for {test_per_group}")
        multiple_choice += items
    return sft, multiple_choice


def write_analogy_data(directory: str | Path, seed: int = 0, train_per_group: int = 24, test_per_group: int = 12,
                       questions: str | Path | None = None) -> dict[str, Path]:
    """Write ``analogy_sft_train.jsonl`` and ``analogy_mc_test.jsonl``; returns their paths as ``sft_train`` and
    ``mc_test``. ``questions`` defaults to gensim's file (a clear error names the pip command if it is missing)."""
    sft, multiple_choice = build_analogy_data(read_analogies(questions), seed, train_per_group, test_per_group)
    out = Path(directory)
    return {"sft_train": write_jsonl(out / "analogy_sft_train.jsonl", sft),
            "mc_test": write_jsonl(out / "analogy_mc_test.jsonl", multiple_choice)}
