"""Member chunks (--member_chunk_size) give the all-at-once gradients and loss, for SFT and DPO."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trainer

from renyi_lora.training.trainer import RenyiConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SFT = [{"prompt": f"q{i}:", "completion": f" a{i % 3}b", "group": "g"} for i in range(6)]
PREFERENCES = [{"prompt": f"q{i}:", "chosen": f" yes{i}", "rejected": f" NO{i % 2}"} for i in range(5)]


def step_gradients(tmp_path, preference: bool, chunk: int | None, alpha: float):
    """One training step of K = 4 members on layer 1 (``conftest.make_trainer``); the loss and the gradients."""
    run = make_trainer(tmp_path, PREFERENCES if preference else SFT, preference=preference, model_seed=1,
                       lora_b_std=0.3, num_members=4, layers_to_transform=[1], init_seed=0, alpha=alpha,
                       member_chunk_size=chunk, prior_weight=1e-2)
    run.trainer.current_gradient_accumulation_steps = 1
    loss = run.trainer.training_step(run.trainer.model, run.batch())
    return loss, [p.grad.clone() for p in run.ensemble.lora_parameters()]


@pytest.mark.parametrize("preference", [False, True])
@pytest.mark.parametrize(("chunk", "alpha"), [(1, 1.0), (3, 4.0), (2, 0.0)])
def test_chunked_gradients_equal_all_at_once(tmp_path, preference, chunk, alpha):
    loss, grads = step_gradients(tmp_path, preference, None, alpha)
    chunked_loss, chunked = step_gradients(tmp_path, preference, chunk, alpha)
    torch.testing.assert_close(chunked_loss, loss, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads)
    for expected, got in zip(grads, chunked, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_chunks_need_sequence_routing():
    with pytest.raises(ValueError, match="routing_level"):
        RenyiConfig(output_dir="x", member_chunk_size=1, routing_level="token")
    with pytest.raises(ValueError, match="member_chunk_size"):
        RenyiConfig(output_dir="x", member_chunk_size=0)


def trained_adapters(tmp_path, checkpointing: bool, chunk: int | None, dtype: torch.dtype = torch.float32,
                     **settings) -> list[torch.Tensor]:
    """Two optimizer steps through ``trainer.train()``, the path the CLI's flags take."""

    def cast(ensemble) -> None:
        ensemble.to(dtype)

    run = make_trainer(tmp_path, SFT, model_seed=1, setup=cast, num_members=4, init_seed=2,
                       output_dir=str(tmp_path / f"out-{checkpointing}-{chunk}-{len(settings)}"), alpha=1.0,
                       member_chunk_size=chunk, gradient_checkpointing=checkpointing, max_steps=2,
                       per_device_train_batch_size=3, learning_rate=1e-2, seed=0, **settings)
    run.trainer.train()
    return [p.detach().clone() for p in run.ensemble.lora_parameters()]


@pytest.mark.parametrize("chunk", [None, 2])
def test_trainer_gradient_checkpointing_flag_trains_the_same_adapters(tmp_path, chunk):
    plain = trained_adapters(tmp_path, False, chunk)
    checkpointed = trained_adapters(tmp_path, True, chunk)
    assert any(p.abs().sum() > 0 for p in plain[1::2])  # lora_B moved away from its zero start
    for expected, got in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_torch_compile_flag_trains_the_same_adapters(tmp_path):
    """``--torch_compile`` through the Trainer (accelerate's dynamo plugin); ``aot_eager`` traces and runs the
    graphs without generating C++ code, so the check stays fast on a CPU.

    The two runs do not do the same arithmetic. Eagerly, transformers drops an all-ones padding mask and calls
    SDPA with ``is_causal=True``; while compiling it cannot read the mask's values, so SDPA gets an explicit mask,
    and that kernel path rounds the key and value gradients differently (a few ulps). AdamW divides by the
    gradient's own running RMS, which turns a relative gradient error e into an update error of about lr * e
    (and more where a gradient entry is a near-cancelling sum). In float32 (e ~ 1e-7, lr = 1e-2) that reaches the
    1e-5 scale of any tolerance tight enough to mean something (measured: 7.9e-6 against a 1.2e-5 tolerance), so
    the test passed or failed by luck. In float64 the runs agree to 3e-15: a 1e-12 tolerance leaves a margin of
    300 over rounding, while a wrong compiled graph would be off by orders of magnitude more.
    """
    plain = trained_adapters(tmp_path, False, None, torch.float64)
    compiled = trained_adapters(tmp_path, False, None, torch.float64, torch_compile=True,
                                torch_compile_backend="aot_eager")
    assert any(p.abs().sum() > 0 for p in plain[1::2])  # lora_B moved away from its zero start
    for expected, got in zip(plain, compiled, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
