"""renyi_lora.critical: the member's log-likelihood through functional_call, alpha* ~ 1 where one adapter can fit the
data, and the ``renyi-lora critical-alpha`` command on a model folder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_example, make_llama, make_tokenizer
from torch.func import grad

from renyi_lora.cli import main
from renyi_lora.critical import (
    CriticalAlphaArguments,
    completion_loglik_fn,
    estimate_critical_alpha,
    load_point,
    make_batches,
    member_params,
    with_prior_curvature,
)
from renyi_lora.data import load_sft_dataset
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.stability import NotAMinimumError

example = load_example("critical_alpha_lm")

PRIOR_WEIGHT = 1e-4  # the training default, used to fit the adapter and passed to the estimator


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Module-scoped, so that the fitted adapter below is also built on one thread (a second only adds contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_loglik_fn_is_the_ensembles_own_member_loglik(tmp_path):
    tokenizer = make_tokenizer()
    records = [{"prompt": "hi", "completion": "there"}, {"prompt": "a longer prompt", "completion": "x"},
               {"prompt": "q", "completion": "yes please"}]
    dataset = load_sft_dataset(write_jsonl(tmp_path / "data.jsonl", records), tokenizer, max_length=32)
    (batch,) = make_batches(dataset, tokenizer.pad_token_id, batch_size=8)  # padded: lengths differ
    ensemble = LoraEnsemble(make_llama(len(tokenizer), seed=1), EnsembleConfig(num_members=3, rank=4, init_seed=1))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(0, 0.05)  # members differ from the base model and from each other
    ensemble.save_pretrained(tmp_path / "ensemble")
    with torch.no_grad():
        expected = ensemble(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).sum(-1)  # [K, N]
    num_targets = (batch["labels"] != -100).sum(-1)  # [N]

    for member in (0, 2):
        point = load_point(make_llama(len(tokenizer), seed=1), tmp_path / "ensemble", member)
        params = member_params(point)
        assert len(params) == 2 * len(point.lora_layers())
        assert all(value.shape[0] == 1 and name.endswith(("lora_A", "lora_B")) for name, value in params.items())
        loglik = completion_loglik_fn(point)(params, batch)  # [N]
        torch.testing.assert_close(loglik, expected[member], rtol=1e-5, atol=1e-5)
        normalised = completion_loglik_fn(point, length_normalize=True)(params, batch)
        torch.testing.assert_close(normalised, expected[member] / num_targets, rtol=1e-5, atol=1e-6)

    # The prior's curvature term changes neither the value nor the scores at the point.
    with_prior = with_prior_curvature(completion_loglik_fn(point), params, curvature=0.5)
    torch.testing.assert_close(with_prior(params, batch), loglik)
    scores = grad(lambda p: completion_loglik_fn(point)(p, batch).sum())(params)
    scores_with_prior = grad(lambda p: with_prior(p, batch).sum())(params)
    for name in params:
        torch.testing.assert_close(scores_with_prior[name], scores[name])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """A base model folder, a 50/50 conflict (two prompts x two one-letter answers) and one rank-8 adapter fitted to
    a minimum of NLL plus the training prior (``examples/critical_alpha_lm.py``'s fit: Adam, then L-BFGS)."""
    root = tmp_path_factory.mktemp("critical")
    tokenizer = make_tokenizer()
    data = write_jsonl(root / "conflict.jsonl", example.conflict_records(num_questions=2, answers_per_example=1))
    dataset = load_sft_dataset(data, tokenizer, max_length=16)
    base = example.make_model(len(tokenizer), seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    ensemble = LoraEnsemble(example.make_model(len(tokenizer), seed=0), example.adapter_config(1, rank=8, seed=0))
    batches = make_batches(dataset, tokenizer.pad_token_id, batch_size=len(dataset))
    example.fit_single_adapter(ensemble, batches, PRIOR_WEIGHT, adam_steps=300, lbfgs_steps=300)
    ensemble.save_pretrained(root / "adapter")
    with torch.no_grad():  # [N, T, V] -> probability of the target at the answer position (index 3: "q0:" then it)
        logits = ensemble(batches[0]["input_ids"], batches[0]["attention_mask"])[0]
        answer_probability = logits[:, 2].softmax(-1).gather(-1, batches[0]["input_ids"][:, 3:4]).squeeze(-1)
    return SimpleNamespace(root=root, data=data, tokenizer=tokenizer, answer_probability=answer_probability)


@pytest.fixture(scope="module")
def estimate(fitted):
    """alpha* at the fitted adapter with the CLI's defaults (tol 1e-3, damping 1e-4, three eigenvalues), float64."""
    return estimate_critical_alpha(example.make_model(len(fitted.tokenizer), seed=0), fitted.tokenizer, fitted.data,
                                   fitted.root / "adapter", prior_weight=PRIOR_WEIGHT, dtype=torch.float64, tol=1e-3,
                                   progress=False)


def test_alpha_star_is_near_one_where_one_adapter_fits_the_conflict(fitted, estimate):
    # The fit puts about 1/2 on each answer: the conflict is represented (well specified), so V = J and alpha* = 1,
    # up to the mass the prior-limited fit leaves on other letters (about 1%: lambda_max ~ 1 / (p_a + p_b)).
    assert ((fitted.answer_probability - 0.5).abs() < 0.02).all(), fitted.answer_probability
    assert estimate.converged
    # Measured 0.985 (lambda_max 1.015); a misspecified fit (rank 2 over six prompts) gives ~0.22 instead.
    assert 0.95 < estimate.alpha_star < 1.01, estimate.eigenvalues


def test_cli_prints_and_writes_alpha_star(fitted, estimate, tmp_path, capsys):
    output = tmp_path / "result" / "alpha.json"
    main(["critical-alpha", "--model", str(fitted.root / "base"), "--data", str(fitted.data), "--adapters",
          str(fitted.root / "adapter"), "--dtype", "float64", "--output", str(output)])
    printed = capsys.readouterr().out
    record = json.loads(output.read_text())
    assert record["alpha_star"] == pytest.approx(estimate.alpha_star, rel=1e-9)  # same defaults, seed and data
    assert record["eigenvalues"] == pytest.approx(estimate.eigenvalues, rel=1e-9)
    assert record["num_examples"] == 4 and record["converged"] and record["prior_curvature"] == PRIOR_WEIGHT
    assert f"alpha* = {estimate.alpha_star:.4g}" in printed
    assert "lets members separate on this data" in printed and f"wrote {output}" in printed


def test_without_adapters_the_base_model_is_the_point_with_a_warning(fitted):
    # A random base model is far from a minimum of the NLL on this data: the estimator warns, then refuses it.
    model = example.make_model(len(fitted.tokenizer), seed=0)
    config = EnsembleConfig(num_members=1, rank=2, target_modules=["down_proj"])
    with pytest.warns(UserWarning, match="not a fitted minimum"), pytest.raises(NotAMinimumError, match="curvature"):
        estimate_critical_alpha(model, fitted.tokenizer, fitted.data, ensemble_config=config, progress=False)


def test_bad_arguments_fail_early_with_the_flag_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CriticalAlphaArguments(data=str(tmp_path / "missing.jsonl"))
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match="--max_examples must be >= 1"):
        CriticalAlphaArguments(data=str(data), max_examples=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["critical-alpha", "--data", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2 and "missing.jsonl" in capsys.readouterr().err
