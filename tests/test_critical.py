"""renyi_lora.stability.critical: the member's log-likelihood through functional_call, alpha* ~ 1 where one adapter can
fit the data, the ``renyi-lora critical-alpha`` command on a model folder, the refinement it runs first, and the
Gauss-Newton curvature against the exact one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import conflict_scenario, load_example, make_llama, make_tokenizer
from torch.func import functional_call

from renyi_lora.cli import main
from renyi_lora.commands.critical_alpha import CriticalAlphaArguments
from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.stability.critical import (
    completion_loglik_fn,
    estimate_critical_alpha,
    load_point,
    make_batches,
    member_params,
)
from renyi_lora.stability.curvature import Linearization, OutputLoglik
from renyi_lora.stability.lanczos import NotAMinimumError
from renyi_lora.stability.refine import refine_point

example = load_example("critical_alpha_lm")

PRIOR_WEIGHT = 1e-4  # the training default, used to fit the adapter and passed to the estimator


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
        loglik_fn = completion_loglik_fn(point)
        loglik = loglik_fn(params, batch)  # [N]
        torch.testing.assert_close(loglik, expected[member], rtol=1e-5, atol=1e-5)
        normalised = completion_loglik_fn(point, length_normalize=True)(params, batch)
        torch.testing.assert_close(normalised, expected[member] / num_targets, rtol=1e-5, atol=1e-6)
        # Split at the logits for the Gauss-Newton curvature: the head of the logits is the same log-likelihood.
        assert isinstance(loglik_fn, OutputLoglik)
        logits = loglik_fn.outputs(params, batch)  # [M, V]: the positions that predict a target token
        assert logits.shape == ((batch["labels"] != -100).sum(), len(tokenizer))
        torch.testing.assert_close(loglik_fn.head(logits, batch), loglik)


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


def test_gauss_newton_alpha_star_is_close_to_the_exact_one_at_a_minimum(fitted, estimate):
    # At the fitted adapter the residual term that G leaves out averages over the two answers of each prompt.
    gauss_newton = estimate_critical_alpha(example.make_model(len(fitted.tokenizer), seed=0), fitted.tokenizer,
                                           fitted.data, fitted.root / "adapter", prior_weight=PRIOR_WEIGHT,
                                           dtype=torch.float64, tol=1e-3, progress=False, curvature="gauss-newton")
    assert gauss_newton.converged and gauss_newton.curvature == "gauss-newton"
    # Measured: exact 0.98566, Gauss-Newton 0.98438 (relative 1.3e-3; 9e-4 for rank 8 over six prompts). 1e-2 is
    # eight times that, and still tells a misspecified fit apart (rank 2 over six prompts: 0.632 and 0.563, 11 %).
    assert gauss_newton.alpha_star == pytest.approx(estimate.alpha_star, rel=1e-2)


def test_refine_point_reaches_the_minimum_of_nll_plus_prior():
    # NLL_i = |theta - y_i|^2 / 2 plus c / 2 |theta|^2: the minimum is mean(y) / (1 + c), the gradient norm at the
    # start is |(1 + c) theta_0 - mean(y)|.
    targets = torch.randn(20, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loglik_fn(params, batch):
        return -0.5 * ((params["theta"] - batch) ** 2).sum(-1)  # [N]

    start = {"theta": torch.zeros(7, dtype=torch.float64)}
    batches = [targets[:6], targets[6:]]
    result = refine_point(loglik_fn, start, batches, prior_curvature=0.5, tolerance=1e-10)
    torch.testing.assert_close(result.params["theta"], targets.mean(0) / 1.5, rtol=0, atol=1e-9)
    assert result.converged and result.stopped == "tolerance" and result.gradient_norm <= 1e-10
    assert result.gradient_norm_before == pytest.approx(targets.mean(0).norm().item(), rel=1e-12)
    assert result.objective < result.objective_before and not start["theta"].any()  # the start is not modified
    assert "gradient norm" in result.summary() and result.iterations <= result.evaluations
    unrefined = refine_point(loglik_fn, start, batches, prior_curvature=0.5, max_steps=0)
    assert unrefined.stopped == "max_steps" and unrefined.iterations == 0 and not unrefined.converged
    assert torch.equal(unrefined.params["theta"], start["theta"])


@pytest.fixture(scope="module")
def sft_adapter(fitted) -> Path:
    """The user's scenario of issue #13: ``renyi-lora sft`` with K = 1, 100 Adam steps at 3e-3, on the conflict (one
    rank-8 adapter on down_proj, as in the fit above), saved as it stands: short of a minimum."""
    output = fitted.root / "sft"
    main(["sft", "--model", str(fitted.root / "base"), "--data", str(fitted.data), "--num_members", "1", "--rank", "8",
          "--target_modules", "down_proj", "--max_steps", "100", "--learning_rate", "3e-3", "--output_dir",
          str(output), "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"])
    return output


def test_an_sft_adapter_short_of_a_minimum_is_refused_within_a_few_products(fitted, sft_adapter):
    model = example.make_model(len(fitted.tokenizer), seed=0)
    with pytest.raises(NotAMinimumError, match="--refine false") as error:
        estimate_critical_alpha(model, fitted.tokenizer, fitted.data, sft_adapter, refine=False, curvature="exact",
                                progress=False)
    # Found by the Lanczos check on V (one probe, then at most 20 steps), before any conjugate-gradient solve.
    print(f"refused after {error.value.products} products: curvature {error.value.curvature:.3g}, largest "
          f"{error.value.largest:.3g}")
    assert error.value.curvature < 0 and error.value.products <= 21


def test_auto_curvature_falls_back_to_gauss_newton_in_one_logged_line(fitted, sft_adapter, caplog):
    # The same adapter with the default curvature: the exact check finds the negative curvature, one line says so,
    # and the Gauss-Newton estimate is the one that would have been asked for with curvature="gauss-newton".
    def estimate(curvature: str):
        model = example.make_model(len(fitted.tokenizer), seed=0)
        return estimate_critical_alpha(model, fitted.tokenizer, fitted.data, sft_adapter, refine=False, tol=1e-3,
                                       curvature=curvature, progress=False)

    with caplog.at_level("WARNING", logger="renyi_lora.stability.critical"):
        fallen_back = estimate("auto")
    lines = [record.getMessage() for record in caplog.records if record.name == "renyi_lora.stability.critical"]
    assert len(lines) == 1 and lines[0] == fallen_back.fallback
    assert lines[0].startswith("V has curvature -") and "using the Gauss-Newton curvature instead" in lines[0]
    asked = estimate("gauss-newton")
    assert fallen_back.curvature == "gauss-newton" and asked.fallback is None
    assert fallen_back.alpha_star == pytest.approx(asked.alpha_star, rel=1e-9) and fallen_back.converged


def test_critical_alpha_refines_the_sft_adapter_by_default(fitted, sft_adapter, tmp_path, capsys):
    output, refined = tmp_path / "alpha.json", tmp_path / "refined"
    main(["critical-alpha", "--model", str(fitted.root / "base"), "--data", str(fitted.data), "--adapters",
          str(sft_adapter), "--output", str(output), "--refined_output", str(refined)])
    printed = capsys.readouterr().out
    record = json.loads(output.read_text())
    refinement = record["refinement"]
    print(record)
    assert "refined by full-batch L-BFGS: gradient norm" in printed and "alpha* = " in printed
    # The conflict is represented (well specified): alpha* ~ 1, as at the fit above.
    assert 0.95 < record["alpha_star"] < 1.01 and record["converged"]
    # L-BFGS runs until the float32 objective stops improving (the default tolerance, 1e-5, is below its resolution).
    assert refinement["stopped"] in ("tolerance", "stalled") and refinement["iterations"] > 0
    assert refinement["gradient_norm"] < refinement["gradient_norm_before"] / 2
    assert refinement["objective"] < refinement["objective_before"]
    assert record["lowest_curvature"] > 0  # the Lanczos check found no negative curvature
    # The saved refined adapter is that point: taken as it is (with the CLI's tol), it gives the same alpha*.
    again = estimate_critical_alpha(example.make_model(len(fitted.tokenizer), seed=0), fitted.tokenizer, fitted.data,
                                    refined, refine=False, tol=1e-3, progress=False)
    assert again.alpha_star == pytest.approx(record["alpha_star"], rel=1e-9) and again.refinement is None


def test_bad_arguments_fail_early_with_the_flag_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CriticalAlphaArguments(data=str(tmp_path / "missing.jsonl"))
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match="--max_examples must be >= 1"):
        CriticalAlphaArguments(data=str(data), max_examples=0)
    with pytest.raises(ValueError, match="--refine_tolerance > 0"):
        CriticalAlphaArguments(data=str(data), refine_tolerance=0)
    with pytest.raises(ValueError, match="--curvature must be"):
        CriticalAlphaArguments(data=str(data), curvature="fisher")
    with pytest.raises(SystemExit) as exit_info:
        main(["critical-alpha", "--data", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2 and "missing.jsonl" in capsys.readouterr().err


def test_products_through_a_tiny_llama_equal_the_explicit_jacobian_oracles(tmp_path):
    # One rank-2 adapter on one layer's down_proj of a width-8 Llama in float64 (P = 48), at a random point (B != 0).
    # The oracles are dense and built apart from curvature.Linearization and the outputs of completion_loglik_fn: the
    # Jacobian of the ensemble's own logits D [N, T, V, P] and of the log-likelihoods S [N, P] column by column by
    # forward mode, then
    #   G = mean_i sum_t D_it^T (diag p_it - p_it p_it^T) D_it over target tokens t, J = S^T S / N,
    # and V by autograd's Hessian of the mean NLL.
    tokenizer = make_tokenizer()
    records = [{"prompt": "q0:", "completion": "ab"}, {"prompt": "q1,q2:", "completion": "c"},
               {"prompt": "q2:", "completion": "d."}]
    dataset = load_sft_dataset(write_jsonl(tmp_path / "data.jsonl", records), tokenizer, max_length=16)
    batches = make_batches(dataset, tokenizer.pad_token_id, batch_size=2)  # two batches of different sizes
    config = EnsembleConfig(num_members=1, rank=2, target_modules=["down_proj"], layers_to_transform=[1], init_seed=0)
    point = load_point(make_llama(len(tokenizer), seed=2, hidden_size=8), ensemble_config=config).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in point.lora_layers().values():
            layer.lora_B.normal_(0, 0.3)
    params = member_params(point)
    loglik_fn = completion_loglik_fn(point)
    names, sizes = list(params), [value.numel() for value in params.values()]
    num_params = sum(sizes)
    assert num_params == 48

    def unflatten(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: chunk.view(params[name].shape) for name, chunk in zip(names, vector.split(sizes), strict=True)}

    def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in names])

    basis = torch.eye(num_params, dtype=torch.float64)
    gauss_newton, fisher, count = torch.zeros(num_params, num_params, dtype=torch.float64), 0, 0
    scores = []
    for batch in batches:
        def logits_fn(p, b=batch):
            return functional_call(point, p, (b["input_ids"], b["attention_mask"]))[0]  # [N, T, V]

        columns = [torch.func.jvp(logits_fn, (params,), (unflatten(e),)) for e in basis]
        logits = columns[0][0]  # [N, T, V]
        jacobian = torch.stack([tangent for _, tangent in columns], -1)  # [N, T, V, P]
        scores.append(torch.stack([torch.func.jvp(lambda p, b=batch: loglik_fn(p, b), (params,), (unflatten(e),))[1]
                                   for e in basis], -1))  # [N, P]
        targets = batch["labels"][:, 1:] != -100  # position t - 1 predicts labels[t]
        probabilities, rows = logits[:, :-1].softmax(-1)[targets], jacobian[:, :-1][targets]  # [M, V], [M, V, P]
        weighted = probabilities[..., None] * rows - probabilities[..., None] * (probabilities[..., None] * rows
                                                                                 ).sum(1, keepdim=True)
        gauss_newton += torch.einsum("mvp,mvq->pq", rows, weighted)
        count += batch["input_ids"].shape[0]
    gauss_newton /= count
    scores = torch.cat(scores)  # [N, P]
    fisher = scores.T @ scores / count

    def mean_nll(vector: torch.Tensor) -> torch.Tensor:
        return -torch.cat([loglik_fn(unflatten(vector), batch) for batch in batches]).mean()

    hessian = torch.autograd.functional.hessian(mean_nll, flatten(params))
    linearization = Linearization(loglik_fn, params, batches)
    for product, oracle in ((linearization.gauss_newton, gauss_newton), (linearization.fisher, fisher),
                            (linearization.hessian, hessian)):
        dense = torch.stack([flatten(product(unflatten(e))) for e in basis], -1)  # [P, P], column by column
        # Hugging Face's Llama runs RMSNorm and the attention softmax in float32 even in float64: float32 rounding.
        # Measured: largest difference 3e-8 (G), 4e-8 (J), 2.6e-7 (V) of the largest entry.
        torch.testing.assert_close(dense, oracle, rtol=1e-6, atol=1e-6 * oracle.abs().max().item())
    # G is positive semi-definite; at this random point V is not, and they differ by the residual term.
    assert torch.linalg.eigvalsh(gauss_newton).min() > -1e-6 * gauss_newton.abs().max()
    assert not torch.allclose(gauss_newton, hessian, rtol=1e-2)


def test_sft_then_critical_alpha_gives_alpha_star_without_a_refusal(tmp_path, capsys, caplog):
    # Issue #21: `renyi-lora sft --num_members 1` for 100 steps on two conflicting groups, then `renyi-lora
    # critical-alpha` with the default flags, returned a refusal ("V has curvature -0.0094 ... use
    # curvature='gauss-newton'"), and Gauss-Newton took 22 s per Lanczos step. --refine_steps 100 stops L-BFGS short
    # of a minimum here as 500 steps did on the data (the timing of the full default run is
    # benchmarks/bench_critical_alpha.py's): the default curvature falls back to Gauss-Newton with one line.
    base, data = conflict_scenario(tmp_path)
    sft, output = tmp_path / "sft", tmp_path / "alpha.json"
    main(["sft", "--model", str(base), "--data", str(data), "--num_members", "1", "--max_steps", "100",
          "--output_dir", str(sft), "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--disable_tqdm",
          "true"])
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="renyi_lora.stability.critical"):
        main(["critical-alpha", "--model", str(base), "--data", str(data), "--adapters", str(sft), "--refine_steps",
              "100", "--output", str(output)])
    printed, record = capsys.readouterr().out, json.loads(output.read_text())
    print(printed, record)
    assert record["refinement"]["stopped"] == "max_steps" and record["refinement"]["iterations"] == 100
    fallbacks = [line.getMessage() for line in caplog.records if "Gauss-Newton curvature instead" in line.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0] == record["fallback"]  # measured: curvature -0.0108 (largest 2.8e3)
    assert record["curvature"] == "gauss-newton" and record["converged"] and 0 < record["alpha_star"] < math.inf
    assert record["stopped"] in ("residuals", "stable", "exhausted")
    assert f"alpha* = {record['alpha_star']:.4g} (Gauss-Newton curvature)" in printed
    assert f"stopped after {record['iterations']} Lanczos steps ({record['curvature_products']} products" in printed


def test_sdpa_attention_is_refused_with_the_eager_hint(tmp_path):
    # The products differentiate the backward pass; torch's CPU SDPA kernel has no double backward.
    tokenizer = make_tokenizer()
    dataset = load_sft_dataset(write_jsonl(tmp_path / "data.jsonl", [{"prompt": "q", "completion": "a"}]), tokenizer,
                               max_length=8)
    model = make_llama(len(tokenizer))
    model.set_attn_implementation("sdpa")
    point = load_point(model, ensemble_config=EnsembleConfig(num_members=1, rank=2, target_modules=["q_proj"]))
    params = member_params(point)
    vector = {name: torch.ones_like(value) for name, value in params.items()}
    with pytest.raises(NotImplementedError, match="attn_implementation='eager'"):
        Linearization(completion_loglik_fn(point), params, make_batches(dataset, 0, 1)).gauss_newton(vector)
