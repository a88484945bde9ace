"""Per-layer implicit weights (autodiff Jacobians) against explicit GD / GD++ iterates, and GD++ as a spectral map."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iclgd_synth import implicit_weights as iw
from iclgd_synth.constructions import from_products, gd_params, gdpp_params
from iclgd_synth.learners import GD
from iclgd_synth.learners.gdpp import GDPlusPlus
from iclgd_synth.metrics import sensitivities
from iclgd_synth.model import layer_predictions
from iclgd_synth.tasks import TaskBatch

SIZES = [(2, 3), (4, 2)]  # (d, N): N > d and N < d; few sizes, so each compiled program is reused


def _batch(d, n, seed, b=12, out_dim=1, noise=0.0, x_scale=1.0) -> TaskBatch:
    """Gaussian tasks drawn with NumPy (float64; no sampler compilation per shape): x ~ N(0, x_scale^2 I)."""
    rng = np.random.default_rng(seed)
    x = x_scale * rng.standard_normal((b, n + 1, d))
    w = rng.standard_normal((b, out_dim, d))
    y = np.einsum("bod,bnd->bno", w, x) + noise * rng.standard_normal((b, n + 1, out_dim))
    if out_dim == 1:
        y, w = y[..., 0], w[:, 0]
    return TaskBatch.create(x=x[:, :n], y=y[:, :n], x_query=x[:, n], y_query=y[:, n], w=w)


def _random_deep_params(d, n_layers, seed, scale=0.5):
    """A deep linear-attention model with arbitrary (dense, random) products W_K^T W_Q and P W_V per layer."""
    rng = np.random.default_rng(seed)
    kq, pv = (scale * rng.standard_normal((n_layers, d + 1, d + 1)) for _ in range(2))
    return from_products(kq, pv)


@given(dn=st.sampled_from(SIZES), seed=st.integers(0, 1000))
def test_implicit_weights_reproduce_every_layer_prediction_of_a_random_deep_model(x64, dn, seed):
    """Linear attention with context-only keys: y_hat_l = w_l . x_q exactly, for arbitrary (random) weights."""
    d, n = dn
    params = _random_deep_params(d, 3, seed)
    batch = _batch(d, n, seed)
    w = iw.layer_implicit_weights(params, batch)
    assert w.shape == (3, batch.batch_size, d)
    np.testing.assert_allclose(jnp.einsum("kbd,bd->kb", w, batch.x_query), layer_predictions(params, batch),
                               rtol=1e-10, atol=1e-12)


@given(dn=st.sampled_from(SIZES), seed=st.integers(0, 1000), etas=st.lists(st.floats(0.1, 3.0), min_size=3,
                                                                            max_size=3))
def test_k_layer_hand_weights_implicit_weights_equal_gd_iterates(x64, dn, seed, etas):
    d, n = dn
    batch = _batch(d, n, seed, noise=0.1)
    gd = iw.gd_iterates(batch, etas, 3)
    np.testing.assert_allclose(iw.layer_implicit_weights(gd_params(d, etas, 3, n_context=n), batch), gd,
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gd[1], GD(eta=etas[:2], steps=2).weights(batch)[:, 0], rtol=1e-12, atol=1e-13)


@given(dn=st.sampled_from(SIZES), seed=st.integers(0, 1000), gammas=st.lists(st.floats(0.0, 0.3), min_size=3,
                                                                              max_size=3))
def test_gdpp_hand_weights_implicit_weights_equal_gdpp_iterates(x64, dn, seed, gammas):
    d, n = dn
    batch = _batch(d, n, seed)
    etas = np.array([1.0, 2.0, 1.5])
    u = iw.gdpp_iterates(batch, etas, gammas, 3)
    np.testing.assert_allclose(iw.layer_implicit_weights(gdpp_params(d, etas, gammas, 3, n_context=n), batch), u,
                               rtol=1e-10, atol=1e-12)
    # The explicit learner's own sensitivity (autodiff through learners.gdpp) after 3 steps.
    np.testing.assert_allclose(u[2], sensitivities(GDPlusPlus(eta=etas, gamma=np.asarray(gammas), steps=3), batch),
                               rtol=1e-10, atol=1e-12)


def test_vector_outputs_give_one_weight_row_per_output(x64):
    batch = _batch(3, 4, 0, out_dim=2)
    w = iw.layer_implicit_weights(gd_params(3, 1.0, 2, n_context=4, out_dim=2), batch)
    assert w.shape == (2, batch.batch_size, 2, 3)
    np.testing.assert_allclose(w, iw.gd_iterates(batch, 1.0, 2), rtol=1e-10, atol=1e-12)


def test_compare_layers_scores_hand_weights_and_least_squares(x64):
    d, n = 3, 8
    batch = _batch(d, n, 1, b=64)
    etas, gammas = np.array([1.0, 1.5, 1.5]), np.array([0.1, 0.1, 0.05])
    gdpp = iw.compare_layers(gdpp_params(d, etas, gammas, 3, n_context=n), batch, eta=etas, gamma=gammas)
    np.testing.assert_allclose(gdpp["cos_gdpp"], 1.0, atol=1e-12)
    np.testing.assert_allclose(gdpp["relerr_gdpp"], 0.0, atol=1e-12)
    assert gdpp["relerr_gd"][0] < 1e-12 and np.all(gdpp["relerr_gd"][1:] > 1e-3)  # layer 1 is a plain GD step
    # GD with a step well inside the stable range approaches least squares layer by layer (noiseless, N > d).
    gd = iw.compare_layers(gd_params(d, 0.3, 3, n_context=n, recurrent=True), batch, eta=0.3)
    assert np.all(np.diff(gd["relerr_ls"]) < 0) and np.all(gd["cos_ls"] > 0.5)
    np.testing.assert_allclose(gd["relerr_gd"], 0.0, atol=1e-12)


@given(dn=st.sampled_from(SIZES + [(3, 3), (3, 5)]), seed=st.integers(0, 1000), gammas=st.lists(st.floats(0.0, 0.6),
                                                                                     min_size=1, max_size=4))
def test_gdpp_eigenvalue_map_equals_explicit_input_transformation(x64, dn, seed, gammas):
    """C = X^T X under X <- X (I - gamma C): eigenvalues map by lambda (1 - gamma lambda)^2, eigenvectors fixed."""
    d, n = dn
    x = np.asarray(_batch(d, n, seed, b=6, x_scale=0.4).x)
    covs = iw.gdpp_input_covariances(x, gammas)
    lam0, vecs0 = np.linalg.eigh(covs[0])
    mapped = iw.gdpp_eigenvalue_map(lam0, gammas)
    for c, lam in zip(covs, mapped):
        scale = np.abs(covs[0]).max()
        np.testing.assert_allclose(c, np.einsum("bij,bj,bkj->bik", vecs0, lam, vecs0), atol=1e-11 * scale)
        np.testing.assert_allclose(np.linalg.eigvalsh(c), np.sort(lam, axis=-1), atol=1e-11 * scale)


def test_model_token_conditioning_of_gdpp_weights_equals_the_exact_map(x64):
    d, n = 4, 10
    batch = _batch(d, n, 2, b=32, x_scale=0.3)
    gammas = np.array([0.2, 0.3, 0.3])
    params = gdpp_params(d, 1.0, gammas, 3, n_context=n)
    np.testing.assert_allclose(iw.token_conditioning(params, batch), iw.gdpp_conditioning(batch.x, gammas),
                               rtol=1e-9)
    fit = iw.fit_gdpp_gammas(params, batch)
    np.testing.assert_allclose(fit["gamma"], gammas, rtol=1e-10)
    np.testing.assert_allclose(fit["r2"], 1.0, atol=1e-10)
    plain = iw.fit_gdpp_gammas(gd_params(d, 1.0, 2, n_context=n), batch)  # GD leaves the inputs alone
    np.testing.assert_allclose(plain["gamma"], 0.0, atol=1e-15)


def test_greedy_gammas_equalise_a_two_point_spectrum():
    """For eigenvalues {1, 4}, f(1) = f(4) at gamma = 1/7 (1 - gamma = 2 (1 - 4 gamma)): condition number 1."""
    gammas, log_kappa = iw.greedy_gdpp_gammas(np.array([[1.0, 4.0]]), 1)
    assert gammas[0] == pytest.approx(1 / 7, abs=1e-6)
    assert log_kappa[0] == pytest.approx(np.log10(4.0)) and log_kappa[1] < 1e-5


def test_condition_numbers_use_the_range_when_n_is_below_d(x64):
    x = np.asarray(_batch(5, 2, 3, b=4).x)
    lam = iw.range_eigenvalues(x)
    assert lam.shape == (4, 2) and np.all(lam > 1e-8)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(np.einsum("bnd,bmd->bnm", x, x)), rtol=1e-10)
    assert np.all(np.isfinite(iw.gdpp_conditioning(x, [0.1, 0.1])))


def test_bad_inputs_raise_clear_errors(x64):
    batch = _batch(3, 4, 0)
    with pytest.raises(ValueError, match=r"gamma must be a scalar or have shape \(steps,\) = \(2,\)"):
        iw.gdpp_iterates(batch, 1.0, [0.1, 0.2, 0.3], 2)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        iw.gd_iterates(batch, 1.0, 0)
    with pytest.raises(ValueError, match="params expect tokens of size D = 5"):
        iw.layer_implicit_weights(gd_params(4, 1.0), batch)
    with pytest.raises(ValueError, match="gamma must be a scalar or have shape"):
        iw.gdpp_eigenvalue_map([1.0, 2.0], [[0.1]])
    with pytest.raises(ValueError, match="same shape"):
        iw.cosine(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, d\)"):
        iw.range_eigenvalues(np.ones((3, 3)))
