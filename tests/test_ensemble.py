"""Invariants of the K-member LoRA layer, injection, save/load and the PEFT export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from renyi_lora.config import EnsembleConfig
from renyi_lora.ensemble import LoraEnsemble, sequence_logliks
from renyi_lora.io import export_peft

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomise_b(ensemble: LoraEnsemble, seed: int = 0, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)


class OneLora(nn.Module):
    def __init__(self, inner: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float):
        super().__init__()
        self.inner, self.A, self.B, self.scaling = inner, A, B, scaling

    def forward(self, x):
        return self.inner(x) + self.scaling * (x @ self.A.T) @ self.B.T


def single_member_logits(base: nn.Module, ensemble: LoraEnsemble, k: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Slow oracle: a fresh copy of the base model with only member k's LoRA written out by hand."""
    model = copy.deepcopy(base)
    for name, layer in ensemble.lora_layers().items():
        parent_name, _, child = name.rpartition(".")
        inner = model.get_submodule(name)
        A, B, s = layer.lora_A[k].detach(), layer.lora_B[k].detach(), layer.scaling

        setattr(model.get_submodule(parent_name), child, OneLora(inner, A, B, s))
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture
def batch():
    torch.manual_seed(0)
    input_ids = torch.randint(4, 100, (3, 12))
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100  # a shorter completion
    return input_ids, torch.ones_like(input_ids), labels


def test_zero_b_gives_base_logits_exactly(tiny_llama, batch):
    input_ids, mask, _ = batch
    with torch.no_grad():
        base = tiny_llama(input_ids=input_ids, attention_mask=mask).logits
        ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3, target_modules=["all-linear"]))
        logits = ensemble(input_ids, mask)
    assert logits.shape == (3, *base.shape)
    assert torch.equal(logits, base.expand_as(logits))


def test_batched_forward_equals_per_member_oracle(tiny_llama, batch):
    input_ids, mask, _ = batch
    base = copy.deepcopy(tiny_llama)
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3, target_modules=ALL_LLAMA))
    randomise_b(ensemble)
    with torch.no_grad():
        logits = ensemble(input_ids, mask)
    for k in range(3):
        torch.testing.assert_close(logits[k], single_member_logits(base, ensemble, k, input_ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0], logits[1])


def test_disabled_adapters_run_the_base_on_b_rows(tiny_llama, batch):
    input_ids, mask, labels = batch
    with torch.no_grad():
        base = tiny_llama(input_ids=input_ids).logits
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=2))
    randomise_b(ensemble)
    with torch.no_grad(), ensemble.adapters_disabled():
        assert ensemble.hidden_states(input_ids, mask).shape[0] == 1
        token = ensemble(input_ids, mask, labels=labels)  # [1, B, T] per-token log-likelihoods
    reference = torch.log_softmax(base[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    reference = (reference * (labels[:, 1:] != -100)).sum(-1)
    torch.testing.assert_close(token.sum(-1)[0], reference, atol=1e-5, rtol=1e-5)
    assert not ensemble.is_disabled  # restored on exit


def test_chunked_logliks_equal_full_log_softmax(tiny_llama, batch):
    input_ids, mask, labels = batch
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3))
    randomise_b(ensemble)
    logits = ensemble(input_ids, mask)
    full = torch.log_softmax(logits[:, :, :-1], -1).gather(-1, input_ids[:, 1:].expand(3, -1, -1)[..., None])
    full = (full.squeeze(-1) * (labels[:, 1:] != -100)).sum(-1)  # [K, B]
    chunked = sequence_logliks(ensemble, input_ids, mask, labels, chunk_size=7)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    # Gradients too (the chunks are checkpointed).
    g_full = torch.autograd.grad(full.sum(), ensemble.lora_parameters()[1])[0]
    g_chunked = torch.autograd.grad(chunked.sum(), ensemble.lora_parameters()[1])[0]
    torch.testing.assert_close(g_chunked, g_full, atol=1e-5, rtol=1e-4)
    normalised = sequence_logliks(ensemble, input_ids, mask, labels, length_normalize=True)
    torch.testing.assert_close(normalised, chunked / (labels != -100).sum(-1), atol=1e-6, rtol=1e-5)


def test_optimiser_step_moves_only_lora(tiny_llama, batch):
    input_ids, mask, labels = batch
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=2))
    trainable = [p for p in ensemble.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in ensemble.lora_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    B_before = [layer.lora_B.detach().clone() for layer in ensemble.lora_layers().values()]
    (-sequence_logliks(ensemble, input_ids, mask, labels).sum()).backward()
    optimizer.step()
    for name, param in ensemble.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, before[name.replace(".base_layer", "")]), name
    for old, layer in zip(B_before, ensemble.lora_layers().values(), strict=True):
        assert (layer.lora_B != old).any(dim=(1, 2)).all()  # every member's B moved


def test_members_draw_their_own_a(tiny_llama):
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3, init_seed=5))
    for layer in ensemble.lora_layers().values():
        assert not torch.equal(layer.lora_A[0], layer.lora_A[1])
        assert torch.all(layer.lora_B == 0)
        bound = 1 / layer.lora_A.shape[-1] ** 0.5
        assert layer.lora_A.abs().max() <= bound


def test_random_b_start_is_a_seeded_draw_per_member(tiny_llama):
    """``init_lora_b_std`` > 0: each member starts from its own random function (a randomised prior), drawn from
    N(0, std^2) by the init seed; the default 0 keeps PEFT's zero start."""
    def draw(seed: int) -> LoraEnsemble:
        return LoraEnsemble(copy.deepcopy(tiny_llama), EnsembleConfig(num_members=3, init_seed=seed,
                                                                      init_lora_b_std=0.5))

    first, again, other = draw(5), draw(5), draw(6)
    b = torch.cat([layer.lora_B.flatten(1) for layer in first.lora_layers().values()], 1)  # [K, all B entries]
    assert not torch.equal(b[0], b[1]) and b.std().item() == pytest.approx(0.5, rel=0.05)
    for one, two, three in zip(*(e.lora_layers().values() for e in (first, again, other)), strict=True):
        assert torch.equal(one.lora_B, two.lora_B) and torch.equal(one.lora_A, two.lora_A)
        assert not torch.equal(one.lora_B, three.lora_B)
    with pytest.raises(ValueError, match="init_lora_b_std"):
        EnsembleConfig(init_lora_b_std=-0.1)


def test_target_modules_selection(tiny_llama):
    ensemble = LoraEnsemble(copy.deepcopy(tiny_llama), EnsembleConfig(target_modules=["q_proj", "v_proj"]))
    assert sorted(n.rsplit(".", 1)[1] for n in ensemble.module_names) == ["q_proj"] * 2 + ["v_proj"] * 2
    everything = LoraEnsemble(copy.deepcopy(tiny_llama), EnsembleConfig(target_modules=["all-linear"]))
    assert len(everything.module_names) == 7 * 2 and "lm_head" not in everything.module_names
    with pytest.raises(ValueError, match=r"matched no linear module.*q_proj"):
        LoraEnsemble(tiny_llama, EnsembleConfig(target_modules=["attention_dense"]))


@pytest.mark.parametrize(("field", "value"), [("num_members", 0), ("rank", 0), ("lora_dropout", 1.0),
                                              ("lora_alpha", -1.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        EnsembleConfig(**{field: value})


def test_gpt2_conv1d_and_peft_export(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    base = GPT2LMHeadModel(config).eval()
    pristine = copy.deepcopy(base)
    ensemble = LoraEnsemble(base, EnsembleConfig(num_members=2, rank=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomise_b(ensemble, std=0.5)
    input_ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        logits = ensemble(input_ids)
    export_peft(ensemble, tmp_path / "member_1", 1)
    peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path / "member_1").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=input_ids).logits, logits[1], atol=1e-5, rtol=1e-5)


def test_llama_peft_export_matches_every_member(tiny_llama, tmp_path, batch):
    peft = pytest.importorskip("peft")
    input_ids, mask, _ = batch
    pristine = copy.deepcopy(tiny_llama)
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3, rank=4))
    randomise_b(ensemble)
    with torch.no_grad():
        logits = ensemble(input_ids, mask)
    for k in range(3):
        export_peft(ensemble, tmp_path / f"member_{k}", k)
    peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path / "member_0", adapter_name="member_0")
    for k in (1, 2):
        peft_model.load_adapter(tmp_path / f"member_{k}", adapter_name=f"member_{k}")
    peft_model.eval()
    for k in range(3):
        peft_model.set_adapter(f"member_{k}")
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=input_ids).logits, logits[k], atol=1e-5, rtol=1e-5)


def test_save_load_is_exact_and_selects_members(tiny_llama, tmp_path, batch):
    input_ids, mask, _ = batch
    pristine = copy.deepcopy(tiny_llama)
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3, target_modules=["q_proj", "down_proj"]))
    randomise_b(ensemble)
    ensemble.save_pretrained(tmp_path)
    restored = LoraEnsemble.from_pretrained(copy.deepcopy(pristine), tmp_path)
    with torch.no_grad():
        logits = ensemble(input_ids, mask)
        assert torch.equal(restored(input_ids, mask), logits)
        subset = LoraEnsemble.from_pretrained(copy.deepcopy(pristine), tmp_path, members=[2, 0])
        assert torch.equal(subset(input_ids, mask), logits[[2, 0]])
    assert restored.ensemble_config == ensemble.ensemble_config
    with pytest.raises(ValueError, match="members"):
        LoraEnsemble.from_pretrained(copy.deepcopy(pristine), tmp_path, members=[3])


def test_mixture_weights_are_saved_loaded_and_renormalised_for_a_subset(tiny_llama, tmp_path):
    pristine = copy.deepcopy(tiny_llama)
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=3, target_modules=["q_proj"]))
    torch.testing.assert_close(ensemble.mixture_weights, torch.full((3,), 1 / 3))  # uniform until learned
    ensemble.mixture_weights.copy_(torch.tensor([0.5, 0.3, 0.2]))
    ensemble.save_pretrained(tmp_path)
    restored = LoraEnsemble.from_pretrained(copy.deepcopy(pristine), tmp_path)
    torch.testing.assert_close(restored.mixture_weights, torch.tensor([0.5, 0.3, 0.2]))
    subset = LoraEnsemble.from_pretrained(copy.deepcopy(pristine), tmp_path, members=[2, 0])
    torch.testing.assert_close(subset.mixture_weights, torch.tensor([0.2, 0.5]) / 0.7)
    config = json.loads((tmp_path / "ensemble_config.json").read_text())
    del config["mixture_weights"]  # a folder saved before pi was learned: uniform
    (tmp_path / "ensemble_config.json").write_text(json.dumps(config))
    torch.testing.assert_close(LoraEnsemble.from_pretrained(copy.deepcopy(pristine), tmp_path).mixture_weights,
                               torch.full((3,), 1 / 3))
    config["mixture_weights"] = [0.5, -0.1, 0.6]
    (tmp_path / "ensemble_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ensemble_config.json: mixture_weights must be 3 non-negative"):
        LoraEnsemble.from_pretrained(copy.deepcopy(pristine), tmp_path)


def test_load_rejects_mismatched_base(tiny_llama, tmp_path):
    from conftest import make_llama

    LoraEnsemble(tiny_llama, EnsembleConfig(num_members=2)).save_pretrained(tmp_path)
    wider = make_llama(tiny_llama.config.vocab_size, hidden_size=64)
    with pytest.raises(ValueError, match="has shape"):
        LoraEnsemble.from_pretrained(wider, tmp_path)
    deeper = make_llama(tiny_llama.config.vocab_size, num_layers=1)
    with pytest.raises(ValueError, match="no module"):
        LoraEnsemble.from_pretrained(deeper, tmp_path)


def test_gradient_checkpointing_with_a_shared_trunk(batch):
    from conftest import make_llama

    input_ids, mask, labels = batch
    grads = []
    for checkpointing in (False, True):
        ensemble = LoraEnsemble(make_llama(101, seed=3, num_layers=3), EnsembleConfig(num_members=2,
                                                                                    layers_to_transform=[1, 2]))
        randomise_b(ensemble)
        if checkpointing:
            ensemble.gradient_checkpointing_enable({"use_reentrant": False})
        ensemble.train()
        sequence_logliks(ensemble, input_ids, mask, labels).sum().backward()
        grads.append([p.grad for p in ensemble.lora_parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_shared_trunk_equals_repeating_every_layer(batch_size):
    from conftest import make_llama

    torch.manual_seed(0)
    base = make_llama(101, num_layers=4)
    input_ids = torch.randint(4, 100, (batch_size, 9))
    mask = torch.ones_like(input_ids)
    mask[0, -2:] = 0  # right padding: the 4D attention mask must be repeated too
    labels = input_ids.masked_fill(mask == 0, -100)
    ensemble = LoraEnsemble(copy.deepcopy(base), EnsembleConfig(num_members=3, layers_to_transform=[2, 3]))
    assert len(ensemble.module_names) == 14
    assert all(".layers.2." in n or ".layers.3." in n for n in ensemble.module_names)
    assert ensemble.shared_trunk_layers == 2
    randomise_b(ensemble)
    with torch.no_grad():
        shared = ensemble(input_ids, mask)
        shared_token = ensemble(input_ids, mask, labels=labels)
        ensemble.shared_trunk_layers = 0  # the plain path: every layer on K*B rows
        plain = ensemble(input_ids, mask)
        plain_token = ensemble(input_ids, mask, labels=labels)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_token, plain_token, atol=1e-5, rtol=1e-5)
    everything = LoraEnsemble(copy.deepcopy(base), EnsembleConfig(num_members=3))
    assert everything.shared_trunk_layers == 0


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    from conftest import make_llama

    input_ids, mask, labels = batch

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        ensemble = LoraEnsemble(make_llama(101, seed=3), EnsembleConfig(num_members=3, init_seed=1))
        randomise_b(ensemble)
        if checkpointing:
            ensemble.gradient_checkpointing_enable({"use_reentrant": False})
            assert ensemble.model.is_gradient_checkpointing
        ensemble.train()
        sequence_logliks(ensemble, input_ids, mask, labels).sum().backward()
        return [p.grad for p in ensemble.lora_parameters()]

    for plain, checkpointed in zip(gradients(False), gradients(True), strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layers", [None, [1]])
def test_member_chunk_forward_equals_a_slice_of_the_full_forward(tiny_llama, batch, layers):
    input_ids, mask, labels = batch
    ensemble = LoraEnsemble(tiny_llama, EnsembleConfig(num_members=4, layers_to_transform=layers))
    randomise_b(ensemble)
    with torch.no_grad():
        full = ensemble(input_ids, mask, labels=labels)
        with ensemble.members(1, 3):
            assert ensemble.active_members == 2
            chunk = ensemble(input_ids, mask, labels=labels)
    torch.testing.assert_close(chunk, full[1:3], atol=1e-5, rtol=1e-5)
    assert ensemble.active_members == 4
    with pytest.raises(ValueError, match="member chunk"):
        with ensemble.members(3, 5):
            pass


@pytest.mark.parametrize(("bias", "trainable"), [(False, False), (True, False), (False, True)])
def test_target_logprobs_paths_match_log_softmax(bias, trainable):
    """The fused path (frozen head, no bias) and the checkpointed fallback both give log_softmax's values and
    gradients, for the hidden states and, when it trains, the head."""
    from renyi_lora.likelihoods import target_logprobs

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=bias)
    head.requires_grad_(trainable)
    hidden = torch.randn(9, 6, generator=generator, requires_grad=True)
    targets = torch.randint(0, 11, (9,), generator=generator)
    upstream = torch.randn(9, generator=generator)
    got = target_logprobs(hidden, head, targets, chunk_size=4)
    expected = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    inputs = [hidden, head.weight] if trainable else [hidden]
    for g, e in zip(torch.autograd.grad((got * upstream).sum(), inputs),
                    torch.autograd.grad((expected * upstream).sum(), inputs), strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
