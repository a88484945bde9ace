"""Order sensitivity (iclgd_synth.critiques.order): the statistics on known answers, exact invariance of full-batch GD,
non-causal LSA and 1-layer causal models in float64, order sensitivity of SGD and multi-layer causal models, and the
causal hand model's step size tuned for the causal model itself. (The study itself: tests/test_study_order.py.)"""

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
