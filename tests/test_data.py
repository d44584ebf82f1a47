"""Data formats, validation, tokenisation and collation (renyi_lora.data.sft, renyi_lora.data.preference)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

import renyi_lora
from renyi_lora.data import preference as preference_data
from renyi_lora.data import sft as data
from renyi_lora.data.preference import PreferenceCollator, load_preference_dataset
from renyi_lora.data.records import DataError, read_records
from renyi_lora.data.sft import IGNORE_INDEX, SFTCollator, load_sft_dataset
from renyi_lora.evaluation import multiple_choice as evaluate
from renyi_lora.evaluation.multiple_choice import load_multiple_choice

USER = {"role": "user", "content": "hi"}
SYSTEM = {"role": "system", "content": "be brief"}


def write(path: Path, records: list) -> Path:
    """Write ``records`` as JSONL, a JSON list or a Parquet table, by the suffix of ``path``."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def target_runs(tokenizer, example: dict, prefix: str = "") -> list[str]:
    """Decoded maximal runs of target tokens, in order."""
    runs, current = [], []
    for token, label in zip(example[f"{prefix}input_ids"], example[f"{prefix}labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.fixture
def bos_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The test tokenizer plus a ``<bos>`` that it adds by default, like Llama's."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    result = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", pad_token="<pad>", eos_token="<eos>")
    result.chat_template = tokenizer.chat_template
    return result


@pytest.fixture
def merging_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The test tokenizer with one merge, ``a b -> ab``, so that tokens can span a prompt/completion boundary."""
    vocab = dict(tokenizer.get_vocab())
    vocab["ab"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token=None))
    backend.add_special_tokens(["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


# ---------------------------------------------------------------------------------------------- tokenisation


def test_prompt_completion_labels_are_completion_then_eos(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?", "completion": " 4"}])
    example = load_sft_dataset(path, tokenizer)[0]
    prompt, completion = ids(tokenizer, "Q: 2+2?"), ids(tokenizer, " 4") + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + completion
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert example["group"] == -1


def test_completion_already_ending_in_eos_gets_no_second_eos(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A<eos>"}])
    example = load_sft_dataset(path, tokenizer)[0]
    assert example["labels"][-2:] == [ids(tokenizer, "A")[0], tokenizer.eos_token_id]
    assert example["input_ids"].count(tokenizer.eos_token_id) == 1


def test_bos_adding_tokenizer_gets_exactly_one_bos(bos_tokenizer, tmp_path):
    bos = bos_tokenizer.bos_token_id
    path = write(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A"}])
    example = load_sft_dataset(path, bos_tokenizer)[0]
    assert example["input_ids"] == [bos, *ids(bos_tokenizer, "QA"), bos_tokenizer.eos_token_id]
    assert example["labels"][:2] == [IGNORE_INDEX, IGNORE_INDEX]
    text = load_sft_dataset(write(tmp_path / "t.jsonl", [{"text": "hello"}]), bos_tokenizer)[0]
    assert text["input_ids"] == [bos, *ids(bos_tokenizer, "hello"), bos_tokenizer.eos_token_id]
    # Chat-template text: the template owns BOS (this one has none), nothing is added.
    chat = load_sft_dataset(write(tmp_path / "m.jsonl", [{"messages": [USER, {"role": "assistant", "content": "yo"}]}]),
                            bos_tokenizer)[0]
    assert bos not in chat["input_ids"]


def test_tokens_merged_across_the_boundary_fall_back_to_separate_parts(merging_tokenizer, tmp_path):
    assert ids(merging_tokenizer, "xab")[: len(ids(merging_tokenizer, "xa"))] != ids(merging_tokenizer, "xa")
    example = load_sft_dataset(write(tmp_path / "d.jsonl", [{"prompt": "xa", "completion": "b"}]), merging_tokenizer)[0]
    prompt, completion = ids(merging_tokenizer, "xa"), ids(merging_tokenizer, "b") + [merging_tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + completion
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion


MESSAGES = [SYSTEM, USER, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "done"}]


def test_messages_targets_are_assistant_turns_only(tokenizer, tmp_path):
    """Rule: an assistant turn's target is its content, the end-of-turn marker and the turn's trailing newline."""
    example = load_sft_dataset(write(tmp_path / "d.jsonl", [{"messages": MESSAGES}]), tokenizer)[0]
    assert tokenizer.decode(example["input_ids"]) == render(tokenizer, MESSAGES)
    assert target_runs(tokenizer, example) == ["yo<|im_end|>\n", "done<|im_end|>\n"]


def test_messages_without_offsets_match_the_fast_path(tokenizer, tmp_path, monkeypatch):
    path = write(tmp_path / "d.jsonl", [{"messages": MESSAGES}])
    fast = load_sft_dataset(path, tokenizer)[0]
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    assert load_sft_dataset(path, tokenizer)[0] == fast


def test_text_every_token_is_a_target(tokenizer, tmp_path):
    example = load_sft_dataset(write(tmp_path / "d.jsonl", [{"text": "hello world"}]), tokenizer)[0]
    assert example["input_ids"] == ids(tokenizer, "hello world") + [tokenizer.eos_token_id]
    assert example["labels"] == example["input_ids"]


def test_conversational_prompt_completion(tokenizer, tmp_path):
    prompt, completion = [SYSTEM, USER], [{"role": "assistant", "content": "yo"}]
    path = write(tmp_path / "d.jsonl", [{"prompt": prompt, "completion": completion}])
    example = load_sft_dataset(path, tokenizer)[0]
    num_prompt = len(ids(tokenizer, render(tokenizer, prompt, generation_prompt=True)))
    assert tokenizer.decode(example["input_ids"]) == render(tokenizer, prompt + completion)
    assert example["labels"][:num_prompt] == [IGNORE_INDEX] * num_prompt
    assert target_runs(tokenizer, example) == ["yo<|im_end|>\n"]  # no eos: the end-of-turn marker ends it


RECORDS = {
    "sft": [{"prompt": "Q1", "completion": "A1", "group": "x"}, {"prompt": "Q2", "completion": "A2"},
            {"prompt": "Q3", "completion": "A3", "group": "y"}],
    "messages": [{"messages": MESSAGES, "group": "x"}, {"messages": [USER, {"role": "assistant", "content": "z"}]}],
    "preference": [{"prompt": "Q", "chosen": "good", "rejected": "bad", "group": "x"},
                   {"prompt": "R", "chosen": "yes", "rejected": "no"}],
}


@pytest.mark.parametrize("kind", sorted(RECORDS))
@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_json_and_parquet_give_the_jsonl_examples(tokenizer, tmp_path, kind, suffix):
    load = load_preference_dataset if kind == "preference" else load_sft_dataset
    reference = load(write(tmp_path / "d.jsonl", RECORDS[kind]), tokenizer)
    other = load(write(tmp_path / f"d{suffix}", RECORDS[kind]), tokenizer)
    assert other.examples == reference.examples
    assert other.group_names == reference.group_names == ["x"] + (["y"] if kind == "sft" else [])


def test_preference_tokenises_both_sides_after_the_prompt(tokenizer, tmp_path):
    example = load_preference_dataset(write(tmp_path / "d.jsonl", RECORDS["preference"][:1]), tokenizer)[0]
    prompt = ids(tokenizer, "Q")
    for side, text in (("chosen", "good"), ("rejected", "bad")):
        assert example[f"{side}_input_ids"] == prompt + ids(tokenizer, text) + [tokenizer.eos_token_id]
        assert example[f"{side}_labels"] == [IGNORE_INDEX] * len(prompt) + example[f"{side}_input_ids"][len(prompt):]


def test_conversational_preference(tokenizer, tmp_path):
    record = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no"}]}
    example = load_preference_dataset(write(tmp_path / "d.jsonl", [record]), tokenizer)[0]
    assert target_runs(tokenizer, example, "chosen_") == ["yes<|im_end|>\n"]
    assert target_runs(tokenizer, example, "rejected_") == ["no<|im_end|>\n"]


# ---------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_the_prompt_and_cuts_the_completion(tokenizer, tmp_path):
    records = [{"prompt": "Prompt", "completion": "a long completion"}, {"prompt": "P", "completion": "ok"}]
    dataset = load_sft_dataset(write(tmp_path / "d.jsonl", records), tokenizer, max_length=9)
    prompt = ids(tokenizer, "Prompt")
    assert dataset[0]["input_ids"] == prompt + ids(tokenizer, "a l")
    assert dataset[0]["labels"] == [IGNORE_INDEX] * len(prompt) + ids(tokenizer, "a l")
    assert dataset[1]["input_ids"] == ids(tokenizer, "Pok") + [tokenizer.eos_token_id]
    assert dataset.num_truncated == 1


def test_truncation_of_messages_and_text_cuts_from_the_right(tokenizer, tmp_path):
    full = load_sft_dataset(write(tmp_path / "m.jsonl", [{"messages": MESSAGES}]), tokenizer)[0]
    cut = load_sft_dataset(tmp_path / "m.jsonl", tokenizer, max_length=40)
    assert cut.num_truncated == 1
    assert cut[0] == {key: value[:40] if isinstance(value, list) else value for key, value in full.items()}
    text = load_sft_dataset(write(tmp_path / "t.jsonl", [{"text": "hello world"}]), tokenizer, max_length=5)
    assert text[0]["input_ids"] == text[0]["labels"] == ids(tokenizer, "hello") and text.num_truncated == 1


def test_preference_truncation_counts_an_example_once(tokenizer, tmp_path):
    records = [{"prompt": "Q", "chosen": "long answer", "rejected": "other answer"},
               {"prompt": "Q", "chosen": "a", "rejected": "b"}]
    dataset = load_preference_dataset(write(tmp_path / "d.jsonl", records), tokenizer, max_length=5)
    assert dataset.num_truncated == 1
    assert dataset[0]["chosen_input_ids"] == ids(tokenizer, "Qlong")
    assert dataset[0]["rejected_labels"] == [IGNORE_INDEX] + ids(tokenizer, "othe")


def test_truncation_to_identical_sides_warns(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "same start A", "rejected": "same start B"}])
    with pytest.warns(UserWarning, match="identical chosen and rejected"):
        load_preference_dataset(path, tokenizer, max_length=5)


# ---------------------------------------------------------------------------------------------- errors

PC = '{"prompt": "Q", "completion": "A"}'
PREF = '{"prompt": "Q", "chosen": "A", "rejected": "B"}'
MC = '{"prompt": "Q", "choices": ["A", "B"], "answer": 0}'
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
LONG = '{"prompt": "' + "p" * 40 + '", "completion": "A"}'

# (case, loader, JSONL lines, line of the error, field or None, fragment of the message)
BAD_RECORDS = [
    ("invalid json", "sft", [PC, '{"prompt": "Q", '], 2, None, "not valid JSON (Expecting property name"),
    ("not an object", "sft", [PC, "[1, 2]"], 2, None, "expected a JSON object, got [1, 2] (list)"),
    ("missing field", "sft", ['{"prompt": "Q"}'], 1, "completion", "missing"),
    ("missing prompt", "preference", [PREF, '{"chosen": "A", "rejected": "B"}'], 2, "prompt", "missing"),
    ("wrong type", "sft", [PC, '{"prompt": "Q", "completion": 0}'], 2, "completion",
     "expected a non-empty string, got 0 (int)"),
    ("wrong prompt type", "sft", ['{"prompt": 3, "completion": "A"}'], 1, "prompt", "got 3 (int)"),
    ("empty completion", "sft", ['{"prompt": "Q", "completion": ""}'], 1, "completion", "non-empty string, got ''"),
    ("empty chosen", "preference", ['{"prompt": "Q", "chosen": "", "rejected": "B"}'], 1, "chosen", "non-empty"),
    ("empty rejected", "preference", ['{"prompt": "Q", "chosen": "A", "rejected": ""}'], 1, "rejected", "non-empty"),
    ("empty text", "sft", ['{"text": ""}'], 1, "text", "non-empty string, got ''"),
    ("chosen equals rejected", "preference", [PREF, '{"prompt": "Q", "chosen": "A", "rejected": "A"}'], 2,
     "rejected", "equal to 'chosen'"),
    ("no assistant turn", "sft", ['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "messages",
     "no assistant turn"),
    ("message without role", "sft", [CHAT, '{"messages": [{"content": "hi"}]}'], 2, "messages[0].role", "missing"),
    ("message without content", "sft", ['{"messages": [{"role": "user"}]}'], 1, "messages[0].content", "missing"),
    ("unknown role", "sft", ['{"messages": [{"role": "bot", "content": "hi"}]}'], 1, "messages[0].role",
     "unknown role 'bot'"),
    ("message not an object", "sft", ['{"messages": ["hi"]}'], 1, "messages[0]", "got 'hi' (str)"),
    ("empty assistant content", "sft", ['{"messages": [{"role": "user", "content": "hi"}, '
                                        '{"role": "assistant", "content": ""}]}'], 1, "messages[1].content",
     "non-empty"),
    ("assistant first", "sft", ['{"messages": [{"role": "assistant", "content": "hi"}]}'], 1, "messages[0].role",
     "cannot start with an assistant turn"),
    ("completion turn not assistant", "sft",
     ['{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}]}'],
     1, "completion[0].role", "expected 'assistant'"),
    ("prompt fills max_length", "sft", [PC, LONG], 2, "prompt", "no room for any completion token"),
    ("chat prompt fills max_length", "sft",
     ['{"messages": [{"role": "user", "content": "' + "p" * 40 + '"}, {"role": "assistant", "content": "A"}]}'],
     1, "messages", "is 59 tokens, at least max_length (30)"),
    ("preference prompt fills max_length", "preference", ['{"prompt": "' + "p" * 40 + '", "chosen": "A", '
                                                          '"rejected": "B"}'], 1, "prompt", "no room"),
    ("mixed formats", "sft", [PC, "", '{"text": "hello"}'], 3, "text", "first record is in the prompt-completion"),
    ("mixed styles", "sft", [PC, '{"prompt": [{"role": "user", "content": "hi"}], "completion": []}'], 2, "prompt",
     "expected a string like the file's first record"),
    ("fields of two formats", "sft", ['{"text": "a", "messages": []}'], 1, None, "mix the messages and text"),
    ("foreign field", "sft", ['{"text": "a", "prompt": "b"}'], 1, "prompt", "does not belong in a text record"),
    ("no known fields", "sft", ['{"question": "a"}'], 1, None, "no known fields"),
    ("first record has only a prompt", "preference", ['{"prompt": "Q"}'], 1, "chosen", "missing"),
    ("wrong loader", "sft", [PREF], 1, "chosen", "cannot be read by load_sft_dataset"),
    ("group wrong type", "sft", ['{"text": "a", "group": [1]}'], 1, "group", "got [1] (list)"),
    ("group empty", "sft", ['{"text": "a", "group": " "}'], 1, "group", "non-empty string or an integer"),
    ("answer out of range", "mc", [MC, '{"prompt": "Q", "choices": ["A", "B"], "answer": 2}'], 2, "answer",
     "index 2 is out of range; expected 0 to 1"),
    ("answer not an int", "mc", ['{"prompt": "Q", "choices": ["A", "B"], "answer": true}'], 1, "answer",
     "got True (bool)"),
    ("one choice", "mc", ['{"prompt": "Q", "choices": ["A"], "answer": 0}'], 1, "choices", "at least 2"),
    ("empty choice", "mc", ['{"prompt": "Q", "choices": ["A", ""], "answer": 0}'], 1, "choices[1]", "non-empty"),
    ("duplicate choices", "mc", ['{"prompt": "Q", "choices": ["A", "A"], "answer": 0}'], 1, "choices[1]",
     "duplicates choices[0]"),
]


def load(loader: str, path: Path, tokenizer):
    if loader == "mc":
        return load_multiple_choice(path)
    function = load_sft_dataset if loader == "sft" else load_preference_dataset
    return function(path, tokenizer, max_length=30)


def check_message(message: str, path: Path, location: str | None, field: str | None, fragment: str) -> None:
    assert "\n" not in message
    assert message.startswith(f"{path}, {location}" if location else f"{path}: ")
    if field is not None:
        assert f", field '{field}': " in message
    assert fragment in message


@pytest.mark.parametrize(("loader", "lines", "line", "field", "fragment"),
                         [case[1:] for case in BAD_RECORDS], ids=[case[0] for case in BAD_RECORDS])
def test_bad_record_names_file_line_and_field(tokenizer, tmp_path, loader, lines, line, field, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        load(loader, path, tokenizer)
    check_message(str(error.value), path, f"line {line}", field, fragment)
    assert error.value.__cause__ is None  # no chained traceback from a library error
    assert error.value.__context__ is None or error.value.__suppress_context__


@pytest.mark.parametrize(("suffix", "unit"), [(".json", "item"), (".parquet", "row")])
def test_json_and_parquet_errors_name_the_item_or_row(tokenizer, tmp_path, suffix, unit):
    path = write(tmp_path / f"bad{suffix}", [{"prompt": "Q", "completion": "A"}, {"prompt": "Q", "completion": ""}])
    with pytest.raises(DataError) as error:
        load_sft_dataset(path, tokenizer)
    check_message(str(error.value), path, f"{unit} 2", "completion", "expected a non-empty string, got ''")


def test_json_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "a"}, 5]')
    with pytest.raises(DataError) as error:
        read_records(path)
    check_message(str(error.value), path, "item 2", None, "expected a JSON object, got 5 (int)")


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("bad.json", '[{"text": "a"},\n {"text": }]', "line 2: not valid JSON"),
    ("top.json", '{"text": "a"}', "expected a JSON list of objects"),
    ("empty.jsonl", "\n  \n", "no records"),
    ("empty.json", "[]", "no records"),
    ("data.csv", "text\na\n", "unknown file extension '.csv'"),
    ("bad.parquet", "not parquet", "not a readable Parquet file"),
])
def test_bad_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_records(path)
    assert str(error.value).startswith(f"{path}") and fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_empty_parquet_file(tmp_path):
    path = tmp_path / "empty.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": pyarrow.array([], pyarrow.string())}), path)
    with pytest.raises(DataError, match="no records"):
        read_records(path)


def test_missing_file(tokenizer, tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match=f"^{path}: file not found"):
        load_sft_dataset(path, tokenizer)
    assert issubclass(DataError, ValueError)


def test_blank_lines_are_skipped_and_lines_stay_physical(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(f"\n{PC}\n\n   \n{PC}\n")
    assert [number for number, _ in read_records(path)] == [2, 5]


def test_bad_settings_are_value_errors(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="max_length"):
        load_sft_dataset(path, tokenizer, max_length=1)
    with pytest.raises(ValueError, match="eos_token_id"):
        SFTCollator(None)


# ---------------------------------------------------------------------------------------------- collators


def test_sft_collator_pads_on_the_right(tokenizer):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "group": 1},
                {"input_ids": [8], "labels": [8], "group": -1}]
    batch = SFTCollator(pad_token_id=0)(examples)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert torch.equal(batch["group"], torch.tensor([1, -1]))
    assert all(value.dtype == torch.long for value in batch.values())
    assert SFTCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)["input_ids"].shape == (2, 8)


def test_preference_collator_stacks_chosen_then_rejected(tokenizer, tmp_path):
    records = [{"prompt": "Q", "chosen": "good", "rejected": "bad", "group": "x"},
               {"prompt": "Q2", "chosen": "a", "rejected": "a much longer one", "group": "y"}]
    dataset = load_preference_dataset(write(tmp_path / "d.jsonl", records), tokenizer)
    examples = [dict(example, ref_logps=[[0.0, 0.0]]) for example in dataset]  # other keys are ignored
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(examples)
    rows = [e["chosen_input_ids"] for e in dataset] + [e["rejected_input_ids"] for e in dataset]
    label_rows = [e["chosen_labels"] for e in dataset] + [e["rejected_labels"] for e in dataset]
    length = max(len(row) for row in rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (4, length)
    for i, (row, labels) in enumerate(zip(rows, label_rows, strict=True)):
        padding = length - len(row)
        assert batch["input_ids"][i].tolist() == row + [tokenizer.pad_token_id] * padding
        assert batch["labels"][i].tolist() == labels + [IGNORE_INDEX] * padding
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * padding
    assert batch["group"].tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- groups, misc


def test_groups_keep_names_in_order_of_first_appearance(tokenizer, tmp_path):
    records = [{"text": "a", "group": "beta"}, {"text": "b", "group": 7}, {"text": "c"}, {"text": "d", "group": "beta"},
               {"text": "e", "group": None}]
    dataset = load_sft_dataset(write(tmp_path / "d.jsonl", records), tokenizer)
    assert dataset.group_names == ["beta", "7"]
    assert [example["group"] for example in dataset] == [0, 1, -1, 0, -1]
    assert len(dataset) == 5 and dataset.source == str(tmp_path / "d.jsonl") and dataset.num_truncated == 0


def test_parquet_null_cells_are_absent_fields(tokenizer, tmp_path):
    path = write(tmp_path / "d.parquet", [{"text": "a", "group": "g"}, {"text": "b", "group": None}])
    assert [example["group"] for example in load_sft_dataset(path, tokenizer)] == [0, -1]


def test_multiple_choice_items(tmp_path):
    records = [{"prompt": "Q1", "choices": ["A", "B", "C"], "answer": 2, "group": "maths"},
               {"prompt": "Q2", "choices": ["yes", "no"], "answer": 0, "id": "ignored"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records[:1]) + "\n\n" + json.dumps(records[1]) + "\n")
    items = load_multiple_choice(path)
    assert items == [evaluate.MultipleChoiceItem("Q1", ["A", "B", "C"], 2, "maths", 1),
                     evaluate.MultipleChoiceItem("Q2", ["yes", "no"], 0, None, 3)]


def test_data_api_is_exported_from_the_package():
    assert renyi_lora.load_preference_dataset is preference_data.load_preference_dataset
    assert renyi_lora.PreferenceCollator is preference_data.PreferenceCollator
    assert renyi_lora.load_sft_dataset is data.load_sft_dataset
    with pytest.raises(AttributeError):
        renyi_lora.no_such_name  # noqa: B018


def test_chat_template_failure_is_a_data_error(tokenizer, tmp_path):
    tokenizer.chat_template = None
    path = write(tmp_path / "d.jsonl", [{"messages": MESSAGES}])
    with pytest.raises(DataError) as error:
        load_sft_dataset(path, tokenizer)
    check_message(str(error.value), path, "line 1", "messages", "the tokenizer's chat template failed")
