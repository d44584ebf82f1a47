"""Member log-likelihoods equal log_softmax of the model's own logits on every architecture family we can build tiny.

The fused path (``likelihoods.target_logprobs``) applies only the output head; models that transform the logits
after it (Gemma's soft-capping, Granite's ``logits_scaling``, Falcon-H1's ``lm_head_multiplier``, Cohere's
``logit_scale``) must be caught by ``output_head_is_plain`` when the ensemble is built and take the full logits.
The likelihood comparisons run in float64, so they hold to rounding of sums, not to luck.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from renyi_lora import likelihoods
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.evaluation.inference import pad_right
from renyi_lora.evaluation.scoring import shared_prompt_logliks

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
              initializer_range=0.1)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1, pad_token_id=0,
            eos_token_id=1, bos_token_id=None)
FALCON_H1_MAMBA = dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8)
# name: (config class, model class, config arguments, whether logits = head(hidden))
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON, True),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2, True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON, True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, "head_dim": 8}, True),
    "mistral": ("MistralConfig", "MistralForCausalLM", COMMON, True),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", COMMON, True),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, "head_dim": 8}, False),  # softcap 30 by default
    "gemma2-uncapped": ("Gemma2Config", "Gemma2ForCausalLM",
                        {**COMMON, "head_dim": 8, "final_logit_softcapping": None}, True),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, "head_dim": 8, "final_logit_softcapping": 30.0},
               False),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {**COMMON, "logits_scaling": 4.0}, False),
    "falcon-h1": ("FalconH1Config", "FalconH1ForCausalLM",
                  {**COMMON, **FALCON_H1_MAMBA, "head_dim": 8, "lm_head_multiplier": 0.5}, False),
    "falcon-h1-unit": ("FalconH1Config", "FalconH1ForCausalLM",
                       {**COMMON, **FALCON_H1_MAMBA, "head_dim": 8, "lm_head_multiplier": 1.0}, True),
    "cohere": ("CohereConfig", "CohereForCausalLM", {**COMMON, "logit_scale": 0.25}, False),
}


def build(name: str, dtype: torch.dtype = torch.float64) -> tuple[LoraEnsemble, bool]:
    """A K = 2 all-linear ensemble on a tiny random model, with every lora_B drawn nonzero."""
    config_class, model_class, arguments, plain = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**arguments)).double().eval()
    if plain:
        ensemble = LoraEnsemble(model, EnsembleConfig(num_members=2, rank=4))
    else:
        with pytest.warns(UserWarning, match="full logits"):
            ensemble = LoraEnsemble(model, EnsembleConfig(num_members=2, rank=4))
    ensemble.to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in ensemble.lora_parameters()[1::2]:  # lora_B
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * 0.3)
    return ensemble, plain


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded rows ``[2, 10]``: a prompt, then completion targets; the second row is 3 tokens shorter."""
    input_ids = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    input_ids[1, 7:] = 0
    labels = input_ids.clone()
    labels[:, :4] = likelihoods.IGNORE_INDEX
    labels[attention_mask == 0] = likelihoods.IGNORE_INDEX
    return input_ids, attention_mask, labels


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[K, B, T]`` target log-probs from ``logits [K, B, T, V]``, the slow obvious way."""
    logp = logits[:, :, :-1].log_softmax(-1)
    targets = labels[:, 1:].clamp(min=0).expand(logits.shape[0], -1, -1)
    token = logp.gather(-1, targets[..., None]).squeeze(-1) * (labels[:, 1:] != likelihoods.IGNORE_INDEX)
    return torch.nn.functional.pad(token, (1, 0))


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["selected", "fixed-shapes"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_member_logliks_equal_log_softmax_of_the_models_own_logits(name, fixed_shapes, monkeypatch):
    """Training path (gradients on: the fused head; its gradients too), scoring path (no grad), and the base model
    with adapters disabled. ``fixed_shapes`` runs the path ``torch.compile`` traces (head on every position)."""
    ensemble, plain = build(name)
    assert ensemble.plain_head is plain
    input_ids, attention_mask, labels = batch()
    weights = torch.randn(2, *labels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    expected = reference(ensemble(input_ids, attention_mask), labels)  # [K, B, T]
    expected_grads = torch.autograd.grad((weights * expected).sum(), ensemble.lora_parameters())
    with torch.no_grad(), ensemble.adapters_disabled():
        base = reference(ensemble.model(input_ids=input_ids, attention_mask=attention_mask).logits[None], labels)
    assert not torch.allclose(base, expected.detach())  # the adapters matter

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: fixed_shapes)
    token = ensemble(input_ids, attention_mask, labels=labels)
    grads = torch.autograd.grad((weights * token).sum(), ensemble.lora_parameters())
    torch.testing.assert_close(token, expected, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(input_ids, attention_mask, labels=labels), expected.detach(),
                                   atol=1e-10, rtol=1e-10)
        with ensemble.adapters_disabled():
            torch.testing.assert_close(ensemble(input_ids, attention_mask, labels=labels), base,
                                       atol=1e-10, rtol=1e-10)


def test_the_head_check_runs_once_per_ensemble(monkeypatch):
    """The verdict is the ensemble's: a likelihood call runs the base model once and never re-checks the head."""
    ensemble, _ = build("gemma2")
    monkeypatch.setattr(likelihoods, "output_head_is_plain", lambda *args: pytest.fail("checked again"))
    calls = []
    ensemble.model.base_model.register_forward_hook(lambda *args: calls.append(1))
    input_ids, attention_mask, labels = batch()
    for _ in range(2):
        ensemble(input_ids, attention_mask, labels=labels)
    assert len(calls) == 2


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_shared_prompt_scoring_agrees_with_the_training_likelihoods(name):
    """Scoring from the KV cache uses the model's own logits; training uses ``token_logliks``: the same numbers.
    (A cache that cannot be re-indexed by rows returns None, and the caller scores full rows with
    ``token_logliks`` itself.) float32: in float64, Gemma 2's eager attention turns the left-padded prompt's
    float64 mask minimum into -inf in its float32 softmax, and the fully masked pad row gives NaN."""
    ensemble, _ = build(name, torch.float32)
    prompts, completions = [[5, 6, 7, 8], [9, 10, 11]], [[[12, 13], [14, 15, 16]], [[17], [18, 19]]]
    rows = [(p, c) for p, choices in zip(prompts, completions, strict=True) for c in choices]
    with torch.no_grad():
        shared = shared_prompt_logliks(ensemble, prompts, completions, pad_token_id=0)
        expected = ensemble(*pad_right([p for p, _ in rows], [c for _, c in rows], 0)).double().sum(-1)
    if shared is not None:
        torch.testing.assert_close(torch.cat(shared, dim=1), expected, atol=1e-4, rtol=1e-5)
