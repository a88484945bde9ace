"""Baselines at every context length (iclgd_synth.learners.prefix): each against its closed form computed prefix by
prefix in float64 NumPy, the last column against the full-context learner, dMMSE's log-sum-exp at M = 2^15, the
per-prefix step-size tuning against the exact 1-step optimum, and clear errors."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import logsumexp

import iclgd_synth as ic
from iclgd_synth.learners.baselines import Averaging, NearestNeighbours, Zero
from iclgd_synth.learners.prefix import (
    PrefixAveraging, PrefixDMMSE, PrefixGD, PrefixLeastSquares, PrefixNearestNeighbours, PrefixRidge, PrefixZero,
    bayes_ridge_lambda, per_position_half_mse, prefix_baselines, prefix_targets, tune_prefix_gd,
)

# Sizes (d, N, d_out) drawn from a small set shared by every test, so each baseline compiles twice in all: fewer
# pairs than dimensions with vector outputs, and more pairs than dimensions with scalar outputs.
SHAPES = st.sampled_from([(2, 5, 1), (4, 3, 2)])
SEEDS = st.integers(0, 2**16)
B = 4


def _batch(seed: int, b: int, n: int, d: int, out_dim: int = 1, noise: float = 0.3, pool=None) -> ic.TaskBatch:
    """x ~ N(0, I), w ~ N(0, I) (or from ``pool``), y = W x + noise, as float64 NumPy arrays."""
    rng = np.random.default_rng(seed)
    x, xq = rng.normal(size=(b, n, d)), rng.normal(size=(b, d))
    w = rng.normal(size=(b, out_dim, d)) if pool is None else pool[rng.integers(0, len(pool), b)]
    y = np.einsum("bod,bnd->bno", w, x) + noise * rng.normal(size=(b, n, out_dim))
    yq = np.einsum("bod,bd->bo", w, xq) + noise * rng.normal(size=(b, out_dim))
    if out_dim == 1:
        y, yq, w = y[..., 0], yq[..., 0], w[:, 0]
    return ic.TaskBatch(x=x, y=y, x_query=xq, y_query=yq, w=w)


def _arrays(batch):
    """x (B, N, d), Y (B, N, O), read points (x_1..x_N, x_q) (B, N+1, d), as float64."""
    x = np.asarray(batch.x, np.float64)
    y = np.asarray(batch.y, np.float64)
    y = y if y.ndim == 3 else y[..., None]
    xr = np.concatenate([x, np.asarray(batch.x_query, np.float64)[:, None]], axis=1)
    return x, y, xr


def _as_BxPxO(pred) -> np.ndarray:
    pred = np.asarray(pred, np.float64)
    return pred if pred.ndim == 3 else pred[..., None]


def _per_prefix(batch, fit) -> np.ndarray:
    """(B, N+1, O): for each task and n, fit(x_n (n, d), Y_n (n, O), n) -> W (d, O), read at x_{n+1}."""
    x, y, xr = _arrays(batch)
    b, n_ctx, _ = x.shape
    out = np.zeros((b, n_ctx + 1, y.shape[-1]))
    for i in range(b):
        for n in range(n_ctx + 1):
            out[i, n] = xr[i, n] @ fit(x[i, :n], y[i, :n], n)
    return out


# ------------------------------------------------------------------------------------------------------ closed forms

@given(shape=SHAPES, seed=SEEDS)
def test_prefix_least_squares_is_the_pseudo_inverse_fit_of_each_prefix(x64, shape, seed):
    d, n, o = shape
    batch = _batch(seed, B, n, d, o)
    expected = _per_prefix(batch, lambda xn, yn, k: np.linalg.pinv(xn) @ yn if k else np.zeros((d, o)))
    got = _as_BxPxO(PrefixLeastSquares()(batch))
    chex.assert_shape(got, (B, n + 1, o))
    np.testing.assert_allclose(got, expected, atol=1e-9, rtol=1e-9)


@given(shape=SHAPES, lam=st.floats(1e-3, 10.0), seed=SEEDS)
def test_prefix_ridge_solves_the_regularised_normal_equations_of_each_prefix(x64, shape, lam, seed):
    d, n, o = shape
    batch = _batch(seed, B, n, d, o)
    expected = _per_prefix(batch, lambda xn, yn, k: np.linalg.solve(xn.T @ xn + lam * np.eye(d), xn.T @ yn))
    np.testing.assert_allclose(_as_BxPxO(PrefixRidge(lam=lam)(batch)), expected, atol=1e-10, rtol=1e-10)


@given(shape=SHAPES, seed=SEEDS)
def test_prefix_gd_takes_k_steps_on_each_prefix_loss_with_its_own_step_size(x64, shape, seed):
    (d, n, o), steps = shape, 3
    batch = _batch(seed, B, n, d, o)
    eta = np.random.default_rng(seed + 1).uniform(0.05, 0.4, n + 1)

    def gd(xn, yn, k):
        w = np.zeros((d, o))
        for _ in range(steps if k else 0):
            w = w - eta[k] * xn.T @ (xn @ w - yn) / k  # grad of 1/(2k) sum_i ||W x_i - y_i||^2
        return w

    np.testing.assert_allclose(_as_BxPxO(PrefixGD(eta=eta, steps=steps)(batch)), _per_prefix(batch, gd),
                               atol=1e-11, rtol=1e-11)
    scalar = _as_BxPxO(PrefixGD(eta=0.2, steps=steps)(batch))  # one eta for all prefixes
    np.testing.assert_allclose(scalar, _as_BxPxO(PrefixGD(eta=np.full(n + 1, 0.2), steps=steps)(batch)), atol=1e-14)


@given(shape=SHAPES, seed=SEEDS)
def test_prefix_averaging_is_the_mean_of_y_i_x_i_and_zero_is_zero(x64, shape, seed):
    d, n, o = shape
    batch = _batch(seed, B, n, d, o)
    expected = _per_prefix(batch, lambda xn, yn, k: xn.T @ yn / max(k, 1))
    np.testing.assert_allclose(_as_BxPxO(PrefixAveraging()(batch)), expected, atol=1e-12, rtol=1e-12)
    zero = PrefixZero()(batch)
    chex.assert_shape(zero, (B, n + 1) if o == 1 else (B, n + 1, o))
    assert np.all(np.asarray(zero) == 0.0)


@given(shape=SHAPES, seed=SEEDS)
def test_prefix_nearest_neighbours_average_the_k_closest_earlier_inputs(x64, shape, seed):
    (d, n, o), k = shape, 3  # n < k at the first prefixes: the mean over all pairs seen
    batch = _batch(seed, B, n, d, o)
    x, y, xr = _arrays(batch)
    expected = np.zeros((B, n + 1, o))
    for i in range(B):
        for m in range(1, n + 1):  # m = 0: no pair seen, prediction 0
            dist = np.linalg.norm(x[i, :m] - xr[i, m], axis=1)
            expected[i, m] = y[i, np.argsort(dist, kind="stable")[:min(k, m)]].mean(0)
    np.testing.assert_allclose(_as_BxPxO(PrefixNearestNeighbours(k=k)(batch)), expected, atol=1e-12, rtol=1e-12)


def _direct_dmmse(batch, pool_MxOxd, noise) -> np.ndarray:
    """The posterior mean over the pool by a plain (stable) softmax over all M members at once, (B, N+1, O)."""
    x, y, xr = _arrays(batch)
    resid = ((np.einsum("mod,bnd->bmno", pool_MxOxd, x) - y[:, None]) ** 2).sum(-1)  # (B, M, N)
    sq = np.concatenate([np.zeros(resid.shape[:2] + (1,)), np.cumsum(resid, axis=-1)], axis=-1)  # (B, M, N+1)
    logit = -sq / (2 * noise**2)
    post = np.exp(logit - logsumexp(logit, axis=1, keepdims=True))
    return np.einsum("bmp,mod,bpd->bpo", post, pool_MxOxd, xr)


@given(shape=SHAPES, seed=SEEDS)
def test_prefix_dmmse_equals_the_softmax_posterior_mean_over_the_pool(x64, shape, seed):
    (d, n, o), m, chunk = shape, 37, 8  # 5 chunks, the last one padded
    pool = np.random.default_rng(seed + 7).normal(size=(m, o, d))
    batch = _batch(seed, B, n, d, o, noise=0.5, pool=pool)
    got = _as_BxPxO(PrefixDMMSE(pool=pool, noise=0.5, chunk=chunk)(batch))
    np.testing.assert_allclose(got, _direct_dmmse(batch, pool, 0.5), atol=1e-10, rtol=1e-9)
    prior_mean = np.einsum("mod,bd->bo", pool, batch.x[:, 0]) / m  # no pair seen: the pool's mean prediction
    np.testing.assert_allclose(got[:, 0], prior_mean, atol=1e-12)


def test_prefix_dmmse_stays_finite_and_exact_for_a_pool_of_2_to_the_15(x64):
    # Fresh tasks (not in the pool) and little noise, the out-of-distribution case of "Pretraining task diversity...":
    # every member's unnormalised posterior weight underflows, the running log-sum-exp over chunks does not.
    m, (d, n, o), noise = 2**15, (4, 3, 2), 0.01
    pool = np.random.default_rng(0).normal(size=(m, o, d))
    batch = _batch(1, B, n, d, o, noise=noise)
    got = _as_BxPxO(PrefixDMMSE(pool=pool, noise=noise, chunk=4096)(batch))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _direct_dmmse(batch, pool, noise), atol=1e-9, rtol=1e-8)
    x, y, xr = _arrays(batch)
    sq = ((np.einsum("mod,bnd->bmno", pool, x) - y[:, None]) ** 2).sum((-1, -2))  # (B, M), all n pairs
    assert np.all(np.exp(-sq / (2 * noise**2)).sum(1) == 0.0)
    # So little noise makes the posterior one-hot on the best-fitting member.
    best = pool[np.argmin(sq, axis=1)]
    np.testing.assert_allclose(got[:, -1], np.einsum("bod,bd->bo", best, xr[:, -1]), atol=1e-8)


def test_the_last_column_is_the_full_context_learner(x64):
    d, n, o = 4, 3, 2
    pool = np.random.default_rng(3).normal(size=(37, o, d))
    batch = _batch(4, B, n, d, o, noise=0.5, pool=pool)
    pairs = [(PrefixLeastSquares(), ic.LeastSquares()), (PrefixRidge(lam=0.3), ic.Ridge(lam=0.3)),
             (PrefixGD(eta=np.linspace(0, 0.3, n + 1), steps=3), ic.GD(eta=0.3, steps=3)),
             (PrefixDMMSE(pool=pool, noise=0.5, chunk=8), ic.DMMSE(pool=pool, noise=0.5)),
             (PrefixAveraging(), Averaging()), (PrefixZero(), Zero())]
    for prefix, full in pairs:
        q = prefix.query(batch)
        chex.assert_shape(q, (B, o))
        np.testing.assert_allclose(q, full(batch), atol=1e-10, err_msg=type(prefix).__name__)
    # k-NN with k >= N averages every label; with k = 2 < N = 3 the learner and the last column agree again.
    np.testing.assert_allclose(NearestNeighbours(k=3)(batch), np.asarray(batch.y).mean(1), atol=1e-12)
    np.testing.assert_allclose(PrefixNearestNeighbours(k=2).query(batch), NearestNeighbours(k=2)(batch), atol=1e-12)
    assert np.max(np.abs(NearestNeighbours(k=2)(batch) - NearestNeighbours(k=3)(batch))) > 1e-3
    # The learners' weights: averaging is one GD step of size 1, the zero predictor has W = 0.
    np.testing.assert_allclose(Averaging().weights(batch), ic.GD(eta=1.0, steps=1).weights(batch), atol=1e-12)
    assert np.all(np.asarray(Zero().weights(batch)) == 0.0)
    with pytest.raises(TypeError, match="no weights"):
        NearestNeighbours().weights(batch)


# ------------------------------------------------------------------------------------------- tuning and the builder

TUNE_B, TUNE_N, TUNE_D = 400, 6, 3


def test_tuned_one_step_eta_per_prefix_is_the_exact_least_squares_step(x64):
    # One GD step from 0 predicts eta * u_n with u_n = x_{n+1} . (X_n^T y_n / n): the best eta is
    # sum(u t) / sum(u^2) per prefix, t the label it predicts.
    batch = _batch(6, TUNE_B, TUNE_N, TUNE_D, noise=0.4)
    x, y, xr = _arrays(batch)
    c = np.concatenate([np.zeros((TUNE_B, 1, TUNE_D, 1)), np.cumsum(np.einsum("bnd,bno->bndo", x, y), axis=1)], 1)
    u = np.einsum("bpd,bpdo->bpo", xr, c)[..., 0] / np.maximum(np.arange(TUNE_N + 1), 1)
    t = np.asarray(prefix_targets(batch), np.float64)
    exact = (u * t).sum(0)[1:] / (u**2).sum(0)[1:]
    tuned = tune_prefix_gd(batch, 1)
    np.testing.assert_allclose(tuned.eta[1:], exact, rtol=1e-3)
    assert tuned.eta[0] == 0.0
    loss = np.asarray(per_position_half_mse(PrefixGD(eta=tuned.eta)(batch), batch))
    np.testing.assert_allclose(tuned.loss, loss, rtol=1e-10)
    np.testing.assert_allclose(loss[1:], 0.5 * ((exact * u[:, 1:] - t[:, 1:]) ** 2).mean(0), rtol=1e-6)


def test_bayes_ridge_has_the_lowest_error_at_every_prefix_on_fresh_gaussian_tasks(x64):
    config = ic.TaskConfig(dim=TUNE_D, n_context=TUNE_N, x_dist="normal", noise=0.5, w_scale=1.5)
    assert bayes_ridge_lambda(config) == pytest.approx(0.25 / 2.25)
    tuning, batch = (ic.sample(jax.random.PRNGKey(s), config, TUNE_B) for s in (0, 1))
    baselines = prefix_baselines(config, tuning, gd_steps=(1,))
    assert set(baselines) == {"zero", "averaging", "nearest_neighbours", "least_squares", "ridge", "gd_1"}
    target = np.asarray(prefix_targets(batch), np.float64)
    sq = {name: (np.asarray(f(batch), np.float64) - target) ** 2 for name, f in baselines.items()}
    for name, err in sq.items():
        # Paired over tasks: ridge is not worse than any baseline by more than 3 standard errors, at any n.
        diff = sq["ridge"] - err
        assert np.all(diff.mean(0) <= 3 * diff.std(0) / np.sqrt(TUNE_B) + 1e-12), name
    mean = {name: err.mean(0) for name, err in sq.items()}
    assert np.all(mean["ridge"][2:] < mean["averaging"][2:])
    assert mean["ridge"][TUNE_D] < 0.5 * mean["least_squares"][TUNE_D]  # least squares fits the noise at n = d


def test_prefix_baselines_for_pools_and_noiseless_tasks():
    pooled = ic.TaskConfig(dim=2, n_context=4, x_dist="normal", noise=0.5, pool_size=8)
    built = prefix_baselines(pooled, gd_steps=())
    assert isinstance(built["dmmse"], PrefixDMMSE) and np.shape(built["dmmse"].pool) == (8, 1, 2)
    assert "gd_1" not in built
    noiseless = ic.TaskConfig(dim=2, n_context=4)
    assert bayes_ridge_lambda(noiseless) == 0.0 and "ridge" not in prefix_baselines(noiseless, gd_steps=())
    with pytest.raises(ValueError, match="tuning_batch"):
        prefix_baselines(noiseless)
    with pytest.raises(ValueError, match="noise > 0"):
        prefix_baselines(noiseless.replace(pool_size=4), gd_steps=())
    with pytest.raises(ValueError, match=r"w_scale must be in \(0"):
        bayes_ridge_lambda(noiseless.replace(w_scale=0.0))


# ---------------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("baseline, match", [
    (PrefixNearestNeighbours(k=0), "k must be an integer >= 1"),
    (PrefixRidge(lam=0.0), "lam must be > 0"),
    (PrefixGD(eta=np.ones(3)), r"eta must be a scalar or have shape \(N \+ 1,\) = \(6,\)"),
    (PrefixGD(eta=0.1, steps=0), "steps must be an integer >= 1"),
    (PrefixDMMSE(pool=np.ones((4, 3)), noise=0.5), r"pool must have shape \(M, d\) or \(M, d_out, d\)"),
    (PrefixDMMSE(pool=np.ones((4, 2)), noise=0.0), "noise must be > 0"),
    (PrefixDMMSE(pool=np.ones((4, 2)), chunk=0), "chunk must be an integer >= 1"),
])
def test_bad_hyper_parameters_raise_errors_naming_them(baseline, match):
    with pytest.raises((ValueError, TypeError), match=match):
        baseline(_batch(0, 2, 5, 2))


def test_per_position_half_mse_checks_the_prediction_shape():
    batch = _batch(0, 2, 5, 2)
    assert np.asarray(per_position_half_mse(np.zeros((2, 6)), batch)).shape == (6,)
    with pytest.raises(ValueError, match=r"pred must have shape \(2, 6\)"):
        per_position_half_mse(np.zeros((2, 5)), batch)
