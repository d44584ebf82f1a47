"""Data records: TRL's formats read from JSONL / JSON / Parquet and validated, before any tokeniser runs.

Formats (the first record decides a file's format; a later record of another format is an error):

- SFT ``{"prompt", "completion"}``: both strings, or both lists of messages (``[{"role", "content"}]``,
  the completion of assistant turns only: conversational, rendered with the chat template).
- SFT ``{"messages": [...]}``: a conversation; only assistant turns are targets.
- SFT ``{"text"}``: every token is a target.
- Preference ``{"prompt", "chosen", "rejected"}`` and multiple choice ``{"prompt", "choices", "answer"}``:
  see ``renyi_lora.data.preference`` and ``renyi_lora.evaluation.multiple_choice``.

Any record may carry ``"group"`` (a non-empty string, or an int turned into its string; null = none),
which is kept for routing reports. Fields that belong to another format are an error; fields no format
knows (``"id"``, ``"source"``, ...) are ignored. In Parquet a null cell is an absent field (a table has a
cell for every column).

Errors: loading the whole file is the validation step. The first problem raises ``DataError`` with one
line naming the file, the record (JSONL: ``line N``, the physical line, blank lines skipped; JSON:
``item N``, counted from 1; Parquet: ``row N``, from 1), the field, what was wrong and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_data_file(path: str | Path) -> str:
    """The record unit of a data file (``line``, ``item`` or ``row``), after checking its extension and that it is a
    file; ``DataError`` otherwise."""
    path = Path(path)
    unit = RECORD_UNITS.get(path.suffix.lower())
    if unit is None:
        raise DataError(f"{path}: unknown file extension {path.suffix!r}; expected .jsonl, .json or .parquet")
    if not path.exists():
        raise DataError(f"{path}: file not found; expected a .jsonl, .json or .parquet data file")
    if not path.is_file():
        raise DataError(f"{path}: not a file; expected a .jsonl, .json or .parquet data file")
    return unit


def without_nulls(rows: list[dict]) -> list[tuple[int, dict]]:
    """``(number, row)`` pairs numbered from 1, a null cell of a table being an absent field (a table has a cell for
    every column)."""
    return [(number, {k: v for k, v in row.items() if v is not None}) for number, row in enumerate(rows, start=1)]


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Read every record of a ``.jsonl``, ``.json`` or ``.parquet`` file as ``(number, record)`` pairs.

    ``number`` is the 1-based physical line (JSONL), item (JSON) or row (Parquet). Blank JSONL lines are
    skipped; anything else that is not an object raises ``DataError``, as does an empty file.
    """
    path = Path(path)
    unit = check_data_file(path)
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
        raise DataError(f"{path}: not a readable Parquet file ({one_line(error)})") from None
    return without_nulls(rows)


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
