"""Inference plumbing shared by evaluation, scoring, uncertainty, generation and the commands: loading a model with its
adapters, prompt encoding, row padding and the KV-cached forward of all K members.

Tokenisation follows ``renyi_lora.data.sft``: a plain prompt gets the tokenizer's BOS (if it adds one) and no special
tokens otherwise; a prompt given as a list of messages is rendered with the chat template and its generation prompt;
a completion's ids are those of ``prompt + completion`` after the prompt's (tokenised separately if the tokenizer
merges across the boundary). Nothing (no EOS) is appended to a completion.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from renyi_lora.config import EnsembleConfig
from renyi_lora.data.sft import Encoder, pad_rows
from renyi_lora.ensemble import LoraEnsemble, load_adapter_mixture
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.models import check_model_exists, load_model_and_tokenizer, resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Prompt = str | list[dict]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> tuple[list[int], str]:
    """``(ids, text)`` of a prompt: plain text with the tokenizer's BOS, or messages through the chat template."""
    encoder = Encoder(tokenizer)
    if isinstance(prompt, str):
        return encoder.bos + encoder.ids(prompt), prompt
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return encoder.ids(text), text


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``; the completion's ids are the targets (no EOS appended)."""
    prompt_ids, text = encode_prompt(tokenizer, prompt)
    _, completion_ids = Encoder(tokenizer).split(text, completion)
    return prompt_ids, completion_ids


def pad_right(prompt_rows: list[list[int]], completion_rows: list[list[int]], pad_token_id: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` ``[B, T]``: prompt then completion, right-padded; only the
    completion tokens are targets."""
    pairs = list(zip(prompt_rows, completion_rows, strict=True))
    batch = pad_rows([p + c for p, c in pairs], [[IGNORE_INDEX] * len(p) + c for p, c in pairs], pad_token_id)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)


class IncrementalForward:
    """Next-token logits of all K members, with one KV cache across calls.

    ``per_member_rows=False``: every member sees the same tokens; ``input_ids`` is ``[B, t]`` and the rows are
    repeated K times inside (or only from the first adapted layer, when the ensemble shares a trunk).
    ``per_member_rows=True``: ``input_ids`` is ``[K*B, t]`` member-major, one stream per (member, prompt).
    """

    def __init__(self, ensemble: LoraEnsemble, per_member_rows: bool = False) -> None:
        self.ensemble, self.per_member_rows, self.cache = ensemble, per_member_rows, None
        parameters = inspect.signature(ensemble.model.forward).parameters
        # transformers 5 renamed past_key_values to cache; older versions only know the former.
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.keep_last = "logits_to_keep" in parameters

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """``input_ids [R, t]`` (the new tokens), ``attention_mask [R, S]`` (everything so far, left-padded)
        -> logits at the last position ``[K, B, V]`` (every new position ``[K, B, t, V]`` if not ``last_only``)."""
        K, t = self.ensemble.output_members, input_ids.shape[1]
        # Positions count real tokens only, so a left-padded row matches the same prompt unpadded.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        kwargs = {self.cache_name: self.cache, "use_cache": True}
        if self.keep_last and last_only:
            kwargs["logits_to_keep"] = 1
        if self.per_member_rows:
            out = self.ensemble.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      **kwargs)
        else:
            with self.ensemble.shared_trunk(input_ids.shape[0]) as shared:
                if K > 1 and not shared:
                    input_ids, attention_mask, position_ids = (x.repeat(K, 1) for x in (input_ids, attention_mask,
                                                                                       position_ids))
                out = self.ensemble.model(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, **kwargs)
        self.cache = getattr(out, self.cache_name)
        if not last_only:
            return out.logits.view(K, -1, *out.logits.shape[1:])  # [K, B, t, V]
        logits = out.logits[:, -1]  # [K*B, V]
        return logits.view(K, -1, logits.shape[-1])  # [K, B, V]


def left_pad(rows: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, S]`` with each row padded on the left, so that the last position of
    every row is its last real token."""
    batch = pad_rows(rows, rows, pad_token_id, left=True)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def load_for_inference(model_name: str, adapters: list[str] | None, members: list[int] | None = None,
                       trust_remote_code: bool = False, *, device: str = "auto", dtype: torch.dtype = torch.float32
                       ) -> tuple[LoraEnsemble, PreTrainedTokenizerBase]:
    """``(ensemble, tokenizer)``: the base model in ``dtype`` on ``device`` (``auto``: cuda if available) with the
    adapters of ``adapters`` as one mixture (``ensemble.load_adapter_mixture``), or a fresh member when there are none
    (for the base model alone, under ``adapters_disabled``). ``ensemble.mixture_weights`` are one saved ensemble's
    own (renormalised over ``members``), uniform over the members of several folders."""
    check_model_exists(model_name)
    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code, torch_dtype=dtype)
    model.to(resolve_device(device)).eval()
    if adapters:
        return load_adapter_mixture(model, adapters, members), tokenizer
    return LoraEnsemble(model, EnsembleConfig(num_members=1)), tokenizer
