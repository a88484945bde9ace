"""Order sensitivity (iclgd_synth.critiques.order): the statistics on known answers, exact invariance of full-batch GD,
non-causal LSA and 1-layer causal models in float64, order sensitivity of SGD and multi-layer causal models, the
causal hand model's step size tuned for the causal model itself, and the closed forms of the order-dependent parts
(one-pass SGD with two demonstrations exactly, its eta^2 term, the 2-layer causal hand model) with the shuffled null. (The study itself: tests/test_study_order.py.)"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iclgd_synth as ic
from iclgd_synth.model import predict
from iclgd_synth.constructions import causal_hand_params
from iclgd_synth.critiques import order as O


def _perms(b, n, p=6, seed=0):
    return O.random_orderings(jax.random.PRNGKey(seed), b, n, p)


def test_order_spread_on_a_known_example():
    # Task 0 moves between 0 and 2 (std 1), task 1 never moves; per-task means 1 and 4 (std 1.5).
    s = O.order_spread(np.array([[0.0, 2.0], [4.0, 4.0]]))
    assert s["spread"] == pytest.approx(0.5)
    assert s["scale"] == pytest.approx(1.5)
    assert s["relative"] == pytest.approx(1.0 / 3.0)
    np.testing.assert_allclose(s["per_task"], [1.0, 0.0])


def test_order_spread_needs_two_orderings():
    with pytest.raises(ValueError, match="P >= 2"):
        O.order_spread(np.zeros((3, 1)))


def test_order_correlation_on_known_examples():
    a = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    assert O.order_correlation(a, 3 * a + 7)["mean"] == pytest.approx(1.0)
    assert O.order_correlation(a, -a)["mean"] == pytest.approx(-1.0)
    # Task 0 of b does not move: it is left out and counted as undefined.
    b = np.array([[5.0, 5.0, 5.0], [1.0, 3.0, 1.0]])
    r = O.order_correlation(a, b)
    assert r["n_undefined"] == 1 and r["n"] == 1 and r["mean"] == pytest.approx(1.0)
    assert np.isnan(O.order_correlation(a, np.ones_like(a))["mean"])


def test_random_orderings_are_permutations_and_ordered_batch_matches_reordering():
    batch = ic.sample_tasks(jax.random.PRNGKey(1), 4, 5, 3)
    perms = _perms(4, 5, p=3)
    chex.assert_shape(perms, (4, 3, 5))
    assert np.all(np.sort(np.asarray(perms), axis=-1) == np.arange(5))
    big = O.ordered_batch(batch, perms)
    for k in range(3):
        one = batch.with_context_order(perms[:, k])
        np.testing.assert_array_equal(np.asarray(big.x)[k::3], np.asarray(one.x))
        np.testing.assert_array_equal(np.asarray(big.y)[k::3], np.asarray(one.y))
    np.testing.assert_array_equal(np.asarray(big.x_query)[::3], np.asarray(batch.x_query))


@settings(max_examples=3)
@given(d=st.integers(1, 6), n=st.integers(2, 12), eta=st.floats(0.1, 3.0), steps=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_full_batch_gd_is_order_invariant_to_rounding(x64, d, n, eta, steps, seed):
    batch = ic.sample_tasks(jax.random.PRNGKey(seed), 8, n, d, x_dist="normal")
    preds = O.ordered_predictions(ic.GD(eta=eta, steps=steps), batch, _perms(8, n, seed=seed))
    scale = np.abs(preds).max()
    assert scale > 1e-3
    assert O.order_spread(preds)["per_task"].max() < 1e-12 * max(1.0, scale)


def test_online_sgd_and_adam_are_order_sensitive(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(2), 32, 8, 4, x_dist="normal")
    for learner in (ic.SGD(eta=0.3, epochs=1, batch_size=1), ic.Adam(lr=0.1, epochs=2, batch_size=1)):
        s = O.order_spread(O.ordered_predictions(learner, batch, _perms(32, 8)))
        assert s["relative"] > 1e-2


@pytest.mark.parametrize("n_layers", [1, 3])
def test_non_causal_lsa_of_any_depth_is_order_invariant(x64, n_layers):
    config = ic.ModelConfig(dim=4, n_layers=n_layers, n_heads=2, init_scale=float(n_layers))
    params = ic.init_params(jax.random.PRNGKey(3), config)
    params = params.replace(layers=tuple({**l, "w_p": l["w_p"] / 6.0} for l in params.layers))
    batch = ic.sample_tasks(jax.random.PRNGKey(4), 16, 6, 4, x_dist="normal")
    preds = O.ordered_predictions(params, batch, _perms(16, 6))
    assert np.abs(preds).max() > 1e-3
    assert O.order_spread(preds)["relative"] < 1e-12


def test_causal_hand_model_is_invariant_with_one_layer_and_sensitive_with_two(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(5), 32, 8, 4)
    perms = _perms(32, 8)
    one = O.order_spread(O.ordered_predictions(causal_hand_params(4, 3.0, 1, 8), batch, perms))
    two = O.order_spread(O.ordered_predictions(causal_hand_params(4, 3.0, 2, 8), batch, perms))
    assert one["relative"] < 1e-12
    assert two["relative"] > 1e-2
    # Without the mask the same 2-layer weights are 2 steps of GD, invariant again.
    plain = ic.gd_params(4, 3.0, n_layers=2, n_context=8)
    assert O.order_spread(O.ordered_predictions(plain, batch, perms))["relative"] < 1e-12


def _causal_loss(batch, eta, k):
    pred = predict(causal_hand_params(batch.dim, eta, k, batch.n_context), batch)
    return float(np.mean(0.5 * (np.asarray(pred) - np.asarray(batch.y_query)) ** 2))


def test_causal_hand_eta_is_tuned_for_the_causal_model(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(7), 400, 8, 4)
    # One layer: the query sees every key, the causal model is one GD step and GD's exact optimum is kept.
    assert O.tune_causal_hand(batch, 1) == ic.tune_gd(batch, 1).eta
    eta_gd, eta_c = ic.tune_gd(batch, 2).eta, O.tune_causal_hand(batch, 2)
    assert abs(eta_c - eta_gd) > 1e-3 * eta_gd  # the causal 2-layer model is not 2-step GD
    best = _causal_loss(batch, eta_c, 2)
    assert best < _causal_loss(batch, eta_gd, 2)
    for factor in (0.9, 1.1):  # a local minimum of the causal model's own loss
        assert best <= _causal_loss(batch, factor * eta_c, 2)


# -------------------------------------------------------------- closed forms of the order-dependent parts (float64)

@settings(max_examples=2, deadline=None)
@given(d=st.sampled_from([2, 4]), d_out=st.sampled_from([1, 2]), eta=st.floats(0.05, 2.0),
       seed=st.integers(0, 1000))
def test_one_pass_sgd_order_difference_for_two_demonstrations_is_the_closed_form(x64, d, d_out, eta, seed):
    # W1 = eta y1 x1^T, W2 = W1 - eta (W1 x2 - y2) x2^T, so pred(1,2) - pred(2,1) = eta^2 (x1.x2)(y2 x1.xq - y1 x2.xq).
    # (d = 1 without noise is order-invariant: y2 x1 = w x1 x2 = y1 x2.)
    batch = ic.sample_tasks(jax.random.PRNGKey(seed), 5, 2, d, x_dist="normal", out_dim=d_out)
    perms = np.tile(np.array([[[0, 1], [1, 0]]]), (5, 1, 1))
    preds = O.ordered_predictions(ic.SGD(eta=eta, epochs=1, batch_size=1), batch, perms)
    x, y = np.asarray(batch.x), np.asarray(batch.y)
    expected = O.sgd_two_demo_order_difference(eta, x[:, 0], x[:, 1], y[:, 0], y[:, 1], np.asarray(batch.x_query))
    chex.assert_shape(expected, preds[:, 0].shape)
    assert np.abs(expected).max() > 1e-6
    np.testing.assert_allclose(preds[:, 0] - preds[:, 1], expected, atol=1e-13 * max(1.0, np.abs(preds).max()))
    # For N = 2 the order term is exact: eta^2 (Q(1,2) - Q(2,1)).
    q = O.ordered_order_terms(batch, perms)
    np.testing.assert_allclose(eta**2 * (q[:, 0] - q[:, 1]), expected, atol=1e-13 * max(1.0, np.abs(expected).max()))


def test_sgd_order_effects_are_eta_squared_times_the_order_term_up_to_third_order(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(11), 8, 7, 4, x_dist="normal")
    perms = _perms(8, 7, p=5, seed=2)
    dq = O.ordered_order_terms(batch, perms)
    dq = dq - dq[:, :1]
    errs = []
    for eta in (1e-2, 1e-3):
        p = O.ordered_predictions(ic.SGD(eta=eta, epochs=1, batch_size=1), batch, perms)
        errs.append(np.abs((p - p[:, :1]) / eta**2 - dq).max())
    assert np.abs(dq).max() > 1e-2
    assert errs[0] < 0.1 * np.abs(dq).max()  # an O(eta) remainder ...
    assert errs[0] / errs[1] == pytest.approx(10.0, rel=0.05)  # ... that shrinks linearly with eta


@settings(max_examples=2, deadline=None)
@given(d=st.sampled_from([2, 4]), n=st.sampled_from([3, 6]), eta=st.floats(0.2, 4.0), seed=st.integers(0, 1000))
def test_two_layer_causal_hand_model_is_its_closed_form_and_its_order_effects_are_sgds_second_order_term(
        x64, d, n, eta, seed):
    batch = ic.sample_tasks(jax.random.PRNGKey(seed), 6, n, d, x_dist="normal")
    params = causal_hand_params(d, eta, 2, n)
    pred = np.asarray(predict(params, batch))
    closed = O.causal_hand_two_layer_prediction(batch, eta)
    np.testing.assert_allclose(pred, closed, atol=1e-12 * max(1.0, np.abs(pred).max()))
    perms = _perms(6, n, p=4, seed=seed)
    pc = O.ordered_predictions(params, batch, perms)
    q = O.ordered_order_terms(batch, perms)
    dc, dq = pc - pc.mean(1, keepdims=True), (eta / n) ** 2 * (q - q.mean(1, keepdims=True))
    assert np.abs(dc).max() > 1e-6
    np.testing.assert_allclose(dc, dq, atol=1e-12 * max(1.0, np.abs(pc).max()))
    assert O.order_correlation(pc, q)["mean"] == pytest.approx(1.0, abs=1e-9)


def test_shuffled_pairing_null_destroys_the_pairing_but_not_the_spread():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 6))
    r = O.shuffled_correlation(a, a, jax.random.PRNGKey(0))
    assert abs(r["mean"]) < 0.03 and r["n"] == 3000  # expected -1/(P-1) * P(identity) ~ 0
    assert O.order_correlation(a, a)["mean"] == pytest.approx(1.0)
