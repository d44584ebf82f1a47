"""Preference (DPO) data: reading, validation, tokenisation and collation.

Format (TRL's; files, errors and groups as in ``renyi_lora.data.records``, tokenisation and truncation as in
``renyi_lora.data.sft``):

- Preference ``{"prompt", "chosen", "rejected"}``: three strings, or a prompt message list and chosen /
  rejected lists of assistant turns. Chosen and rejected must differ. Each of prompt + chosen and
  prompt + rejected is truncated on its own (prompt kept, response cut from the right); an example counts
  once in ``num_truncated`` if either side was cut.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from renyi_lora.data.records import GroupIndex, check_group, check_prompt_style, check_response, describe
from renyi_lora.data.sft import Encoder, TokenizedDataset, check_max_length, check_pad_token_id, pad_rows, truncate
from renyi_lora.data.sources import read_typed_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_preference_dataset(source: Any, tokenizer: PreTrainedTokenizerBase, max_length: int = 1024,
                            split: str | None = None, *, config: str | None = None) -> TokenizedDataset:
    """Read, validate and tokenise preference data (any source of ``renyi_lora.data.sources``) into ``chosen_*`` /
    ``rejected_*`` examples.

    Warns (once) if truncation leaves some examples with identical chosen and rejected ids, which give
    DPO no signal.
    """
    check_max_length(max_length)
    encoder, groups = Encoder(tokenizer), GroupIndex()
    examples, num_truncated, num_tied, style = [], 0, 0, None
    for where, _, record in read_typed_records(source, ("preference",), "load_preference_dataset", split,
                                               config=config):
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
            input_ids, labels, cut = truncate(prompt_ids, response_ids, max_length, where, field_name=side)
            example[f"{side}_input_ids"], example[f"{side}_labels"] = input_ids, labels
            truncated |= cut
        num_truncated += truncated
        num_tied += example["chosen_input_ids"] == example["rejected_input_ids"]
        examples.append(example)
    if num_tied:
        warnings.warn(f"{where.source}: {num_tied} of {len(examples)} examples have identical chosen and rejected "
                      f"tokens after truncation to max_length={max_length}; they give no preference signal",
                      stacklevel=2)
    return TokenizedDataset(examples, groups.names, num_truncated, where.source if examples else str(source))


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
