"""Frozen-trunk caching for benchmarks that adapt only the top layers of a model.

With LoRA on the top ``L`` layers, every layer below is frozen and deterministic: the hidden state entering the first
adapted layer depends only on the tokens. ``TrunkStates`` computes it once per distinct sequence and a truncated copy
of the model (its top layers, its norm and head) reads it instead of running the trunk again, so that every training
step, every row of a benchmark and every evaluation pays only for the top layers. Exact up to float rounding (a test
compares the truncated model's logits with the full model's).

Rows are looked up by their tokens, padded on the right as our collators pad: the longest cached row among the row
with its trailing padding removed one token at a time. The last real token of a row never needs a state (it predicts
nothing inside the row), so a row whose tokens without the last one are cached is served too, with zeros in its last
position: a prompt cached once serves every ``prompt + one-token choice`` row.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


class TrunkStates(nn.Module):
    """Stands in for a truncated model's input embeddings: ``input_ids [R, T]`` -> the states entering layer
    ``first_layer`` of ``model``, ``[R, T, H]``; a row that was not cached is computed (and cached) on the spot."""

    def __init__(self, model: nn.Module, first_layer: int, pad_token_id: int) -> None:
        super().__init__()
        self._model = [model]  # a list: not a submodule (its weights are not this module's)
        self.first_layer, self.pad_token_id = first_layer, pad_token_id
        self.states: dict[tuple[int, ...], torch.Tensor] = {}

    def _lookup(self, row: Sequence[int]) -> torch.Tensor | None:
        key = tuple(row)
        while key and key not in self.states and key[-1] == self.pad_token_id:
            key = key[:-1]  # trailing padding (an EOS that doubles as the pad token is tried first)
        for candidate in (key, key[:-1]):
            if candidate in self.states:
                return self.states[candidate]
        return None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = input_ids.tolist()
        missing = [row for row in rows if self._lookup(row) is None]
        if missing:
            def strip(row: list[int]) -> list[int]:
                end = len(row)
                while end > 1 and row[end - 1] == self.pad_token_id:
                    end -= 1
                return row[:end]

            self.add([strip(row) for row in missing], progress=False)
        hidden_size = next(iter(self.states.values())).shape[-1]
        out = torch.zeros(*input_ids.shape, hidden_size, device=input_ids.device)
        for r, row in enumerate(rows):
            states = self._lookup(row)
            out[r, : len(states)] = states.to(out.device)
        return out

    @torch.no_grad()
    def add(self, sequences: Iterable[Sequence[int]], batch_tokens: int = 4096, progress: bool = True) -> None:
        """Run the full model once on every new sequence and keep the hidden states entering ``first_layer``."""
        new = sorted({tuple(s) for s in sequences if tuple(s) not in self.states}, key=len)
        bar = tqdm(total=len(new), desc="trunk states", disable=not progress)
        start = 0
        while start < len(new):
            stop = start + 1
            while stop < len(new) and (stop - start + 1) * len(new[stop]) <= batch_tokens:
                stop += 1
            batch = new[start:stop]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            hidden = self._model[0].base_model(input_ids=ids, attention_mask=mask, use_cache=False,
                                      output_hidden_states=True).hidden_states[self.first_layer]  # [b, T, H]
            for i, s in enumerate(batch):
                self.states[s] = hidden[i, : len(s)].clone()
            bar.update(len(batch))
            start = stop
        bar.close()


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s parameters and children, whose children can be replaced apart."""
    clone = copy.copy(module)
    for name, value in vars(module).items():  # children, parameters, buffers, hooks: own dicts, same entries
        if isinstance(value, dict):
            setattr(clone, name, copy.copy(value))
    return clone


def truncated_model(trunk: TrunkStates) -> nn.Module:
    """A copy of the trunk's decoder-only model holding its layers from ``first_layer`` on only, reading ``trunk``
    for its inputs.

    Works for models whose decoder keeps its layers in ``model.base_model.layers`` and loops over
    ``layers[: config.num_hidden_layers]`` (Llama, Mistral, Qwen2/3, SmolLM2 and their kin)."""
    model, first_layer = trunk._model[0], trunk.first_layer
    top = _shallow_copy(model)  # shares the frozen norm and head
    top.config = copy.deepcopy(model.config)
    decoder = _shallow_copy(model.base_model)
    decoder.layers = nn.ModuleList(copy.deepcopy(list(model.base_model.layers)[first_layer:]))
    decoder.embed_tokens = trunk
    decoder.config = top.config
    top.config.num_hidden_layers = len(decoder.layers)
    if getattr(top.config, "layer_types", None):
        top.config.layer_types = top.config.layer_types[first_layer:]
    for index, layer in enumerate(decoder.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = index
    setattr(top, top.base_model_prefix, decoder)
    return top
