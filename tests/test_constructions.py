"""Hand-constructed LSA weights (iclgd_synth.constructions) implement GD and GD++ exactly.

"Transformers learn in-context by gradient descent", Proposition 1: K layers of the constructed weights = K GD steps
(and K GD++ steps with the input transformation). Checked in float64 to 1e-10 on random sizes; float32 against a
measured, documented bound.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import example, given
from hypothesis import strategies as st

import iclgd_synth as ic
from iclgd_synth.model import predict
from iclgd_synth import attention as attn
from conftest import uniform_batch

# Measured on CPU (XLA, 2 cores), vonoswald tasks (d = N = 10, x ~ U(-0.5, 0.5)), 1000 tasks, K = 1..5, deep and
# recurrent, 1/N in P or inside the layer, GD and GD++ (gamma = 0.1), three seeds: the float32 max abs difference
# between hand LSA and explicit GD was at most 2.4e-7 at eta = 1 and 2.9e-6 at eta = 6 (near the tuned step; the
# predictions are then up to ~6 in size). The bound is a few times the worst case seen.
FLOAT32_BOUND = 1e-5


_uniform_batch = uniform_batch


def _max_abs(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


@functools.partial(jax.jit, static_argnames=("dim", "steps", "n_context", "out_dim", "recurrent"))
def _hand_gd_and_gd(batch, eta, w0, *, dim, steps, n_context, out_dim, recurrent):
    """(hand LSA prediction, explicit GD prediction), one compiled program; eta may be per-layer (traced)."""
    params = ic.gd_params(dim, eta, steps, n_context=n_context, out_dim=out_dim, w0=w0, recurrent=recurrent)
    return predict(params, batch, w0=w0), ic.GD(eta=eta, steps=steps, w0=w0)(batch)


@functools.partial(jax.jit, static_argnames=("dim", "steps", "n_context", "out_dim", "recurrent"))
def _hand_gdpp_and_gdpp(batch, eta, gamma, *, dim, steps, n_context, out_dim, recurrent):
    params = ic.gdpp_params(dim, eta, gamma, steps, n_context=n_context, out_dim=out_dim, recurrent=recurrent)
    return params(batch), ic.GDPlusPlus(eta=eta, gamma=gamma, steps=steps)(batch)


def _assert_equal_predictions(hand, explicit, tol=1e-10):
    chex.assert_equal_shape([hand, explicit])
    chex.assert_tree_all_finite([hand, explicit])
    scale = float(jnp.max(jnp.abs(explicit)))
    assert scale > 1e-6  # two all-zero outputs would prove nothing
    # Large step sizes can make GD diverge to O(100) outputs: the bound is relative to O(1) outputs.
    assert _max_abs(hand, explicit) < tol * max(1.0, scale)


# ---------------------------------------------------------------------------------------------------------- GD, float64

_ETAS = st.lists(st.floats(0.05, 2.5), min_size=5, max_size=5)


@given(d=st.integers(1, 6), n=st.integers(1, 8), steps=st.integers(1, 5), out_dim=st.integers(1, 3),
       mode=st.sampled_from(["deep", "deep_per_layer_eta", "recurrent"]), n_in_weights=st.booleans(),
       with_w0=st.booleans(), etas=_ETAS, seed=st.integers(0, 2**16))
@example(d=10, n=10, steps=5, out_dim=1, mode="deep_per_layer_eta", n_in_weights=True, with_w0=True,
         etas=[6.0, 5.5, 1.0, 2.0, 0.5], seed=0)  # the reference paper's sizes, tuned-size steps
@example(d=3, n=2, steps=4, out_dim=2, mode="recurrent", n_in_weights=False, with_w0=True, etas=[1.5] * 5, seed=1)
def test_k_layer_hand_weights_equal_k_gd_steps(x64, d, n, steps, out_dim, mode, n_in_weights, with_w0, etas, seed):
    eta = np.array(etas[:steps]) if mode == "deep_per_layer_eta" else etas[0]
    batch = _uniform_batch(seed, 4, n, d, out_dim)
    w0 = np.random.default_rng(seed + 1).normal(size=(out_dim, d) if out_dim > 1 else (d,)) if with_w0 else None
    hand, explicit = _hand_gd_and_gd(batch, eta, w0, dim=d, steps=steps, n_context=n if n_in_weights else None,
                                     out_dim=out_dim, recurrent=mode == "recurrent")
    chex.assert_shape(hand, (4, out_dim) if out_dim > 1 else (4,))
    _assert_equal_predictions(hand, explicit)


def test_deep_hand_weights_equal_gd_after_every_layer(x64):
    # layer_predictions reads out after each layer: layer k of the construction is GD step k.
    etas = np.array([0.5, 3.0, 1.0, 6.0])
    batch = _uniform_batch(2, 16, 10, 10)
    per_layer = jax.jit(ic.layer_predictions)(ic.gd_params(10, etas, 4), batch)
    chex.assert_shape(per_layer, (4, 16))
    for k in range(4):
        _assert_equal_predictions(per_layer[k], ic.GD(eta=etas[: k + 1], steps=k + 1)(batch))


def test_weights_without_n_context_implement_gd_for_every_n(x64):
    params = ic.gd_params(3, 1.5, 2)  # 1/N inside the layer (Arch.normalize)
    assert params.arch.normalize
    for n in (1, 3, 9):
        batch = _uniform_batch(n, 8, n, 3)
        _assert_equal_predictions(jax.jit(predict)(params, batch), ic.GD(eta=1.5, steps=2)(batch))


def test_weights_with_eta_over_n_in_p_implement_a_rescaled_step_for_another_n(x64):
    # P = (eta / N) I ties the weights to the number of demonstrations: on N' demonstrations they take a GD step of
    # eta * N' / N (the coupling criticised in "Do pretrained Transformers Learn In-Context by Gradient Descent?").
    params = ic.gd_params(3, 1.5, 2, n_context=6)
    batch = _uniform_batch(3, 8, 4, 3)
    hand = jax.jit(predict)(params, batch)
    _assert_equal_predictions(hand, ic.GD(eta=1.5 * 4 / 6, steps=2)(batch))
    assert _max_abs(hand, ic.GD(eta=1.5, steps=2)(batch)) > 1e-3


def test_hand_weights_have_the_products_of_proposition_1(x64):
    d, o, eta, n = 3, 2, 0.7, 5
    w0 = np.arange(6.0).reshape(2, 3)
    kq, pv = attn.head_products(ic.gd_params(d, eta, n_context=n, out_dim=o, w0=w0).layers[0])
    expected_kq = np.zeros((5, 5))
    expected_kq[:3, :3] = np.eye(3)
    expected_pv = np.zeros((5, 5))
    expected_pv[3:, :3] = eta / n * w0
    expected_pv[3:, 3:] = -eta / n * np.eye(2)
    assert _max_abs(kq[0], expected_kq) == 0.0
    assert _max_abs(pv[0], expected_pv) < 1e-15


@pytest.mark.parametrize("d,n", [(1, 1), (3, 5)])
def test_split_heads_gives_the_same_output_and_head_products_sum_to_the_original(x64, d, n):
    params = ic.gd_params(d, [0.8, 2.0], 2, n_context=n)
    batch = _uniform_batch(d, 5, n, d)
    heads = list(range(1, d + 2))  # 1 .. D heads
    split = [ic.split_heads(params, h) for h in heads]
    outputs = jax.jit(lambda ps, b: [p(b) for p in [params] + ps])(split, batch)
    kq_1, pv_1 = attn.head_products(params.layers[1])
    for h, p, out in zip(heads, split, outputs[1:]):
        assert p.n_heads == h
        _assert_equal_predictions(out, outputs[0], tol=1e-12)
        kq_h, pv_h = attn.head_products(p.layers[1])
        assert _max_abs(kq_h.sum(0), kq_1[0]) == 0.0
        assert _max_abs(pv_h, jnp.broadcast_to(pv_1, pv_h.shape)) == 0.0


def test_from_products_of_hand_weights_reproduces_gd(x64):
    params = ic.gd_params(4, [1.0, 2.0, 3.0], 3, n_context=6)
    kq, pv = zip(*(attn.head_products(layer) for layer in params.layers))
    rebuilt = ic.from_products(jnp.concatenate(kq), jnp.concatenate(pv), arch=params.arch)
    batch = _uniform_batch(4, 8, 6, 4)
    _assert_equal_predictions(jax.jit(predict)(rebuilt, batch), ic.GD(eta=jnp.array([1.0, 2.0, 3.0]), steps=3)(batch))


def test_gd_params_vmaps_over_step_sizes_and_jits_with_per_layer_step_sizes(x64):
    batch = _uniform_batch(5, 8, 6, 4)
    etas = jnp.array([0.5, 1.0, 4.0])
    hand = jax.vmap(lambda e: predict(ic.gd_params(4, e, 2, n_context=6), batch))(etas)
    chex.assert_shape(hand, (3, 8))
    for i, e in enumerate(etas):
        _assert_equal_predictions(hand[i], ic.GD(eta=e, steps=2)(batch))
    per_layer = jax.jit(lambda e: (ic.gd_params(4, e, 3))(batch))(etas)
    _assert_equal_predictions(per_layer, ic.GD(eta=etas, steps=3)(batch))


# -------------------------------------------------------------------------------------------------------- GD++, float64

@given(d=st.integers(1, 5), n=st.integers(1, 8), steps=st.integers(1, 4), out_dim=st.integers(1, 2),
       mode=st.sampled_from(["deep", "deep_per_layer", "recurrent"]), etas=_ETAS,
       gammas=st.lists(st.floats(0.0, 0.3), min_size=5, max_size=5), seed=st.integers(0, 2**16))
@example(d=10, n=10, steps=4, out_dim=1, mode="deep_per_layer", etas=[1.0, 2.0, 0.5, 1.5, 1.0],
         gammas=[0.1, 0.2, 0.05, 0.15, 0.1], seed=0)
def test_gdpp_hand_weights_equal_explicit_gdpp(x64, d, n, steps, out_dim, mode, etas, gammas, seed):
    if mode == "deep_per_layer":
        eta, gamma = np.array(etas[:steps]), np.array(gammas[:steps])
    else:
        eta, gamma = etas[0], gammas[0]
    batch = _uniform_batch(seed, 4, n, d, out_dim)
    hand, explicit = _hand_gdpp_and_gdpp(batch, eta, gamma, dim=d, steps=steps, n_context=n, out_dim=out_dim,
                                         recurrent=mode == "recurrent")
    _assert_equal_predictions(hand, explicit)


def test_gdpp_with_zero_gamma_is_gd(x64):
    batch = _uniform_batch(6, 16, 10, 10)
    chex.assert_trees_all_close(ic.gdpp_params(10, 2.0, 0.0, 3, n_context=10), ic.gd_params(10, 2.0, 3, n_context=10))
    _assert_equal_predictions(ic.GDPlusPlus(eta=2.0, gamma=0.0, steps=3)(batch), ic.GD(eta=2.0, steps=3)(batch), tol=1e-12)
    # and gamma != 0 really transforms the inputs
    assert _max_abs(ic.GDPlusPlus(eta=2.0, gamma=0.1, steps=3)(batch), ic.GD(eta=2.0, steps=3)(batch)) > 1e-3


# -------------------------------------------------------------------------------------------------------------- float32

@jax.jit
def _float32_differences(batch, eta):
    """Max abs difference hand LSA vs explicit learner for K = 1..5: GD (1/N inside the layer, deep; 1/N in P,
    recurrent) and GD++ (gamma = 0.1, deep), all in one compiled program."""
    diffs = []
    for steps in range(1, 6):
        explicit = ic.GD(eta=eta, steps=steps)(batch)
        for params in (ic.gd_params(10, eta, steps), ic.gd_params(10, eta, steps, n_context=10, recurrent=True)):
            diffs.append(jnp.max(jnp.abs(params(batch) - explicit)))
        hand_pp = predict(ic.gdpp_params(10, eta, 0.1, steps, n_context=10), batch)
        diffs.append(jnp.max(jnp.abs(hand_pp - ic.GDPlusPlus(eta=eta, gamma=0.1, steps=steps)(batch))))
    return jnp.stack(diffs)


def test_float32_hand_weights_match_gd_and_gdpp_within_the_documented_bound():
    batch = ic.sample_tasks(jax.random.PRNGKey(0), 1000, 10, 10, x_range=0.5, dtype=jnp.float32)
    diffs = jnp.stack([_float32_differences(batch, jnp.float32(eta)) for eta in (1.0, 6.0)])
    chex.assert_type(diffs, jnp.float32)
    chex.assert_shape(diffs, (2, 15))
    assert 0.0 < float(diffs.max()) < FLOAT32_BOUND  # > 0: the comparison really ran in float32


class HandWeightsVariantsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("deep", False), ("recurrent", True))
    def test_hand_weights_match_gd_with_and_without_jit(self, recurrent):
        batch = _uniform_batch(7, 32, 10, 10).validated()
        params = ic.gd_params(10, 3.0, 3, n_context=10, recurrent=recurrent)
        hand = self.variant(predict)(params, batch)
        explicit = self.variant(lambda b: ic.GD(eta=3.0, steps=3)(b))(batch)
        chex.assert_shape(hand, (32,))
        chex.assert_trees_all_close(hand, explicit, atol=FLOAT32_BOUND)


# --------------------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_constructions_reject_non_finite_step_sizes(bad):
    with pytest.raises(ValueError, match="eta must be finite"):
        ic.gd_params(3, bad, 2)
    with pytest.raises(ValueError, match="eta must be finite"):
        ic.gd_params(3, [1.0, bad], 2)
    with pytest.raises(ValueError, match="eta must be finite"):
        ic.gdpp_params(3, bad, 0.1, 2, n_context=4)
    with pytest.raises(ValueError, match="gamma must be finite"):
        ic.gdpp_params(3, 1.0, bad, 2, n_context=4)


def test_constructions_reject_step_size_arrays_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"eta must be a scalar or have shape \(n_layers,\) = \(3,\)"):
        ic.gd_params(3, [1.0, 2.0], 3)
    with pytest.raises(ValueError, match=r"gamma must be a scalar or have shape \(n_layers,\)"):
        ic.gdpp_params(3, 1.0, [0.1, 0.2, 0.3], 2, n_context=4)
    with pytest.raises(ValueError, match="eta must be a scalar or have shape"):
        jax.jit(lambda e: ic.gd_params(3, e, 3).layers[0]["w_p"])(jnp.ones(2))  # traced per-layer eta too


def test_recurrent_construction_rejects_per_layer_step_sizes():
    with pytest.raises(ValueError, match="eta must be a scalar for a recurrent model"):
        ic.gd_params(3, [1.0, 2.0], 2, recurrent=True)
    with pytest.raises(ValueError, match="gamma must be a scalar for a recurrent model"):
        ic.gdpp_params(3, 1.0, [0.1, 0.2], 2, n_context=4, recurrent=True)


def test_constructions_reject_bad_sizes_and_w0():
    for name, call in [("dim", lambda: ic.gd_params(0, 1.0)), ("n_layers", lambda: ic.gd_params(3, 1.0, 0)),
                       ("n_context", lambda: ic.gd_params(3, 1.0, n_context=0)),
                       ("out_dim", lambda: ic.gd_params(3, 1.0, out_dim=0)),
                       ("n_context", lambda: ic.gdpp_params(3, 1.0, 0.1, n_context=-1)),
                       ("w0", lambda: ic.gd_params(3, 1.0, w0=np.zeros(4))),
                       ("w0", lambda: ic.gd_params(3, 1.0, out_dim=2, w0=np.zeros(6)))]:
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(TypeError, match="eta must be a real number"):
        ic.gd_params(3, "fast")


def test_split_heads_and_from_products_reject_bad_input():
    params = ic.gd_params(3, 1.0)
    with pytest.raises(ValueError, match="n_heads"):
        ic.split_heads(params, 5)
    with pytest.raises(ValueError, match="single-head"):
        ic.split_heads(ic.split_heads(params, 2), 2)
    with pytest.raises(ValueError, match="kq and pv"):
        ic.from_products(np.eye(4), np.eye(3))


def test_causal_hand_model_first_layer_uses_prefix_gd_steps(x64):
    # After one causal layer, context token t holds y_t - Delta W_(t) x_t, Delta W_(t) from demonstrations 1..t.
    import dataclasses

    from iclgd_synth.constructions import causal_hand_params

    batch = ic.sample_tasks(jax.random.PRNGKey(6), 3, 5, 2)
    params = causal_hand_params(2, 1.5, 1, 5)
    assert params.arch.causal
    out = ic.forward(params, ic.build_tokens(batch), 5)
    for t in range(5):
        prefix = dataclasses.replace(batch, x=batch.x[:, :t + 1], y=batch.y[:, :t + 1])
        dw = ic.GD(eta=1.5 * (t + 1) / 5, steps=1).weights(prefix)[:, 0]  # P = eta / N with N = 5, sum over t + 1 terms
        expected = batch.y[:, t] - jnp.einsum("bd,bd->b", dw, batch.x[:, t])
        np.testing.assert_allclose(np.asarray(out[:, t, 2]), np.asarray(expected), atol=1e-12)
