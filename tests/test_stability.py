"""Critical alpha: matrix-free products against dense oracles, eigenvalues against scipy, and the toy's behaviour."""

from __future__ import annotations

import math
from functools import partial

import pytest
import scipy.linalg
import torch
from conftest import load_example
from torch.func import functional_call

from renyi_lora.stability.curvature import (
    OutputLoglik,
    fisher_vector_product,
    gauss_newton_vector_product,
    hessian_vector_product,
)
from renyi_lora.stability.lanczos import NotAMinimumError, critical_alpha

toy = load_example("toy_critical_alpha")

DTYPE = torch.float64
NUM_FEATURES, NUM_EXAMPLES = 8, 90


# --- a small misspecified logistic regression (nn.Linear through functional_call), fitted by Newton's method ---


def _logistic_loglik(model: torch.nn.Module, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
    features, labels = batch
    logits = functional_call(model, params, (features,)).squeeze(-1)  # [N]
    return -torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def _flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in params.values()])


def _unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    chunks = vector.split([value.numel() for value in like.values()])
    return {name: chunk.view(value.shape) for (name, value), chunk in zip(like.items(), chunks, strict=True)}


def _dense(loglik_fn, params, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: V [P, P] by autograd's hessian, J [P, P] from the per-example jacobian [N, P]."""

    def loglik_flat(vector):
        return loglik_fn(_unflatten(vector, params), batch)

    theta = _flatten(params)
    hessian = -torch.autograd.functional.hessian(lambda vector: loglik_flat(vector).mean(), theta)
    scores = torch.autograd.functional.jacobian(loglik_flat, theta)  # [N, P]
    return hessian, scores.T @ scores / scores.shape[0]


@pytest.fixture(scope="module")
def logistic():
    """(loglik_fn, fitted params, uneven batches, the whole data as one batch, dense V, dense J)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(NUM_EXAMPLES, NUM_FEATURES, generator=generator, dtype=DTYPE)
    # Labels depend on an interaction the linear model cannot represent: misspecified, so J != V.
    noise = 0.5 * torch.randn(NUM_EXAMPLES, generator=generator, dtype=DTYPE)
    labels = (features[:, 0] * features[:, 1] + features[:, 2] + noise > 0).to(DTYPE)
    model = torch.nn.Linear(NUM_FEATURES, 1).to(DTYPE)
    loglik_fn = partial(_logistic_loglik, model)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    whole = (features, labels)
    for _ in range(30):  # Newton's method to the maximum-likelihood point
        hessian, _ = _dense(loglik_fn, params, whole)
        theta = _flatten(params).requires_grad_()
        (gradient,) = torch.autograd.grad(-loglik_fn(_unflatten(theta, params), whole).mean(), theta)
        params = _unflatten(_flatten(params) - torch.linalg.solve(hessian, gradient), params)
    assert gradient.abs().max() < 1e-10
    batches = [(features[a:b], labels[a:b]) for a, b in [(0, 13), (13, 50), (50, NUM_EXAMPLES)]]
    hessian, fisher = _dense(loglik_fn, params, whole)
    return loglik_fn, params, batches, hessian, fisher


def test_products_equal_dense_matrices(logistic):
    loglik_fn, params, batches, hessian, fisher = logistic
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        vector = _unflatten(torch.randn(len(hessian), generator=generator, dtype=DTYPE), params)
        expected_v, expected_j = hessian @ _flatten(vector), fisher @ _flatten(vector)
        got_v = _flatten(hessian_vector_product(loglik_fn, params, batches, vector))
        got_j = _flatten(fisher_vector_product(loglik_fn, params, batches, vector))
        torch.testing.assert_close(got_v, expected_v, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got_j, expected_j, rtol=1e-8, atol=1e-10)


def test_eigenvalues_equal_scipy_generalised_eigh(logistic):
    loglik_fn, params, batches, hessian, fisher = logistic
    expected = scipy.linalg.eigh(fisher.numpy(), hessian.numpy(), eigvals_only=True)[::-1]
    assert expected[0] > 1.05 * expected[1]  # a clear top eigenvalue: the comparison is not vacuous

    result = critical_alpha(loglik_fn, params, batches, num_eigenvalues=3, damping=0.0, tol=1e-9)
    assert result.converged and result.iterations < len(hessian) + 1
    assert result.eigenvalues == pytest.approx(expected[:3].tolist(), rel=1e-4)
    assert result.alpha_star == pytest.approx(1 / expected[0], rel=1e-4)
    # The returned direction is the top eigenvector: J x = lambda V x.
    direction = _flatten(result.direction)
    torch.testing.assert_close(fisher @ direction, expected[0] * hessian @ direction, rtol=1e-5, atol=1e-8)
    assert f"{result.alpha_star:.3g}" in str(result) and "separate" in str(result)

    # The default relative damping lowers lambda_max by about `damping`, no more.
    damped = critical_alpha(loglik_fn, params, iter(batches))  # a one-shot iterator is accepted too
    assert damped.eigenvalues[0] == pytest.approx(expected[0], rel=5 * damped.damping)
    assert damped.eigenvalues[0] <= expected[0]


def test_not_converged_warns(logistic):
    loglik_fn, params, batches, _, _ = logistic
    with pytest.warns(UserWarning, match="did not converge"):
        result = critical_alpha(loglik_fn, params, batches, max_iter=2, tol=1e-12)
    assert not result.converged and result.iterations == 2 and "not converged" in result.summary()


def test_loglik_must_be_per_example(logistic):
    _, params, batches, _, _ = logistic
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        critical_alpha(lambda p, batch: p["weight"].sum(), params, batches)


# --- the misspecified Gaussian toy (examples/toy_critical_alpha.py) ---


@pytest.mark.parametrize(("m", "s"), [(0.5, 1.0), (1.0, 1.0), (2.0, 1.0), (1.0, 0.5), (3.0, 2.0)])
def test_toy_recovers_analytic_alpha_star(m, s):
    # The moment-matched sample has exactly mean 0 and mean(y^2) = 1 + m^2: no sampling noise.
    result = toy.toy_critical_alpha(toy.sample_toy(m, 400, seed=3), s)
    assert result.converged
    assert result.alpha_star == pytest.approx(s**2 / (1 + m**2), rel=0.02)


@pytest.mark.parametrize(("m", "s"), [(2.0, 1.0), (1.0, 1.0)])
def test_members_stay_together_below_and_separate_above(m, s):
    y = toy.sample_toy(m, 400, seed=4)
    alpha_star = toy.toy_critical_alpha(y, s).alpha_star
    together = toy.train_members(y, s, 0.5 * alpha_star)
    apart = toy.train_members(y, s, 2.0 * alpha_star)
    assert (together[0] - together[1]).abs() < 1e-4  # started at 2e-3 apart: the split decays
    assert (apart[0] - apart[1]).abs() > m  # grows from 2e-3 to a separation comparable to the bumps'


# --- The flat boundary (docs/specialisation.md): well specified gives alpha* = 1 ---


@pytest.mark.parametrize("positive_fraction", [0.5, 0.25])
def test_well_specified_categorical_gives_alpha_star_one(positive_fraction):
    counts = [4, 8, 12, 20]  # examples per prompt, uneven
    prompts = torch.cat([torch.full((count,), index) for index, count in enumerate(counts)])
    labels = torch.cat([(torch.arange(count) < positive_fraction * count).to(DTYPE) for count in counts])

    def loglik_fn(params, batch):
        prompt, label = batch
        return -torch.nn.functional.binary_cross_entropy_with_logits(params["logits"][prompt], label, reduction="none")

    # One free logit per prompt, fitted in closed form: the empirical log-odds (0 for 50/50 labels).
    fitted = {"logits": torch.full((len(counts),), math.log(positive_fraction / (1 - positive_fraction)), dtype=DTYPE)}
    batches = [(prompts[:15], labels[:15]), (prompts[15:], labels[15:])]
    assert critical_alpha(loglik_fn, fitted, batches).alpha_star == pytest.approx(1.0, rel=0.05)
    assert toy.toy_critical_alpha(toy.sample_toy(1.0, 400), 1.0).alpha_star < 1  # misspecified


# --- theta that is not a minimum of the NLL ---


def test_negated_toy_raises_not_a_minimum():
    y = toy.sample_toy(1.0, 400)

    def negated(params, batch):
        return -toy.toy_loglik(params, batch, 1.0)

    with pytest.raises(NotAMinimumError, match="theta is not a minimum of the NLL"):
        critical_alpha(negated, {"theta": torch.zeros(1, dtype=DTYPE)}, [y])


def test_saddle_raises_not_a_minimum():
    # Quadratic NLL with curvature (1, 1, 1, 1, -0.3): the random probe sees positive mean curvature, so the
    # negative direction must be found by the conjugate-gradient or Lanczos checks.
    curvature = torch.tensor([1.0, 1.0, 1.0, 1.0, -0.3], dtype=DTYPE)
    targets = torch.randn(50, 5, generator=torch.Generator().manual_seed(5), dtype=DTYPE)

    def loglik_fn(params, batch):
        return -0.5 * ((params["theta"] - batch) ** 2 * curvature).sum(-1)

    with pytest.raises(NotAMinimumError, match="refine or train the single adapter to a minimum first") as error:
        critical_alpha(loglik_fn, {"theta": targets.mean(0)}, [targets])
    assert error.value.curvature < 0 and 1 <= error.value.products <= 6  # the Lanczos check on V, P = 5


def test_negative_curvature_the_solves_never_see_is_found_within_a_few_products():
    # Quadratic NLL with curvature (-0.3, 1, ..., 10) on P = 40 numbers, at the mean of the targets. The targets do
    # not vary along the first coordinate, so every score, and J, is zero there: the solves start from J q and reach
    # that direction only through rounding, late.
    num_params = 40
    curvature = torch.cat([torch.tensor([-0.3]), torch.linspace(1.0, 10.0, num_params - 1)]).to(DTYPE)
    targets = torch.randn(200, num_params, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    targets[:, 0] = 0.0
    calls = 0

    def loglik_fn(params, batch):
        nonlocal calls
        calls += 1
        return -0.5 * ((params["theta"] - batch) ** 2 * curvature).sum(-1)

    theta = {"theta": targets.mean(0)}
    with pytest.raises(NotAMinimumError, match="in the Lanczos basis") as late:
        critical_alpha(loglik_fn, theta, [targets], curvature_check_steps=0)
    assert late.value.products > 40  # measured: 81
    calls = 0
    with pytest.raises(NotAMinimumError, match="Lanczos on V") as error:
        critical_alpha(loglik_fn, theta, [targets])
    # Found by Lanczos on V from the random probe (extreme eigenvalues come first), before any J v or solve. The data
    # go forward once (one loglik_fn call for the single batch); every product is backward passes. Measured: 4.
    assert error.value.products <= 8 and calls == 1
    assert error.value.curvature < -0.1 and error.value.largest > 5


def test_prior_curvature_is_added_to_v_and_not_to_j(logistic):
    # A prior c / 2 ||theta||^2 in the objective adds c I to V; at theta it changes no score, so J is unchanged.
    loglik_fn, params, batches, hessian, fisher = logistic
    added = critical_alpha(loglik_fn, params, batches, damping=0.0, tol=1e-9, prior_curvature=0.3)
    expected = scipy.linalg.eigh(fisher.numpy(), (hessian + 0.3 * torch.eye(len(hessian), dtype=DTYPE)).numpy(),
                                 eigvals_only=True)[::-1]
    assert added.eigenvalues == pytest.approx(expected[:3].tolist(), rel=1e-6)


# --- the Gauss-Newton curvature ---


def test_gauss_newton_is_the_hessian_when_the_outputs_are_linear(logistic):
    # Logistic regression: the logit is linear in theta, so V has no residual term and G = V, at any theta.
    loglik_fn, params, batches, hessian, _ = logistic
    model = loglik_fn.args[0]

    def logits(p, batch):
        return functional_call(model, p, (batch[0],)).squeeze(-1)  # [N]

    def head(z, batch):
        return -torch.nn.functional.binary_cross_entropy_with_logits(z, batch[1], reduction="none")

    split = OutputLoglik(logits, head)
    vector = _unflatten(torch.randn(len(hessian), generator=torch.Generator().manual_seed(2), dtype=DTYPE), params)
    got = _flatten(gauss_newton_vector_product(split, params, batches, vector))
    torch.testing.assert_close(got, hessian @ _flatten(vector), rtol=1e-8, atol=1e-10)
    exact = critical_alpha(loglik_fn, params, batches, damping=0.0, tol=1e-9)
    gauss_newton = critical_alpha(split, params, batches, damping=0.0, tol=1e-9, curvature="gauss-newton")
    assert gauss_newton.eigenvalues == pytest.approx(exact.eigenvalues, rel=1e-6)
    assert gauss_newton.curvature == "gauss-newton" and gauss_newton.lowest_curvature > 0
    with pytest.raises(TypeError, match="OutputLoglik"):
        critical_alpha(loglik_fn, params, batches, curvature="gauss-newton")


def test_gauss_newton_is_positive_semi_definite_where_the_hessian_is_not():
    # A tanh network with a softmax over 5 classes at a random theta (not a minimum): G equals the dense
    # D^T (diag p - p p^T) D (D the Jacobian of the logits), has no negative eigenvalue; V has a clearly negative one.
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(30, 4, generator=generator, dtype=DTYPE)
    labels = torch.randint(0, 5, (30,), generator=generator)
    params = {"hidden": torch.randn(6, 4, generator=generator, dtype=DTYPE),
              "out": torch.randn(5, 6, generator=generator, dtype=DTYPE)}

    def logits(p, batch):
        return torch.tanh(batch[0] @ p["hidden"].T) @ p["out"].T  # [N, 5]

    def head(z, batch):
        return z.log_softmax(-1).gather(-1, batch[1][:, None]).squeeze(-1)  # [N]

    split = OutputLoglik(logits, head)
    batches = [(features[:11], labels[:11]), (features[11:], labels[11:])]
    hessian, _ = _dense(split, params, (features, labels))
    jacobian = torch.autograd.functional.jacobian(
        lambda vector: logits(_unflatten(vector, params), (features, labels)), _flatten(params))  # [N, 5, P]
    probs = logits(params, (features, labels)).softmax(-1)  # [N, 5]
    output_curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # [N, 5, 5]
    dense = torch.einsum("nap,nab,nbq->pq", jacobian, output_curvature, jacobian) / len(features)  # [P, P]
    columns = torch.eye(len(dense), dtype=DTYPE)
    products = torch.stack([_flatten(gauss_newton_vector_product(split, params, batches, _unflatten(column, params)))
                            for column in columns], 1)  # [P, P]
    torch.testing.assert_close(products, dense, rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh(dense)[0] > -1e-10 * torch.linalg.eigvalsh(dense)[-1]
    assert torch.linalg.eigvalsh(hessian)[0] < -0.05 * torch.linalg.eigvalsh(hessian)[-1]  # not vacuous
    with pytest.raises(NotAMinimumError):  # the exact V is refused here, G is not
        critical_alpha(split, params, batches)
    estimate = critical_alpha(split, params, batches, curvature="gauss-newton", num_eigenvalues=1, tol=1e-2,
                              damping=1e-2)
    assert estimate.alpha_star > 0 and estimate.lowest_curvature > 0


# --- the early stop: lambda_max stable over STABLE_STEPS Lanczos steps ---


@pytest.mark.parametrize(("spectrum", "saved", "error"), [("geometric", 3, 1.0), ("dense", 20, 3.0)])
def test_lanczos_stops_once_lambda_max_is_stable(monkeypatch, spectrum, saved, error):
    # Quadratic NLL 0.5 ||theta - y||^2 at theta = 0 over 600 centred examples whose covariance is exactly
    # diag(eigenvalues): V = I, J = diag(eigenvalues), lambda_max = the largest. tol = 1e-3, one eigenvalue.
    num_params, num_examples = 300, 600
    eigenvalues = {"geometric": 0.97 ** torch.arange(num_params, dtype=DTYPE),
                   "dense": torch.linspace(0.5, 1.0, num_params, dtype=DTYPE)}[spectrum]  # 300 within a factor 2
    examples = torch.randn(num_examples, num_params, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    orthonormal, _ = torch.linalg.qr(examples - examples.mean(0))  # centred, orthonormal columns
    targets = orthonormal * math.sqrt(num_examples) * eigenvalues.sqrt()

    def loglik_fn(params, batch):
        return -0.5 * ((params["theta"] - batch) ** 2).sum(-1)

    def estimate():
        return critical_alpha(loglik_fn, {"theta": torch.zeros(num_params, dtype=DTYPE)}, [targets], tol=1e-3,
                              damping=0.0, num_eigenvalues=1, max_iter=100)

    stable = estimate()
    monkeypatch.setattr("renyi_lora.stability.lanczos.STABLE_STEPS", 10**6)  # the Ritz residuals alone
    by_residuals = estimate()
    # Measured: geometric 12 steps (17 by the residuals), lambda_max 7.6e-5 low; dense 19 (49), 2.0e-3 low: where
    # many eigenvalues crowd the top, lambda_max creeps up by less than tol per 3 steps while still tol away.
    assert stable.stopped == "stable" and stable.converged and by_residuals.stopped == "residuals"
    assert by_residuals.iterations - stable.iterations >= saved
    assert stable.eigenvalues[0] == pytest.approx(eigenvalues.max().item(), rel=error * 1e-3)
    assert stable.eigenvalues[0] <= by_residuals.eigenvalues[0] + 1e-12  # Ritz values only rise with the steps
