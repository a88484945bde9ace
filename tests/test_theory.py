"""Exact population theory (iclgd_synth.theory) against brute force, Monte Carlo and numerical minimisation.

Monte Carlo checks state their tolerance as a number of standard errors of the sampled mean (Z_TOL = 5, a two-sided
false-alarm probability below 1e-6 for a normal mean), with the standard error measured on the sample itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given
from hypothesis import strategies as st

from iclgd_synth import theory
from iclgd_synth.constructions import from_products, gd_params, split_heads
from iclgd_synth.learners import GD
from iclgd_synth.losses import per_task_half_se
from iclgd_synth.metrics import input_second_moment
from iclgd_synth.model import predict
from iclgd_synth.tasks import TASK_PRESETS, TaskBatch, TaskConfig, input_covariance, sample

Z_TOL = 5.0
MC_SIZE = 2**15  # one batch size for every sampled check, so the sampler compiles once per task law
LAWS = ("uniform", "normal", "anisotropic", "laplace", "exponential")

# Raw moments E[z^k], k = 1..4, of one coordinate at unit scale, written down independently of the cumulant table the
# module uses (uniform on (-a, a): a^k / (k + 1) for even k).
RAW_MOMENTS = {"normal": (0.0, 1.0, 0.0, 3.0), "anisotropic": (0.0, 1.0, 0.0, 3.0), "laplace": (0.0, 2.0, 0.0, 24.0),
               "exponential": (1.0, 2.0, 6.0, 24.0)}


def _task(law: str, d: int, n: int, **kw) -> TaskConfig:
    if law == "anisotropic":
        kw.setdefault("condition_number", 8.0)
    return TaskConfig(dim=d, n_context=n, x_dist=law, **kw)


def _raw_moments(task: TaskConfig) -> tuple[float, ...]:
    if task.x_dist == "uniform":
        a = task.x_range
        return (0.0, a**2 / 3, 0.0, a**4 / 5)
    return RAW_MOMENTS[task.x_dist]


def _brute_force_moments(task: TaskConfig, mixing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[x x^T] and the tensor E[x_a x_b x_j x_k] from raw moments of z: for independent coordinates the moment of a
    product is the product over distinct indices of the raw moment of that index's multiplicity."""
    d, m = task.dim, _raw_moments(task)
    t4 = np.zeros((d,) * 4)
    for idx in itertools.product(range(d), repeat=4):
        t4[idx] = math.prod(m[idx.count(i) - 1] for i in set(idx))
    t2 = np.where(np.eye(d, dtype=bool), m[1], m[0] ** 2)
    lm = mixing
    return lm @ t2 @ lm.T, np.einsum("pa,qb,rj,sk,abjk->pqrs", lm, lm, lm, lm, t4)


@given(law=st.sampled_from(LAWS), d=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_fourth_moment_map_equals_brute_force_moment_tensor(x64, law, d, seed):
    rng = np.random.default_rng(seed)
    kw = {"x_scale": float(rng.uniform(0.3, 2.0))}
    if law == "uniform":
        kw["x_range"] = float(rng.uniform(0.2, 1.5))
    if law == "anisotropic":
        kw["cov_seed"] = int(rng.integers(0, 100))
    task = _task(law, d, 4, **kw)
    mom = theory.input_moments(task)
    s_ref, t4 = _brute_force_moments(task, mom.mixing)
    a = rng.standard_normal((d, d))
    a = a + a.T
    np.testing.assert_allclose(mom.second_moment(), s_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mom.fourth_moment_map(a), np.einsum("ab,abjk->jk", a, t4), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("law", LAWS)
def test_second_moment_matches_package_covariance_and_mean(x64, law):
    task = _task(law, 3, 4, x_scale=0.7)
    s = theory.input_moments(task).second_moment()
    mean = np.full(3, 0.7 if law == "exponential" else 0.0)  # Exp(1) has mean 1
    cov = np.asarray(input_covariance(task), np.float64) * 0.7**2
    np.testing.assert_allclose(s, cov + np.outer(mean, mean), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.trace(s) / 3, input_second_moment(task), rtol=1e-12)


def _mc_half_se(task: TaskConfig, predict_fn, n_tasks: int, seed: int) -> tuple[float, float]:
    batch = sample(jax.random.PRNGKey(seed), task, n_tasks)
    per_task = np.asarray(per_task_half_se(predict_fn(batch), batch.y_query), np.float64)
    return float(per_task.mean()), float(per_task.std(ddof=1) / np.sqrt(n_tasks))


MC_TASKS = [
    TaskConfig(dim=3, n_context=4, x_range=0.7, w_scale=1.3, noise=0.4),
    TaskConfig(dim=3, n_context=4, x_dist="anisotropic", condition_number=20.0, noise=0.2, out_dim=2),
    TaskConfig(dim=3, n_context=4, x_dist="laplace", x_scale=0.5, pool_size=3),
    TaskConfig(dim=3, n_context=4, x_dist="exponential", noise=0.3, x_scale=0.5),
    TaskConfig(dim=3, n_context=4, x_dist="normal", label_corruption=0.3, noise=0.5),
]


@pytest.mark.parametrize("task", MC_TASKS, ids=lambda t: t.x_dist)
def test_preconditioned_loss_matches_monte_carlo(x64, task):
    """At G* and at a perturbed G; for the non-Gaussian laws with fresh tasks the same sample also rejects the
    Gaussian-moment approximation (fourth cumulant and skewness dropped): the tolerance is tight enough to see them."""
    rng = np.random.default_rng(0)
    g_star = theory.optimal_preconditioner(task)
    for g in (g_star, g_star + 0.3 * np.linalg.norm(g_star) / 3 * rng.standard_normal((3, 3))):
        mc, se = _mc_half_se(task, lambda b: theory.preconditioned_predict(b, g), MC_SIZE, seed=1)
        exact = theory.preconditioned_loss(g, task)
        assert abs(mc - exact) < Z_TOL * se, (mc, exact, se)
    if task.x_dist in ("uniform", "laplace", "exponential"):
        mom = theory.input_moments(task)
        gaussian_like = dataclasses.replace(mom, cumulants=(mom.cumulants[0], mom.cumulants[1], 0.0, 0.0))
        terms = theory.preconditioned_loss_terms(task)
        q_wrong = terms.q + (gaussian_like.fourth_moment_map(np.eye(3) * task.w_scale**2)
                             - mom.fourth_moment_map(np.eye(3) * task.w_scale**2)) / task.n_context
        if task.pool_size is None:  # the fresh-task W2 is tau^2 I
            wrong = dataclasses.replace(terms, q=q_wrong).half_mse(g)
            assert abs(mc - wrong) > Z_TOL * se, (mc, wrong, se)


def _numpy_batch(d: int, n: int, seed: int, b: int = 16) -> TaskBatch:
    """Arbitrary float64 tasks drawn with NumPy (implementation checks need no particular law, and no compilation)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n + 1, d))
    y = rng.standard_normal((b, n + 1))
    return TaskBatch.create(x=x[:, :n], y=y[:, :n], x_query=x[:, n], y_query=y[:, n])


@given(dn=st.sampled_from([(2, 3), (4, 2)]), eta=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1))
def test_identity_preconditioner_equals_one_gd_step_and_lsa(x64, dn, eta, seed):
    d, n = dn
    batch = _numpy_batch(d, n, seed)
    np.testing.assert_allclose(theory.preconditioned_predict(batch, eta * np.eye(d)), GD(eta=eta, steps=1)(batch),
                               rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(seed).standard_normal((d, d))
    want = theory.preconditioned_predict(batch, g)
    for n_ctx in (n, None):  # 1/N in P, or inside the layer
        params = theory.preconditioner_params(g, n_context=n_ctx)
        np.testing.assert_allclose(predict(params, batch), want, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(theory.effective_preconditioner(params, n), g, rtol=1e-12, atol=1e-12)
    hand = split_heads(gd_params(d, eta, n_context=n), 2)  # two heads summing to the GD step
    np.testing.assert_allclose(theory.effective_preconditioner(hand, n), eta * np.eye(d), rtol=1e-12, atol=1e-12)


def test_effective_preconditioner_of_a_random_layer_reproduces_its_prediction(x64):
    """A dense random layer has other terms too; with the y-row of W_K^T W_Q and the x-part of P W_V's y-row zeroed
    (the blocks outside the family), the model's prediction is exactly x_q^T G h with the extracted G."""
    d, rng = 3, np.random.default_rng(4)
    kq, pv = rng.standard_normal((d + 1, d + 1)), rng.standard_normal((d + 1, d + 1))
    kq[d, :d], pv[d, :d] = 0.0, 0.0
    params = from_products(kq, pv)
    batch = _numpy_batch(d, 5, 0)
    g = theory.effective_preconditioner(params, 5)
    np.testing.assert_allclose(predict(params, batch), theory.preconditioned_predict(batch, g), rtol=1e-10,
                               atol=1e-12)
    kq[d, :d] = 1.0  # a y_i-times-x_q term outside the family: the prediction no longer equals the family's
    assert np.abs(predict(from_products(kq, pv), batch) - theory.preconditioned_predict(batch, g)).max() > 1e-3


def test_effective_preconditioner_includes_the_rank_one_route_through_the_label_row(x64):
    """With only the label rows of P W_V and W_K^T W_Q (and W_K^T W_Q's x-block zero, P W_V's label entry zero), the
    layer predicts (P W_V[y, x] . sum_i y_i x_i)(W_K^T W_Q[y, x] . x_q): a rank-one preconditioner."""
    d, rng = 3, np.random.default_rng(5)
    kq, pv = np.zeros((d + 1, d + 1)), np.zeros((d + 1, d + 1))
    kq[d, :d], pv[d, :d] = rng.standard_normal(d), rng.standard_normal(d)
    params = from_products(kq, pv)
    batch = _numpy_batch(d, 5, 1)
    g = theory.effective_preconditioner(params, 5)
    np.testing.assert_allclose(g, -5 * np.outer(kq[d, :d], pv[d, :d]), rtol=1e-12)
    np.testing.assert_allclose(predict(params, batch), theory.preconditioned_predict(batch, g), rtol=1e-10,
                               atol=1e-12)


@given(law=st.sampled_from(LAWS), dn=st.sampled_from([(2, 2), (3, 4)]), noise=st.sampled_from([0.0, 0.5]),
       seed=st.integers(0, 100))
def test_optimal_preconditioner_matches_numerical_minimisation(x64, law, dn, noise, seed):
    d, n = dn
    task = _task(law, d, n, noise=noise, w_scale=1.5, **({"cov_seed": seed} if law == "anisotropic" else {}))
    terms = theory.preconditioned_loss_terms(task)
    res = scipy.optimize.minimize(lambda v: terms.half_mse(v.reshape(d, d)), np.zeros(d * d), method="BFGS",
                                  options={"gtol": 1e-11, "maxiter": 2000})
    g_star = theory.optimal_preconditioner(task)
    best = theory.optimal_preconditioner_loss(task)
    assert best <= res.fun + 1e-12 * max(1.0, abs(res.fun))
    assert abs(best - res.fun) < 1e-9 * max(1.0, abs(best))
    np.testing.assert_allclose(res.x.reshape(d, d), g_star, rtol=1e-4, atol=1e-4 * np.abs(g_star).max())
    eta, eta_loss = terms.best_scalar()  # the best eta I is no better than G*, and equal to it for isotropic laws
    assert eta_loss >= best - 1e-12
    if law in ("uniform", "normal", "laplace"):
        np.testing.assert_allclose(g_star, eta * np.eye(d), rtol=1e-10, atol=1e-12)


@given(d=st.sampled_from([2, 4]), n=st.sampled_from([3, 10]), noise=st.sampled_from([0.0, 0.7]),
       w_scale=st.sampled_from([0.5, 2.0]), seed=st.integers(0, 100))
def test_gaussian_optimal_preconditioner_equals_papers_closed_form(x64, d, n, noise, w_scale, seed):
    task = _task("anisotropic", d, n, noise=noise, w_scale=w_scale, cov_seed=seed, condition_number=30.0)
    cov = np.asarray(input_covariance(task), np.float64)
    np.testing.assert_allclose(theory.optimal_preconditioner(task),
                               theory.gaussian_optimal_preconditioner(cov, n, noise, w_scale), rtol=1e-9, atol=1e-12)


def test_vonoswald_optimum_exact_values(x64):
    """U(-a, a), d = N = 10, noiseless: v = a^2/3, m4 = a^4/5, E[S_N^2] = 0.22 a^4 I, so eta* = 50 / (33 a^2) and the
    half-MSE is 245 a^2 / 297 (a = 0.5: 200/33 and 245/1188)."""
    task = TASK_PRESETS["vonoswald"]
    assert theory.optimal_eta(task) == pytest.approx(200 / 33, rel=1e-13)
    assert theory.optimal_gd_loss(task) == pytest.approx(245 / 1188, rel=1e-13)
    np.testing.assert_allclose(theory.optimal_preconditioner(task), 200 / 33 * np.eye(10), rtol=1e-12, atol=1e-13)
    assert theory.optimal_preconditioner_loss(task) == pytest.approx(245 / 1188, rel=1e-12)
    text = TASK_PRESETS["vonoswald_paper_text"]  # a = 1: eta* / 4, loss * 4
    assert theory.optimal_eta(text) == pytest.approx(50 / 33, rel=1e-13)
    assert theory.optimal_gd_loss(text) == pytest.approx(4 * 245 / 1188, rel=1e-13)


def test_vonoswald_optimum_matches_monte_carlo(x64):
    """The sample's best step size (ratio of means, delta-method standard error) and the sampled loss at eta*."""
    task, n_tasks = TASK_PRESETS["vonoswald"], MC_SIZE
    batch = sample(jax.random.PRNGKey(7), task, n_tasks)
    f = np.asarray(theory.preconditioned_predict(batch, np.eye(10)), np.float64)  # x_q . h
    yq = np.asarray(batch.y_query, np.float64)
    a, b = yq * f, f * f
    eta_hat = a.mean() / b.mean()
    # Delta method for a ratio of means: var(a - eta b) / (n mean(b)^2).
    se_eta = np.std(a - eta_hat * b, ddof=1) / (np.sqrt(n_tasks) * b.mean())
    assert abs(eta_hat - 200 / 33) < Z_TOL * se_eta, (eta_hat, se_eta)
    loss = 0.5 * (200 / 33 * f - yq) ** 2
    assert abs(loss.mean() - 245 / 1188) < Z_TOL * loss.std(ddof=1) / np.sqrt(n_tasks)


@given(n=st.integers(1, 12), d=st.integers(1, 12), j=st.integers(3, 7))
def test_wishart_trace_moments_symmetric_and_exact_in_one_dimension(n, d, j):
    moments = theory.wishart_trace_moments(n, d, j)
    assert moments[1:] == theory.wishart_trace_moments(d, n, j)[1:]  # tr((Z Z^T)^j) = tr((Z^T Z)^j), j >= 1
    assert theory.wishart_trace_moments(n, 1, j)[j] == math.prod(n + 2 * i for i in range(j))  # chi^2_n moments
    assert moments[2] == n * d * (n + d + 1)
    assert moments[3] == n * d * (n * n + d * d + 3 * n * d + 3 * n + 3 * d + 4)


@pytest.mark.parametrize("steps", [2, 3])
def test_k_step_gd_exact_loss_matches_monte_carlo_for_gaussian_inputs(x64, steps):
    task = TaskConfig(dim=3, n_context=4, x_dist="normal", x_scale=0.6, noise=0.3, w_scale=1.2)
    eta_star = theory.optimal_eta(task, steps)
    batch = sample(jax.random.PRNGKey(3), task, MC_SIZE)
    yq = np.asarray(batch.y_query)
    for eta in (0.5 * eta_star, eta_star, 1.4 * eta_star):
        per_task = 0.5 * (np.asarray(GD(eta=eta, steps=steps)(batch)) - yq) ** 2
        exact = float(theory.gd_population_loss(task, eta, steps))
        assert abs(per_task.mean() - exact) < Z_TOL * per_task.std(ddof=1) / np.sqrt(per_task.size)
    # The estimator integrates everything but the context inputs in closed form: unbiased, smaller error.
    est = theory.estimate_gd_loss(task, steps, n_tasks=MC_SIZE, chunk=MC_SIZE, seed=5)
    for eta in (0.5 * eta_star, eta_star):
        assert abs(est.loss(eta) - theory.gd_population_loss(task, eta, steps)) < Z_TOL * est.standard_error(eta)
    eta_est, loss_est, se = est.minimize()
    assert abs(loss_est - theory.optimal_gd_loss(task, steps)) < Z_TOL * se


def test_one_step_polynomial_agrees_between_wishart_and_fourth_moment_routes(x64):
    """For Gaussian inputs, K = 1 through the general quadratic equals the Wishart formula used for K >= 2."""
    task = TaskConfig(dim=5, n_context=3, x_dist="normal", x_scale=0.8, noise=0.4, out_dim=2)
    general = theory.gd_loss_polynomial(task, 1)
    n, d, v = 3, 5, 0.64
    mu1, mu2 = d * v, v**2 / n * d * (n + d + 1)  # E tr S_N, E tr S_N^2
    noise2 = 2 * 0.16
    wishart = 0.5 * np.array([2 * d * v + noise2, -2 * 2 * v * mu1, 2 * v * mu2 + noise2 / n * v * mu1])
    np.testing.assert_allclose(general, wishart, rtol=1e-12)


def test_gd_loss_estimate_matches_sampled_losses_for_uniform_inputs(x64):
    """No closed form for K >= 2 with uniform inputs: the estimator against plain sampled losses (independent draws)."""
    task = MC_TASKS[0]  # uniform; the sampler compiled for the test above serves this one too
    est = theory.estimate_gd_loss(task, 2, n_tasks=MC_SIZE, chunk=MC_SIZE, seed=11)
    eta = est.minimize()[0]
    mc, se = _mc_half_se(task, lambda b: GD(eta=eta, steps=2)(b), MC_SIZE, seed=12)
    assert abs(est.loss(eta) - mc) < Z_TOL * np.hypot(est.standard_error(eta), se)
    one = theory.estimate_gd_loss(task, 1, n_tasks=MC_SIZE, chunk=MC_SIZE, seed=11)  # K = 1: the exact quadratic
    eta1 = theory.optimal_eta(task)
    assert abs(one.loss(eta1) - theory.optimal_gd_loss(task)) < Z_TOL * one.standard_error(eta1)


def test_reference_multi_step_numbers_for_the_vonoswald_preset(x64):
    """REFERENCE section 4 reports 2-step GD 0.157 at eta ~ 6 (Monte Carlo on 2e4 tasks): the estimator agrees."""
    est = theory.estimate_gd_loss(TASK_PRESETS["vonoswald"], 2, n_tasks=MC_SIZE, chunk=MC_SIZE, seed=0)
    eta, loss, se = est.minimize()
    assert abs(loss - 0.157) < 0.0015 + Z_TOL * se  # the reference's own rounding plus its sampling error
    assert 5.7 < eta < 6.3


def test_bad_inputs_raise_clear_errors(x64):
    task = TASK_PRESETS["vonoswald"]
    with pytest.raises(ValueError, match=r"g must have shape \(d, d\)"):
        theory.preconditioned_loss(np.eye(3), task)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        theory.gd_loss_polynomial(task, 0)
    with pytest.raises(ValueError, match="estimate_gd_loss"):
        theory.optimal_eta(task, 2)
    with pytest.raises(TypeError, match="task must be an iclgd_synth.TaskConfig"):
        theory.optimal_preconditioner({"dim": 10})
    with pytest.raises(ValueError, match="label_corruption = 0"):
        theory.estimate_gd_loss(task.replace(label_corruption=0.1), 2, n_tasks=10)
    with pytest.raises(ValueError, match=r"w_scale must be in \(0.0, inf\]"):
        theory.gaussian_optimal_preconditioner(np.eye(2), 3, w_scale=0.0)
    with pytest.raises(ValueError, match="even degree"):
        theory.minimize_polynomial([1.0, -1.0])
    with pytest.raises(ValueError, match="one linear-attention layer"):
        theory.effective_preconditioner(gd_params(3, 1.0, 2, n_context=4), 4)
    with pytest.raises(ValueError, match="g must be finite"):
        theory.preconditioned_loss(np.full((10, 10), np.nan), task)
