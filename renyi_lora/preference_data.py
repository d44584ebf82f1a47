"""Preference (DPO) and multiple-choice data: reading, validation, tokenisation and collation.

Formats (TRL's; files, errors, groups, tokenisation and truncation as in ``renyi_lora.data``, which also
re-exports this module's public names):

- Preference ``{"prompt", "chosen", "rejected"}``: three strings, or a prompt message list and chosen /
  rejected lists of assistant turns. Chosen and rejected must differ. Each of prompt + chosen and
  prompt + rejected is truncated on its own (prompt kept, response cut from the right); an example counts
  once in ``num_truncated`` if either side was cut.
- Multiple choice, for evaluation ``{"prompt": str, "choices": [str, ...], "answer": int}``: at least two
  distinct non-empty choices, ``answer`` an index into them. Not tokenised here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from renyi_lora.data import (
    Encoder,
    GroupIndex,
    TokenizedDataset,
    check_group,
    check_max_length,
    check_pad_token_id,
    check_prompt_style,
    check_response,
    check_string,
    describe,
    pad_rows,
    read_typed_records,
    truncate,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_preference_dataset(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int = 1024
) -> TokenizedDataset:
    """Read, validate and tokenise a preference file into ``chosen_*`` / ``rejected_*`` examples.

    Warns (once) if truncation leaves some examples with identical chosen and rejected ids, which give
    DPO no signal.
    """
    check_max_length(max_length)
    encoder, groups = Encoder(tokenizer), GroupIndex()
    examples, num_truncated, num_tied, style = [], 0, 0, None
    for where, _, record in read_typed_records(path, ("preference",), "load_preference_dataset"):
        group = groups.add(check_group(record, where))
        style = check_prompt_style(record, where, style)
        chosen = check_response(record, where, "chosen", style)
        rejected = check_response(record, where, "rejected", style)
        if chosen == rejected:
            raise where.error("rejected", f"equal to 'chosen', got {describe(rejected)} for both; expected a "
                              "response different from the chosen one")
        example, truncated = {"group": group}, False
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            prompt_ids, response_ids = encoder.prompt_completion(record["prompt"], response, where, side)
            input_ids, labels, cut = truncate(prompt_ids, response_ids, max_length, where, side)
            example[f"{side}_input_ids"], example[f"{side}_labels"] = input_ids, labels
            truncated |= cut
        num_truncated += truncated
        num_tied += example["chosen_input_ids"] == example["rejected_input_ids"]
        examples.append(example)
    if num_tied:
        warnings.warn(f"{path}: {num_tied} of {len(examples)} examples have identical chosen and rejected tokens "
                      f"after truncation to max_length={max_length}; they give no preference signal",
                      stacklevel=2)
    return TokenizedDataset(examples, groups.names, num_truncated, str(path))


@dataclass
class PreferenceCollator:
    """Pads preference examples on the right into one batch of chosen then rejected rows.

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``[2B, T]`` (rows ``0..B-1`` chosen, ``B..2B-1``
    rejected, one common T, labels -100 on padding) and ``group`` ``[B]``. Other keys are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        check_pad_token_id(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_rows = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        label_rows = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        batch = pad_rows(input_rows, label_rows, self.pad_token_id, self.pad_to_multiple_of)  # [2B, T]
        batch["group"] = torch.tensor([e["group"] for e in examples], dtype=torch.long)  # [B]
        return batch


@dataclass
class MultipleChoiceItem:
    """One validated multiple-choice question; ``line`` is its record number in the file (for reports)."""

    prompt: str
    choices: list[str]
    answer: int
    group: str | None
    line: int


def load_multiple_choice(path: str | Path) -> list[MultipleChoiceItem]:
    """Read and validate a multiple-choice file."""
    items = []
    for where, _, record in read_typed_records(path, ("multiple-choice",), "load_multiple_choice"):
        prompt = check_string(record["prompt"], where, "prompt")
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise where.error("choices", f"expected a list of at least 2 strings, got {describe(choices)}")
        first_index: dict[str, int] = {}
        for i, choice in enumerate(choices):
            check_string(choice, where, f"choices[{i}]")
            if choice in first_index:
                raise where.error(f"choices[{i}]", f"duplicates choices[{first_index[choice]}] ({describe(choice)}); "
                                  "expected distinct choices")
            first_index[choice] = i
        answer = record["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise where.error("answer", f"expected an integer index into 'choices', got {describe(answer)}")
        if not 0 <= answer < len(choices):
            raise where.error("answer", f"index {answer} is out of range; expected 0 to {len(choices) - 1} "
                              f"(an index into the {len(choices)} choices)")
        items.append(MultipleChoiceItem(prompt, list(choices), answer, check_group(record, where), where.number))
    return items
