"""Shared-prompt scoring (each prompt once, its completions from the KV cache) equals scoring full rows."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.scoring import shared_prompt_logliks
from renyi_lora.token_uncertainty import pad_right

PROMPTS = [[5, 9, 13, 7], [22], [30, 31, 32, 33, 34, 35, 36]]
COMPLETIONS = [[[40, 41], [42], [43, 44, 45]], [[50, 51, 52, 53]], [[60], [61, 62]]]


def full_row_scores(ensemble, prompts, completions) -> list[torch.Tensor]:
    rows = [(p, c) for p, cs in zip(prompts, completions, strict=True) for c in cs]
    input_ids, mask, labels = pad_right([p for p, _ in rows], [c for _, c in rows], 0)
    with torch.no_grad():
        total = ensemble(input_ids, mask, labels=labels).double().sum(-1)  # [K, R]
    return list(total.split([len(cs) for cs in completions], dim=1))


@pytest.mark.parametrize(("members", "layers", "disabled"), [(3, None, False), (3, [1, 2], False), (1, None, False),
                                                              (3, None, True)])
def test_shared_prompt_scores_equal_full_rows(members, layers, disabled):
    ensemble = LoraEnsemble(make_llama(101, seed=4, num_layers=3), EnsembleConfig(num_members=members,
                                                                                 layers_to_transform=layers))
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    assert ensemble.shared_trunk_layers == (1 if layers and members > 1 else 0)
    context = ensemble.adapters_disabled() if disabled else torch.no_grad()
    with context:
        shared = shared_prompt_logliks(ensemble, PROMPTS, COMPLETIONS, pad_token_id=0)
        full = full_row_scores(ensemble, PROMPTS, COMPLETIONS)
    assert shared is not None and len(shared) == len(PROMPTS)
    for got, expected, choices in zip(shared, full, COMPLETIONS, strict=True):
        assert got.shape == (1 if disabled else members, len(choices))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(shared[0][:, 0], shared[0][:, 1])  # different completions, different scores
