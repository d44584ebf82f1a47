"""Shared-prompt scoring (each prompt once, its completions from the KV cache) equals scoring full rows."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.evaluation.inference import pad_right
from renyi_lora.evaluation.scoring import shared_prompt_logliks

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


def test_one_token_choices_from_one_prompt_forward_equal_full_rows(tokenizer, tiny_llama, one_thread):
    """Answer letters: every choice one token, scored from one forward of the prompt (``next_token_logliks``), give
    the same distribution as running every ``prompt + choice`` row in full."""
    from renyi_lora.evaluation.multiple_choice import MultipleChoiceItem, choice_log_probs, encode_choices

    items = [MultipleChoiceItem("Q: 2+2? A. 4 B. 5\nAnswer: ", ["A", "B"], 0, None, 1),
             MultipleChoiceItem("Q: sky? A. red B. blue C. green\nAnswer: ", ["A", "B", "C"], 1, None, 2),
             MultipleChoiceItem("yes or no?", ["y", "n"], 0, None, 3)]
    assert all(len(choice) == 1 for _, choice in encode_choices(tokenizer, items))
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3, init_lora_b_std=0.3))
    fast = choice_log_probs(ensemble, tokenizer, items, batch_size=4)  # [K, N, C]
    rows = encode_choices(tokenizer, items)
    with torch.no_grad():
        full = torch.stack([ensemble(torch.tensor([p + c]))[:, 0, len(p) - 1].double().log_softmax(-1)[:, c[0]]
                            for p, c in rows], 1)  # [K, rows]
    start = 0
    for n, item in enumerate(items):
        want = full[:, start:start + len(item.choices)].log_softmax(-1)
        torch.testing.assert_close(fast[:, n, : len(item.choices)], want, atol=1e-6, rtol=1e-6)
        start += len(item.choices)
