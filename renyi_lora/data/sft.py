"""Training data: records (``renyi_lora.data.records``) tokenised and collated.

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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from renyi_lora.data.records import (
    SFT_FORMATS,
    GroupIndex,
    Location,
    check_group,
    check_messages,
    check_prompt_style,
    check_response,
    check_string,
    one_line,
)
from renyi_lora.data.sources import read_typed_records
from renyi_lora.likelihoods import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
            raise where.error(field_name, f"the tokenizer's chat template failed ({one_line(error)}); expected a "
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
    prompt_ids: list[int], completion_ids: list[int], max_length: int, where: Location, *, field_name: str
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


def load_sft_dataset(source: Any, tokenizer: PreTrainedTokenizerBase, max_length: int = 1024,
                     split: str | None = None, *, config: str | None = None) -> TokenizedDataset:
    """Read, validate and tokenise SFT data (prompt-completion, messages or text records) from a file, a ``datasets``
    object or folder, a hub dataset id (``split``, ``config``) or a list of dicts (``renyi_lora.data.sources``)."""
    check_max_length(max_length)
    encoder, groups = Encoder(tokenizer), GroupIndex()
    examples, num_truncated, style = [], 0, None
    for where, name, record in read_typed_records(source, SFT_FORMATS, "load_sft_dataset", split, config=config):
        group = groups.add(check_group(record, where))
        if name == "prompt-completion":
            style = check_prompt_style(record, where, style)
            completion = check_response(record, where, "completion", style)
            prompt_ids, completion_ids = encoder.prompt_completion(record["prompt"], completion, where, "completion")
            input_ids, labels, truncated = truncate(prompt_ids, completion_ids, max_length, where,
                                                    field_name="completion")
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
    return TokenizedDataset(examples, groups.names, num_truncated, where.source if examples else str(source))


def pad_rows(input_rows: list[list[int]], label_rows: list[list[int]], pad_token_id: int,
             pad_to_multiple_of: int | None = None, *, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad rows to one length T: ``input_ids``, ``attention_mask`` and ``labels`` (-100 padded), ``[N, T]``; on the
    right (training, scoring), or on the ``left`` (decoding: every row's last position is its last real token)."""
    length = max(len(row) for row in input_rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(input_rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(input_rows), length), dtype=torch.long)
    labels = torch.full((len(input_rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, row_labels) in enumerate(zip(input_rows, label_rows, strict=True)):
        where = slice(length - len(ids), length) if left else slice(0, len(ids))
        input_ids[i, where] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, where] = 1
        labels[i, where] = torch.tensor(row_labels, dtype=torch.long)
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
