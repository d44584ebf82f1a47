"""Generation: mixture, per-member and sampled-member decoding with a KV cache, checked against uncached oracles."""

from __future__ import annotations

import copy

import pytest
import torch

from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.evaluation.generate import choose_tokens, generate, prompt_log_weights
from renyi_lora.evaluation.inference import IncrementalForward, pad_right
from renyi_lora.evaluation.token_uncertainty import completion_scores

PROMPTS = ["hello there", "ab", "a longer prompt, with commas"]
EOS = 1


pytestmark = pytest.mark.usefixtures("one_thread")


def make_ensemble(model, num_members: int = 3, std: float = 0.3, seed: int = 0, **config) -> LoraEnsemble:
    """An ensemble whose members differ (random B); ``std = 0`` keeps B = 0 (every member is the base model)."""
    ensemble = LoraEnsemble(model, EnsembleConfig(num_members=num_members, init_seed=seed, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)
    return ensemble


def greedy_oracle(next_logits, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Uncached greedy decoding: recompute the whole sequence at every step; stop after EOS."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        token = int(next_logits(torch.tensor([ids])).argmax())
        ids.append(token)
        if token == EOS:
            break
    return ids[len(prompt_ids):]


def ids_of(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_identical_members_mixture_equals_hf_greedy(tokenizer, tiny_llama):
    base = copy.deepcopy(tiny_llama)
    ensemble = make_ensemble(tiny_llama, std=0.0)  # B = 0: every member is the base model
    results = generate(ensemble, tokenizer, PROMPTS, mode="mixture", max_new_tokens=10)
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = torch.tensor([ids_of(tokenizer, prompt)])
        reference = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=10, eos_token_id=EOS, pad_token_id=0)[0, ids.shape[1]:]
        (continuation,) = result.continuations
        assert [t.id for t in continuation.tokens] == reference.tolist()
        assert max(t.mi for t in continuation.tokens) < 1e-5


def test_identical_nonzero_members_equal_one_member(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    with torch.no_grad():  # copy member 0 into every member: identical but not the base model
        for layer in ensemble.lora_layers().values():
            layer.lora_A.copy_(layer.lora_A[:1].expand_as(layer.lora_A))
            layer.lora_B.copy_(layer.lora_B[:1].expand_as(layer.lora_B))
    results = generate(ensemble, tokenizer, PROMPTS, mode="mixture", max_new_tokens=8)
    for prompt, result in zip(PROMPTS, results, strict=True):
        expected = greedy_oracle(lambda x: ensemble(x)[0, 0, -1], ids_of(tokenizer, prompt), 8)
        assert [t.id for t in result.continuations[0].tokens] == expected
        assert max(t.mi for t in result.continuations[0].tokens) < 1e-5


@pytest.mark.parametrize("layers", [None, [1, 2]], ids=["all-layers", "shared-trunk"])
@pytest.mark.parametrize("per_member_rows", [False, True])
def test_cached_logits_equal_recomputed(tokenizer, layers, per_member_rows):
    from conftest import make_llama

    ensemble = make_ensemble(make_llama(len(tokenizer), num_layers=3), layers_to_transform=layers)
    assert ensemble.shared_trunk_layers == (1 if layers else 0)
    K = ensemble.num_members
    rows = [ids_of(tokenizer, p) for p in PROMPTS[:2]]
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])  # left-padded [B, S]
    mask = (torch.arange(length) >= torch.tensor([length - len(r) for r in rows])[:, None]).long()
    if per_member_rows:
        input_ids, mask = input_ids.repeat(K, 1), mask.repeat(K, 1)
    forward = IncrementalForward(ensemble, per_member_rows)
    step, history = input_ids, [list(r) for r in rows]
    with torch.no_grad():
        for t in range(4):
            logits = forward(step, mask)  # [K, B, V]
            for b, ids in enumerate(history):
                expected = ensemble(torch.tensor([ids]))[:, 0, -1]  # [K, V], unpadded, uncached
                torch.testing.assert_close(logits[:, b], expected, atol=1e-5, rtol=1e-5)
            new = torch.tensor([5 + t, 9 + t])  # the same new token for every member's copy of a row
            history = [h + [int(n)] for h, n in zip(history, new, strict=True)]
            step = new.repeat(K if per_member_rows else 1)[:, None]
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], dim=1)


def test_members_mode_gives_each_members_greedy_continuation(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama, std=0.5)
    results = generate(ensemble, tokenizer, PROMPTS, mode="members", max_new_tokens=8)
    texts = set()
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert [c.member for c in result.continuations] == [0, 1, 2]
        for k, continuation in enumerate(result.continuations):
            expected = greedy_oracle(lambda x, k=k: ensemble(x)[k, 0, -1], ids_of(tokenizer, prompt), 8)
            assert [t.id for t in continuation.tokens] == expected
            texts.add(continuation.text)
            # prob is the member's own probability of its token, MI is the mixture's along this continuation
            assert all(0 < t.prob <= 1 and t.mi >= 0 for t in continuation.tokens)
    assert len(texts) > len(PROMPTS)  # distinct members continue differently


@pytest.mark.parametrize("mode", ["mixture", "members", "sample"])
def test_batched_left_padded_equals_unbatched(tokenizer, tiny_llama, mode):
    ensemble = make_ensemble(tiny_llama)
    kwargs = {"mode": mode, "max_new_tokens": 8, "route_on_prompt": True}
    batched = generate(ensemble, tokenizer, PROMPTS, **kwargs)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(ensemble, tokenizer, [prompt], **kwargs)[0]
        torch.testing.assert_close(batched[b].weights, alone.weights, atol=1e-6, rtol=1e-6)
        for got, want in zip(batched[b].continuations, alone.continuations, strict=True):
            if mode != "sample":  # the member drawn depends on the batch's random draws
                assert [t.id for t in got.tokens] == [t.id for t in want.tokens]
                assert [t.mi for t in got.tokens] == pytest.approx([t.mi for t in want.tokens], abs=1e-5)


def test_left_padding_with_absolute_positions_gpt2(tokenizer):
    """GPT-2 adds learned absolute position embeddings: left padding is only right if positions skip the pads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                        bos_token_id=None, eos_token_id=EOS, pad_token_id=0)
    ensemble = make_ensemble(GPT2LMHeadModel(config).eval(), target_modules=["c_attn", "c_fc"],
                             layers_to_transform=[1, 2])
    batched = generate(ensemble, tokenizer, PROMPTS, mode="mixture", max_new_tokens=6, mixture="token")
    for prompt, result in zip(PROMPTS, batched, strict=True):
        alone = generate(ensemble, tokenizer, [prompt], mode="mixture", max_new_tokens=6, mixture="token")[0]
        assert [t.id for t in result.continuations[0].tokens] == [t.id for t in alone.continuations[0].tokens]
        # and the cached mixture follows an uncached greedy loop on the mixture of member probabilities
        expected = greedy_oracle(lambda x: torch.logsumexp(torch.log_softmax(ensemble(x)[:, 0, -1], -1), 0),
                                 ids_of(tokenizer, prompt), 6)
        assert [t.id for t in result.continuations[0].tokens] == expected


def test_mixture_mi_equals_free_text_scores(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    results = generate(ensemble, tokenizer, PROMPTS, mode="mixture", max_new_tokens=6, weights=[0.5, 0.3, 0.2],
                       mixture="token")  # the fixed-weight token mixture (the sequence mixture: tests/test_routing.py)
    prompts = [ids_of(tokenizer, p) for p in PROMPTS]
    generated = [[t.id for t in r.continuations[0].tokens] for r in results]
    scores = completion_scores(ensemble, *pad_right(prompts, generated, 0),
                               log_weights=torch.tensor([0.5, 0.3, 0.2]).log())
    for b, result in enumerate(results):
        n, tokens = len(prompts[b]), result.continuations[0].tokens
        mi = scores.epistemic[b, n: n + len(tokens)]
        assert [t.mi for t in tokens] == pytest.approx(mi.tolist(), abs=1e-5)
        assert [t.prob for t in tokens] == pytest.approx(scores.mixture_logprob[b, n: n + len(tokens)].exp().tolist(),
                                                         abs=1e-5)
        assert min(t.mi for t in tokens) > 0  # distinct members disagree


def test_sample_mode_follows_the_drawn_member(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama, std=0.5)
    members = generate(ensemble, tokenizer, PROMPTS, mode="members", max_new_tokens=6)
    sampled = generate(ensemble, tokenizer, PROMPTS, mode="sample", max_new_tokens=6, seed=3)
    drawn = set()
    for own, result in zip(members, sampled, strict=True):
        (continuation,) = result.continuations
        drawn.add(continuation.member)
        assert continuation.text == own.continuations[continuation.member].text
    # A one-hot weight always draws that member.
    forced = generate(ensemble, tokenizer, PROMPTS, mode="sample", max_new_tokens=2, weights=[0, 1, 0])
    assert [r.continuations[0].member for r in forced] == [1, 1, 1]


def test_route_on_prompt_weights_equal_hand_formula(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    alpha = 0.7
    rows = [ids_of(tokenizer, p) for p in PROMPTS]
    got = prompt_log_weights(ensemble, rows, alpha, prior.log()).exp()  # [K, B]
    for b, ids in enumerate(rows):
        with torch.no_grad():
            log_probs = torch.log_softmax(ensemble(torch.tensor([ids]))[:, 0, :-1].double(), dim=-1)  # [K, T-1, V]
        loglik = log_probs.gather(-1, torch.tensor(ids[1:]).expand(3, -1)[..., None]).sum((1, 2))  # [K]
        expected = prior * torch.exp(alpha * loglik)
        torch.testing.assert_close(got[:, b], expected / expected.sum(), atol=1e-6, rtol=1e-5)
    results = generate(ensemble, tokenizer, PROMPTS, max_new_tokens=1, route_on_prompt=True, alpha=alpha,
                       weights=prior.tolist())
    used = torch.tensor([r.weights for r in results], dtype=torch.float64).T  # [K, B]
    torch.testing.assert_close(used, got, atol=1e-6, rtol=1e-5)


def test_stop_on_eos_per_row(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    free = [[t.id for t in r.continuations[0].tokens] for r in generate(ensemble, tokenizer, PROMPTS, max_new_tokens=6)]
    eos = free[0][2]  # make the third token of the first continuation an EOS
    results = generate(ensemble, tokenizer, PROMPTS, max_new_tokens=6, eos_token_id=eos)
    for ids, result in zip(free, results, strict=True):
        (continuation,) = result.continuations
        # Each row stops at its own first EOS (kept); the other rows go on unchanged beside a finished one.
        expected = ids[: ids.index(eos) + 1] if eos in ids else ids
        assert [t.id for t in continuation.tokens] == expected
        assert continuation.finished == (eos in ids)
    assert results[0].continuations[0].finished and len(results[0].continuations[0].tokens) <= 3


def test_choose_tokens_greedy_top_p_and_seed():
    log_probs = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, -1.0]] * 2000), dim=-1)
    assert choose_tokens(log_probs).tolist() == [1] * 2000
    # top_p below the top token's mass keeps only the top token
    assert choose_tokens(log_probs, True, 1.0, 0.5, generator=torch.Generator().manual_seed(0)).unique().tolist() == [1]
    draw = choose_tokens(log_probs, True, 1.0, 0.9, generator=torch.Generator().manual_seed(0))
    assert set(draw.tolist()) == {0, 1, 2}  # the least likely token (3) is outside the 0.9 nucleus
    again = choose_tokens(log_probs, True, 1.0, 0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)
    cold = choose_tokens(log_probs, True, 0.05, 1.0, generator=torch.Generator().manual_seed(0))
    assert (cold == 1).float().mean() > 0.99


def test_base_only_generation_is_the_base_model(tokenizer, tiny_llama):
    base = copy.deepcopy(tiny_llama)
    ensemble = make_ensemble(tiny_llama, std=0.5)
    with ensemble.adapters_disabled():
        results = generate(ensemble, tokenizer, PROMPTS[:1], mode="members", max_new_tokens=6)
    assert len(results[0].continuations) == 1
    expected = greedy_oracle(lambda x: base(input_ids=x).logits[0, -1], ids_of(tokenizer, PROMPTS[0]), 6)
    assert [t.id for t in results[0].continuations[0].tokens] == expected


def test_bad_arguments_raise_clear_errors(tokenizer, tiny_llama):
    ensemble = make_ensemble(tiny_llama)
    with pytest.raises(ValueError, match="mode must be one of"):
        generate(ensemble, tokenizer, PROMPTS, mode="vote")
    with pytest.raises(ValueError, match="mixture must be one of"):
        generate(ensemble, tokenizer, PROMPTS, mixture="vote")
    with pytest.raises(ValueError, match="top_p"):
        generate(ensemble, tokenizer, PROMPTS, top_p=0)
    with pytest.raises(ValueError, match="weights must be 3"):
        generate(ensemble, tokenizer, PROMPTS, weights=[1, 1])
