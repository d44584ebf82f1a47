"""Bad input, systematically: malformed data files either load whole or fail with one ``DataError`` line naming
the file, a bad record and the field (property-based, hypothesis); bad CLI arguments fail before the model's
weights load."""

from __future__ import annotations

import json
import re

import pytest
from conftest import make_tokenizer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from renyi_lora.cli import main
from renyi_lora.data.preference import load_preference_dataset
from renyi_lora.data.records import KNOWN_FIELDS, DataError
from renyi_lora.data.sft import load_sft_dataset

TOKENIZER = make_tokenizer()
MAX_LENGTH = 48
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])

# --- Strategies: mostly valid files with a few corruptions ------------------------------------------------------

ODD_TEXT = st.sampled_from([
    " ", "\t", "\x00", "\u202e", "\u200b", "\u2028", "\ufeff", "e\u0301", "\U0001f600", "\\", '"', "\r\n",
    "<eos>", "<|im_start|>assistant\n",  # whitespace, controls, bidi, BOM, combining, emoji, special tokens
])
HUGE = st.integers(2000, 20000).map(lambda size: "x" * size)  # longer than max_length: truncated or an error
# Mostly plain text (st.text: any code point but lone surrogates), often odd, sometimes huge.
TEXT = st.integers(0, 9).flatmap(lambda i: HUGE if i == 0 else ODD_TEXT if i <= 3 else st.text(min_size=1, max_size=12))
BAD_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                      st.just(""), st.lists(st.integers(), max_size=2),
                      st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def turn(role: str) -> st.SearchStrategy:
    return st.fixed_dictionaries({"role": st.just(role), "content": TEXT})


CONVERSATION = st.one_of(st.tuples(turn("user"), turn("assistant")),
                         st.tuples(turn("system"), turn("user"), turn("assistant"), turn("user"), turn("assistant")))
VALID = {  # one strategy per format (and prompt style): records that load
    "standard": st.fixed_dictionaries({"prompt": st.one_of(st.just(""), TEXT), "completion": TEXT}),
    "conversational": st.fixed_dictionaries({"prompt": st.tuples(turn("user")).map(list),
                                             "completion": st.tuples(turn("assistant")).map(list)}),
    "messages": st.fixed_dictionaries({"messages": CONVERSATION.map(list)}),
    "text": st.fixed_dictionaries({"text": TEXT}),
    "preference": st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}),
    "conversational preference": st.fixed_dictionaries({
        "prompt": st.tuples(turn("user")).map(list), "chosen": st.tuples(turn("assistant")).map(list),
        "rejected": st.tuples(turn("assistant")).map(list)}),
}


def distinct_sides(record: dict) -> dict:
    """Equal chosen and rejected are an error (tested elsewhere): make the rejected side differ."""
    if record["chosen"] == record["rejected"]:
        rejected = record["rejected"]
        record["rejected"] = rejected + "!" if isinstance(rejected, str) else [
            {**rejected[0], "content": rejected[0]["content"] + "!"}]
    return record


for name in ("preference", "conversational preference"):
    VALID[name] = VALID[name].map(distinct_sides)
SFT_FORMATS = ["standard", "conversational", "messages", "text"]
PREFERENCE_FORMATS = ["preference", "conversational preference"]
GROUP = st.one_of(st.none(), TEXT.filter(str.strip), st.integers(-5, 5))  # valid groups; bad ones are corruptions
CORRUPTIONS = ["truncated line", "not an object", "invalid UTF-8", "bad field value", "bad nested value",
               "missing field", "foreign field", "another format", "bad group", "fields of any format"]


@st.composite
def corrupted(draw, record: dict, formats: list[str]) -> tuple[str, bytes]:
    """``(kind, line)``: a bad (or oddly good) version of ``record``."""
    kind = draw(st.sampled_from(CORRUPTIONS))
    record = json.loads(json.dumps(record))  # a deep copy
    field = draw(st.sampled_from(sorted(set(record) - {"group"})))
    if kind == "truncated line":
        line = json.dumps(record).encode()
        return kind, line[: draw(st.integers(1, len(line) - 1))]
    if kind == "not an object":
        return kind, json.dumps(draw(st.one_of(BAD_VALUE, TEXT, st.lists(TEXT, max_size=2)))).encode()
    if kind == "invalid UTF-8":
        return kind, draw(st.sampled_from([b"\xff\xfe{}", b'{"text": "\xc3"}', b'{"prompt": "\xed\xa0\x80"}']))
    if kind == "bad field value":
        record[field] = draw(BAD_VALUE)
    elif kind == "bad nested value" and isinstance(record[field], list):
        index = draw(st.integers(0, len(record[field]) - 1))
        key = draw(st.sampled_from(["role", "content", None]))
        if key is None:
            record[field][index] = draw(BAD_VALUE)
        else:
            record[field][index][key] = draw(st.one_of(BAD_VALUE, st.sampled_from(["bot", "assistant", ""])))
    elif kind == "missing field":
        del record[field]
    elif kind == "foreign field":
        record[draw(st.sampled_from(sorted(KNOWN_FIELDS - set(record))))] = draw(TEXT)
    elif kind == "another format":
        record = draw(st.sampled_from(sorted(VALID)).filter(lambda name: name not in formats).flatmap(VALID.get))
    elif kind == "bad group":
        record["group"] = draw(BAD_VALUE)
    elif kind == "fields of any format":
        record = draw(st.fixed_dictionaries({}, optional={name: st.one_of(TEXT, BAD_VALUE, CONVERSATION.map(list))
                                                           for name in sorted(KNOWN_FIELDS | {"group"})}))
    return kind, json.dumps(record, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def data_file(draw, formats: list[str]) -> list[bytes]:
    """Physical lines of a JSONL file: 1-5 valid records of one format, then 0-2 corruptions and 0-2 blank lines."""
    valid = VALID[draw(st.sampled_from(formats))]
    extras = st.fixed_dictionaries({}, optional={"group": GROUP, "id": st.integers()})  # 'id' is ignored
    records = draw(st.lists(st.builds(lambda r, e: {**r, **e}, valid, extras), min_size=1, max_size=5))
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())).encode() for r in records]
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        index = draw(st.integers(0, len(lines) - 1))
        kind, line = draw(corrupted(records[min(index, len(records) - 1)], formats))
        event(f"corruption: {kind}")
        if draw(st.booleans()):
            lines[index] = line
        else:
            lines.insert(index, line)
    for _ in range(draw(st.integers(0, 2))):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from([b"", b"  ", b"\t", b"\r"])))
    return lines


# --- The property ------------------------------------------------------------------------------------------------

def is_blank(line: bytes, first: bool) -> bool:
    """The reader's rule: a line that decodes to whitespace only (undecodable lines are not blank)."""
    try:
        return not line.decode("utf-8-sig" if first else "utf-8").strip()
    except UnicodeDecodeError:
        return False


def check_loads_whole_or_names_a_bad_record(loader, path, lines: list[bytes]) -> None:
    """Either every non-blank record becomes an example, or one ``DataError`` line names the file, a record
    (the first N lines alone give the same error: it is caused there, not by a later record) and, if any, a
    field of that record."""
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = [line for i, line in enumerate(lines) if not is_blank(line, i == 0)]
    try:
        dataset = loader(path, TOKENIZER, MAX_LENGTH)
    except DataError as error:
        message = str(error)
        assert "\n" not in message and message.startswith(str(path)), message
        match = re.match(re.escape(str(path)) + r", line (\d+)", message)
        if match is None:  # a whole-file problem: nothing readable in it
            assert not records, message
            event("DataError: whole file")
            return
        event("DataError: " + re.sub(r"[^a-z ]", "", message.split(": ", 1)[1].split(";")[0])[:30])
        number = int(match.group(1))
        assert 1 <= number <= len(lines) and not is_blank(lines[number - 1], number == 1), message
        path.write_bytes(b"\n".join(lines[:number]) + b"\n")
        with pytest.raises(DataError) as again:
            loader(path, TOKENIZER, MAX_LENGTH)
        assert str(again.value) == message
        field = re.search(r", field '([^']+)'", message)
        if field is not None:
            assert re.split(r"[\[.]", field.group(1))[0] in KNOWN_FIELDS | {"group"}, message
        return
    except Exception as error:  # noqa: BLE001 - the property: nothing but DataError escapes
        pytest.fail(f"{type(error).__name__} instead of DataError: {error}\nfile: {b'|'.join(lines)[:500]!r}")
    assert len(dataset) == len(records), "a record was skipped silently"
    event(f"loaded {min(len(records), 3)}+ records")
    for example in dataset.examples:
        assert all(isinstance(token, int) for token in example.get("input_ids", example.get("chosen_input_ids")))


@SETTINGS
@given(lines=data_file(SFT_FORMATS))
def test_sft_jsonl_loads_whole_or_fails_with_one_line(tmp_path, lines):
    check_loads_whole_or_names_a_bad_record(load_sft_dataset, tmp_path / "train.jsonl", lines)


@SETTINGS
@given(lines=data_file(PREFERENCE_FORMATS))
def test_preference_jsonl_loads_whole_or_fails_with_one_line(tmp_path, lines):
    check_loads_whole_or_names_a_bad_record(load_preference_dataset, tmp_path / "p.jsonl", lines)


@SETTINGS
@given(lines=data_file(SFT_FORMATS), cut=st.one_of(st.none(), st.floats(0, 0.99)))
def test_sft_json_list_loads_whole_or_fails_with_one_line(tmp_path, lines, cut):
    items = []
    for line in lines:  # the same records (and corruptions that parse as JSON) as the items of one JSON list
        try:
            items.append(json.loads(line))
        except ValueError:
            continue
    path = tmp_path / "train.json"
    text = json.dumps(items).encode()
    if cut is not None:  # a truncated file
        text = text[: int(len(text) * cut)]
    path.write_bytes(text)
    try:
        dataset = load_sft_dataset(path, TOKENIZER, MAX_LENGTH)
    except DataError as error:
        message = str(error)
        assert "\n" not in message and message.startswith(str(path)), message
        match = re.match(re.escape(str(path)) + r", item (\d+)", message)
        if match is not None:  # the first N items alone give the same error
            path.write_text(json.dumps(items[: int(match.group(1))]))
            with pytest.raises(DataError) as again:
                load_sft_dataset(path, TOKENIZER, MAX_LENGTH)
            assert str(again.value) == message
        event("DataError")
        return
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"{type(error).__name__} instead of DataError: {error}\nfile: {text[:500]!r}")
    assert cut is None and len(dataset) == len(items)
    event("loaded")


@pytest.mark.parametrize("record", [{"prompt": "q\ud800", "completion": "a"},
                                    {"messages": [{"role": "user", "content": "\udfff"},
                                                  {"role": "assistant", "content": "ok"}]}])
def test_lone_surrogate_is_a_data_error(tmp_path, record):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")  # ensure_ascii: written as the escape \ud800
    with pytest.raises(DataError, match="line 1"):
        load_sft_dataset(path, TOKENIZER, MAX_LENGTH)


# --- CLI arguments -------------------------------------------------------------------------------------------------
# tests/test_cli.py covers --alpha -1, --num_members 0, --rank 0, an unknown --target_modules (exit code and message),
# a missing --model folder and --data file. These add the other ranges, and that the weights never load.

SFT = [{"prompt": "q:", "completion": " a"}]
PREFERENCES = [{"prompt": "q:", "chosen": " yes", "rejected": " no"}]


@pytest.mark.parametrize(("command", "flags", "message"), [
    ("dpo", ["--reference", "initial"], "--reference initial needs --adapters"),
    ("dpo", ["--beta", "0"], "--beta must be > 0"),
    ("dpo", ["--beta", "-0.5"], "--beta must be > 0"),
    ("dpo", ["--reference", "sft"], "invalid choice"),
    ("sft", ["--alpha", "nan"], "--alpha must be >= 0"),
    ("sft", ["--lora_dropout", "1.0"], "lora_dropout must be in [0, 1)"),
    ("sft", ["--lora_dropout", "-0.1"], "lora_dropout must be in [0, 1)"),
    ("sft", ["--lora_alpha", "0"], "lora_alpha must be > 0"),
    ("sft", ["--prior_std", "0"], "--prior_std > 0"),
    ("sft", ["--prior_weight", "-1"], "--prior_weight >= 0"),
    ("sft", ["--num_members", "1.5"], "invalid int value"),
    ("sft", ["--max_length", "1"], "--max_length must be >= 2"),
    ("sft", ["--routing_level", "word"], "invalid choice"),
    ("sft", ["--nonfinite", "ignore"], "invalid choice"),
    ("sft", ["--target_modules", "no_such_proj"], "matched no linear module"),  # now before the weights load
    ("sft", ["--layers_to_transform", "99"], "matched no linear module"),
    ("sft", ["--adapters", "/no/such/ensemble"], "is not a saved ensemble"),
    ("dpo", ["--adapters", "/no/such/ensemble", "--reference", "initial"], "is not a saved ensemble"),
    ("sft", ["--resume_from_checkpoint", "/no/such/checkpoint-3"], "no such folder"),
    ("sft", ["--resume_from_checkpoint", "true"], "no complete checkpoint-N folder"),
])
def test_bad_arguments_fail_before_the_weights_load(tmp_path, model_dir, monkeypatch, capsys, command, flags,
                                                    message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the arguments were checked")

    monkeypatch.setattr("renyi_lora.training.prepare.load_model_and_tokenizer", no_loading)
    monkeypatch.delenv("RENYI_LORA_DEBUG", raising=False)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (SFT if command == "sft" else PREFERENCES)))
    with pytest.raises(SystemExit) as exited:
        main([command, "--model", str(model_dir), "--data", str(data), "--output_dir", str(tmp_path / "out"),
              "--use_cpu", "true", "--report_to", "none", *flags])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"renyi-lora {command}: error:") and message in last, last
    assert not (tmp_path / "out" / "train_summary.json").exists()
