"""Training data: TRL's formats read from JSONL / JSON / Parquet, validated, tokenised and collated.

Formats (the first record decides a file's format; a later record of another format is an error):

- SFT ``{"prompt", "completion"}``: both strings, or both lists of messages (``[{"role", "content"}]``,
  the completion of assistant turns only: conversational, rendered with the chat template).
- SFT ``{"messages": [...]}``: a conversation; only assistant turns are targets.
- SFT ``{"text"}``: every token is a target.
- Preference ``{"prompt", "chosen", "rejected"}`` and multiple choice ``{"prompt", "choices", "answer"}``:
  see ``renyi_lora.preference_data`` (re-exported here).

Any record may carry ``"group"`` (a non-empty string, or an int turned into its string; null = none),
which is kept for routing reports. Fields that belong to another format are an error; fields no format
knows (``"id"``, ``"source"``, ...) are ignored. In Parquet a null cell is an absent field (a table has a
cell for every column).

Errors: loading the whole file is the validation step. The first problem raises ``DataError`` with one
line naming the file, the record (JSONL: ``line N``, the physical line, blank lines skipped; JSON:
``item N``, counted from 1; Parquet: ``row N``, from 1), the field, what was wrong and what was expected.

Tokenisation (TRL's conventions, one rule for every tokenizer):

- Plain strings are tokenised with ``add_special_tokens=False``; a tokenizer that adds a BOS by default
  gets exactly one BOS prepended to the sequence, and ``eos_token_id`` is appended to the completion (or
  text) unless it is already last. A completion's ids are ``ids(prompt + completion)`` after the prompt's
  ids; if the tokenizer merges across the boundary, the two parts are tokenised separately.
- Chat-template text (conversational formats) is tokenised with ``add_special_tokens=False`` and nothing
  is added: the template owns BOS and the end-of-turn marker, as in TRL. The target of an assistant turn is
  everything the template renders for that turn after the generation prompt: its content, the end-of-turn
  marker and any trailing text of the turn (ChatML: ``"content<|im_end|>\\n"``). A ``messages`` list must
  not start with an assistant turn (there is no prefix to render before it).

Truncation: an example longer than ``max_length`` tokens keeps its prompt and loses completion tokens from
the right (``messages`` and ``text``: cut from the right) down to ``max_length``; such examples are counted
in ``num_truncated``. If the prompt alone is ``max_length`` tokens or more (``messages``: the text before
the first assistant token), nothing trainable is left and ``DataError`` names the record.

Padding: the collators pad on the right with the ``pad_token_id`` they are given. Choosing it is the
caller's job: a tokenizer without a pad token should pass ``tokenizer.eos_token_id`` (safe, because the
attention mask and the -100 labels hide padding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of a position that is not a target (same value as renyi_lora.likelihoods)
RECORD_UNITS = {".jsonl": "line", ".json": "item", ".parquet": "row"}
ROLES = ("system", "user", "assistant", "tool")
# Format name -> its fields, all required; "group" is optional everywhere.
FORMAT_FIELDS = {
    "prompt-completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "multiple-choice": ("prompt", "choices", "answer"),
}
# The fields that tell the formats apart ("prompt" is shared).
TELLING_FIELDS = {"prompt-completion": {"completion"}, "messages": {"messages"}, "text": {"text"},
                  "preference": {"chosen", "rejected"}, "multiple-choice": {"choices", "answer"}}
KNOWN_FIELDS = {name for fields in FORMAT_FIELDS.values() for name in fields}
SFT_FORMATS = ("prompt-completion", "messages", "text")


class DataError(ValueError):
    """Bad input data. The message is one line: file, record, field, what was wrong and what was expected."""


@dataclass(frozen=True)
class Location:
    """Where a record came from, for error messages: the file and ``line N`` / ``item N`` / ``row N``."""

    source: str
    unit: str
    number: int

    def error(self, field_name: str | None, message: str) -> DataError:
        """A ``DataError`` for this record (and field, if given) with ``message`` after a colon."""
        where = f"{self.source}, {self.unit} {self.number}"
        return DataError(f"{where}, field '{field_name}': {message}" if field_name else f"{where}: {message}")


def describe(value: Any) -> str:
    """A short rendering of a bad value for an error message, e.g. ``0 (int)`` or ``'' (str)``."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _record_unit(path: Path) -> str:
    unit = RECORD_UNITS.get(path.suffix.lower())
    if unit is None:
        raise DataError(f"{path}: unknown file extension {path.suffix!r}; expected .jsonl, .json or .parquet")
    return unit


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Read every record of a ``.jsonl``, ``.json`` or ``.parquet`` file as ``(number, record)`` pairs.

    ``number`` is the 1-based physical line (JSONL), item (JSON) or row (Parquet). Blank JSONL lines are
    skipped; anything else that is not an object raises ``DataError``, as does an empty file.
    """
    path = Path(path)
    unit = _record_unit(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; expected a .jsonl, .json or .parquet data file")
    if not path.is_file():
        raise DataError(f"{path}: not a file; expected a .jsonl, .json or .parquet data file")
    if unit == "line":
        records = _read_jsonl(path)
    elif unit == "item":
        records = _read_json(path)
    else:
        records = _read_parquet(path)
    for number, record in records:
        if not isinstance(record, dict):
            raise Location(str(path), unit, number).error(None, f"expected a JSON object, got {describe(record)}")
    if not records:
        raise DataError(f"{path}: no records (the file is empty or blank); expected at least one record")
    return records


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    records = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                            "expected one JSON object per line") from None
    return records


def _read_json(path: Path) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}); "
                        "expected a list of objects") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects at the top level, got {describe(data)}")
    return list(enumerate(data, start=1))


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(error)})") from None
    # A table has a cell for every column: a null cell is an absent field.
    return [(number, {k: v for k, v in row.items() if v is not None}) for number, row in enumerate(rows, start=1)]


def detect_format(record: dict, where: Location, expected: str | None = None, default: str | None = None) -> str:
    """The format of ``record`` (a key of ``FORMAT_FIELDS``), checked against the file's ``expected`` one.

    A record with no field that tells formats apart (e.g. only ``prompt``) takes ``expected``, else
    ``default``. Raises ``DataError`` for a record of another format than ``expected``, fields of two
    formats, fields that belong to another format, or a missing field.
    """
    keys = set(record)
    matches = [name for name, names in TELLING_FIELDS.items() if keys & names]
    if len(matches) > 1:
        raise where.error(None, f"fields {sorted(keys & KNOWN_FIELDS)} mix the {matches[0]} and {matches[1]} "
                          "formats; expected the fields of exactly one format")
    expected_or_default = expected or default
    if not matches and expected_or_default is None:
        raise where.error(None, f"no known fields (got {sorted(keys)}); expected one of {{prompt, completion}}, "
                          "{messages}, {text}, {prompt, chosen, rejected}, {prompt, choices, answer}, each with "
                          "an optional group")
    name = matches[0] if matches else expected_or_default
    if expected is not None and name != expected:
        field_name = sorted(keys & TELLING_FIELDS[name])[0]
        raise where.error(field_name, f"this record is in the {name} format but the file's first record is in the "
                          f"{expected} format; expected every record of a file in one format")
    foreign = sorted(keys & KNOWN_FIELDS - set(FORMAT_FIELDS[name]))
    if foreign:
        raise where.error(foreign[0], f"does not belong in a {name} record; expected only the fields "
                          f"{list(FORMAT_FIELDS[name])} (and an optional 'group')")
    for field_name in FORMAT_FIELDS[name]:
        if field_name not in record:
            raise where.error(field_name, f"missing; a {name} record needs the fields {list(FORMAT_FIELDS[name])}")
    return name


def check_string(value: Any, where: Location, field_name: str, non_empty: bool = True) -> str:
    """``value`` if it is a string (non-empty unless ``non_empty`` is False), else ``DataError``."""
    if not isinstance(value, str) or (non_empty and not value):
        expected = "a non-empty string" if non_empty else "a string"
        raise where.error(field_name, f"expected {expected}, got {describe(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate such as "\ud800" is valid JSON but not text
        raise where.error(field_name, f"not valid unicode text ({error.reason} at character {error.start})") from None
    return value


def check_messages(value: Any, where: Location, field_name: str, assistant_only: bool = False) -> list[dict]:
    """``value`` if it is a non-empty list of ``{"role", "content"}`` messages, else ``DataError``.

    Assistant contents must be non-empty strings; ``assistant_only`` requires every turn to be an assistant's.
    """
    expected = "a non-empty list of assistant messages" if assistant_only else "a non-empty list of messages"
    if not isinstance(value, list) or not value:
        raise where.error(field_name, f"expected {expected}, got {describe(value)}")
    for i, message in enumerate(value):
        name = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise where.error(name, f"expected a message {{'role': ..., 'content': ...}}, got {describe(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise where.error(f"{name}.{key}", "missing; expected a message with 'role' and 'content'")
        role = message["role"]
        if assistant_only and role != "assistant":
            raise where.error(f"{name}.role", f"expected 'assistant' (this field holds assistant turns only), got "
                              f"{describe(role)}")
        if role not in ROLES:
            raise where.error(f"{name}.role", f"unknown role {describe(role)}; expected one of {list(ROLES)}")
        check_string(message["content"], where, f"{name}.content", non_empty=role == "assistant")
    return value


def check_group(record: dict, where: Location) -> str | None:
    """The record's group name (an int becomes its string), None if absent or null."""
    group = record.get("group")
    if group is None:
        return None
    if isinstance(group, int) and not isinstance(group, bool):
        return str(group)
    if not isinstance(group, str) or not group.strip():
        raise where.error("group", f"expected a non-empty string or an integer, got {describe(group)}")
    return group


def check_prompt_style(record: dict, where: Location, expected: str | None) -> str:
    """``"conversational"`` if the prompt is a message list, ``"standard"`` if a string; must match ``expected``."""
    prompt = record["prompt"]
    style = "conversational" if isinstance(prompt, list) else "standard" if isinstance(prompt, str) else None
    if style is None:
        raise where.error("prompt", f"expected a string or a list of messages, got {describe(prompt)}")
    if expected is not None and style != expected:
        want = "a list of messages" if expected == "conversational" else "a string"
        raise where.error("prompt", f"expected {want} like the file's first record (one style, plain text or "
                          f"conversational, per file), got {describe(prompt)}")
    if style == "conversational":
        check_messages(prompt, where, "prompt")
    else:
        check_string(prompt, where, "prompt", non_empty=False)
    return style


def check_response(record: dict, where: Location, field_name: str, style: str) -> str | list[dict]:
    """A completion / chosen / rejected: a non-empty string, or (conversational) a list of assistant turns."""
    if style == "standard":
        return check_string(record[field_name], where, field_name)
    return check_messages(record[field_name], where, field_name, assistant_only=True)


class GroupIndex:
    """Group name -> id, ids given in order of first appearance; ``None`` maps to -1."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._ids: dict[str, int] = {}

    def add(self, name: str | None) -> int:
        """The id of ``name`` (a new one if unseen), -1 for None."""
        if name is None:
            return -1
        if name not in self._ids:
            self._ids[name] = len(self.names)
            self.names.append(name)
        return self._ids[name]


class Encoder:
    """Tokenises every format by one rule (module docstring): no special tokens but one BOS, if the tokenizer
    adds one, for plain text; nothing added to chat-template text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        with_special = list(tokenizer("a")["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and len(with_special) > len(plain) and with_special[0] == bos else []
        self.eos = tokenizer.eos_token_id

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[dict], where: Location, field_name: str, generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages`` as text; a template failure is a ``DataError``."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as error:  # templates raise anything (jinja errors, ValueError for no template)
            raise where.error(field_name, f"the tokenizer's chat template failed ({_one_line(error)}); expected a "
                              "conversation the template accepts") from None
        return text

    def split(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """``(prompt_ids, completion_ids)``: the completion's ids are those of ``prompt + completion`` after the
        prompt's, or its own ids if the tokenizer merged across the boundary."""
        prompt_ids, full_ids = self.ids(prompt), self.ids(prompt + completion)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, full_ids[len(prompt_ids):]
        return prompt_ids, self.ids(completion)

    def prompt_completion(
        self, prompt: str | list[dict], completion: str | list[dict], where: Location, field_name: str
    ) -> tuple[list[int], list[int]]:
        """``(prompt_ids, completion_ids)`` of a plain or conversational pair (``field_name`` names the completion)."""
        if isinstance(prompt, str):
            if self.eos is None:
                raise ValueError("the tokenizer has no eos token; plain-text completions need one to mark their end")
            prompt_ids, completion_ids = self.split(prompt, completion)
            if not completion_ids or completion_ids[-1] != self.eos:
                completion_ids.append(self.eos)
            return self.bos + prompt_ids, completion_ids
        prompt_text = self.render(prompt, where, "prompt", generation_prompt=True)
        full_text = self.render(prompt + completion, where, field_name)
        if not full_text.startswith(prompt_text):
            raise where.error(field_name, "the chat template renders the prompt differently when this follows it; "
                              "expected a template whose generation prompt is a prefix of the whole conversation")
        return self.split(prompt_text, full_text[len(prompt_text):])

    def text(self, text: str) -> list[int]:
        """Ids of a plain text: one BOS if the tokenizer adds one, eos last."""
        if self.eos is None:
            raise ValueError("the tokenizer has no eos token; text examples need one to mark their end")
        ids = self.bos + self.ids(text)
        return ids if ids and ids[-1] == self.eos else [*ids, self.eos]

    def conversation(self, messages: list[dict], where: Location) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a rendered conversation; labels are -100 outside assistant turns."""
        full_text = self.render(messages, where, "messages")
        spans = []  # [start, end) characters of each assistant turn's target
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise where.error("messages[0].role", "a conversation cannot start with an assistant turn; expected "
                                  "a system or user turn before it")
            before = self.render(messages[:i], where, "messages", generation_prompt=True)
            through = self.render(messages[: i + 1], where, "messages")
            if not (full_text.startswith(before) and full_text.startswith(through) and len(before) < len(through)):
                raise where.error(f"messages[{i}]", "the chat template does not render this conversation as the "
                                  "concatenation of its turns; expected a template whose prefixes are stable")
            spans.append((len(before), len(through)))
        if not spans:
            raise where.error("messages", "no assistant turn; expected at least one message with role 'assistant'")
        if self.tokenizer.is_fast:
            encoding = self.tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(encoding["input_ids"])
            targets = [any(s <= start < e for s, e in spans) for start, _ in encoding["offset_mapping"]]
        else:  # no offsets: tokenise the text between span boundaries piece by piece
            ids, targets, cursor = [], [], 0
            for s, e in spans:
                for piece, target in ((full_text[cursor:s], False), (full_text[s:e], True)):
                    piece_ids = self.ids(piece)
                    ids += piece_ids
                    targets += [target] * len(piece_ids)
                cursor = e
            tail = self.ids(full_text[cursor:])
            ids, targets = ids + tail, targets + [False] * len(tail)
        return ids, [token if target else IGNORE_INDEX for token, target in zip(ids, targets, strict=True)]


def truncate(
    prompt_ids: list[int], completion_ids: list[int], max_length: int, where: Location, field_name: str
) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, truncated)``: the prompt kept whole, the completion cut from the right to fit."""
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise where.error("prompt", f"the prompt alone is {len(prompt_ids)} tokens, at least max_length "
                          f"({max_length}), leaving no room for any {field_name} token; expected a shorter prompt "
                          "or a larger max_length")
    kept = completion_ids[:room]
    return prompt_ids + kept, [IGNORE_INDEX] * len(prompt_ids) + kept, len(kept) < len(completion_ids)


def check_max_length(max_length: int) -> None:
    """``max_length`` must leave room for a prompt token and a target token."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (tokens per example); got {max_length!r}")


def read_typed_records(path: str | Path, kinds: tuple[str, ...], loader: str) -> list[tuple[Location, str, dict]]:
    """Read ``path`` and check every record's format: ``(location, format, record)`` triples.

    The first record decides the file's format, which must be one of ``kinds`` (``loader`` names the
    function for the error message).
    """
    path = Path(path)
    unit = _record_unit(path)
    typed, file_format = [], None
    for number, record in read_records(path):
        where = Location(str(path), unit, number)
        # Without a telling field, the loader's first format is assumed (its missing field is named).
        default = kinds[0] if "prompt" in record or len(kinds) == 1 else None
        name = detect_format(record, where, file_format, default)
        if file_format is None and name not in kinds:
            fields = " or ".join("{" + ", ".join(FORMAT_FIELDS[kind]) + "}" for kind in kinds)
            telling = sorted(set(record) & KNOWN_FIELDS - {"prompt"})
            raise where.error(telling[0], f"records in the {name} format {list(FORMAT_FIELDS[name])} cannot be read by "
                              f"{loader}; expected {fields}")
        file_format = name
        typed.append((where, name, record))
    return typed


@dataclass
class TokenizedDataset(Dataset):
    """Tokenised examples ready for a collator.

    SFT examples are ``{"input_ids", "labels", "group"}``; preference examples are ``{"chosen_input_ids",
    "chosen_labels", "rejected_input_ids", "rejected_labels", "group"}``. Labels are aligned with the input
    ids (not shifted), -100 where not a target; ``group`` is an index into ``group_names`` or -1.
    """

    examples: list[dict]
    group_names: list[str] = field(default_factory=list)
    num_truncated: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def load_sft_dataset(path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 1024) -> TokenizedDataset:
    """Read, validate and tokenise an SFT file (prompt-completion, messages or text records)."""
    check_max_length(max_length)
    encoder, groups = Encoder(tokenizer), GroupIndex()
    examples, num_truncated, style = [], 0, None
    for where, name, record in read_typed_records(path, SFT_FORMATS, "load_sft_dataset"):
        group = groups.add(check_group(record, where))
        if name == "prompt-completion":
            style = check_prompt_style(record, where, style)
            completion = check_response(record, where, "completion", style)
            prompt_ids, completion_ids = encoder.prompt_completion(record["prompt"], completion, where, "completion")
            input_ids, labels, truncated = truncate(prompt_ids, completion_ids, max_length, where, "completion")
        else:
            if name == "messages":
                input_ids, labels = encoder.conversation(check_messages(record["messages"], where, "messages"), where)
            else:
                input_ids = encoder.text(check_string(record["text"], where, "text"))
                labels = list(input_ids)
            first_target = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            if first_target >= max_length:
                raise where.error(name, f"the text before the first assistant turn is {first_target} tokens, at "
                                  f"least max_length ({max_length}), leaving nothing to train on; expected a "
                                  "shorter prompt or a larger max_length")
            truncated = len(input_ids) > max_length
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        num_truncated += truncated
        examples.append({"input_ids": input_ids, "labels": labels, "group": group})
    return TokenizedDataset(examples, groups.names, num_truncated, str(path))


def pad_rows(
    input_rows: list[list[int]], label_rows: list[list[int]], pad_token_id: int, pad_to_multiple_of: int | None
) -> dict[str, torch.Tensor]:
    """Right-pad rows to one length T: ``input_ids``, ``attention_mask`` and ``labels`` (-100 padded), ``[N, T]``."""
    length = max(len(row) for row in input_rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(input_rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(input_rows), length), dtype=torch.long)
    labels = torch.full((len(input_rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, row_labels) in enumerate(zip(input_rows, label_rows, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_pad_token_id(pad_token_id: Any, pad_to_multiple_of: Any) -> None:
    """A collator's padding settings must be an int id and a positive int or None."""
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}; a tokenizer without a pad token "
                         "should pass tokenizer.eos_token_id")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")


@dataclass
class SFTCollator:
    """Pads SFT examples on the right into ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` and
    ``group`` ``[B]``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        check_pad_token_id(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_rows([e["input_ids"] for e in examples], [e["labels"] for e in examples],
                         self.pad_token_id, self.pad_to_multiple_of)
        batch["group"] = torch.tensor([e["group"] for e in examples], dtype=torch.long)  # [B]
        return batch


_PREFERENCE_NAMES = ("load_preference_dataset", "PreferenceCollator", "MultipleChoiceItem", "load_multiple_choice")


def __getattr__(name: str) -> Any:
    """Re-export the preference and multiple-choice API lazily (``preference_data`` imports this module)."""
    if name in _PREFERENCE_NAMES:
        from renyi_lora import preference_data

        return getattr(preference_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
