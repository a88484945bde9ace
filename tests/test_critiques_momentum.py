"""Momentum attention (attention.momentum_update, Arch.momentum) and its exact relations to GD with momentum
(iclgd_synth.critiques.momentum), all in float64; the heavy-ball construction (constructions.heavy_ball_params on the
tokens of tokens.heavy_ball_tokens) against MomentumGD."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iclgd_synth as ic
from iclgd_synth.model import predict
from iclgd_synth import attention as attn
from iclgd_synth.constructions import heavy_ball_params
from iclgd_synth.critiques import momentum as MO
from iclgd_synth.tokens import heavy_ball_token_dim, heavy_ball_tokens


def _loop_momentum(tokens, layer, keys, beta, kind, causal, normalize):
    """The momentum term by explicit loops over tasks, tokens t and keys i < t (NumPy)."""
    tokens = np.asarray(tokens, np.float64)
    w_q, w_k, w_v, w_p = (np.asarray(layer[k], np.float64) for k in ("w_q", "w_k", "w_v", "w_p"))
    keys = np.asarray(keys)
    b, t_len, dd = tokens.shape
    out = np.zeros((b, t_len, dd))
    for bi in range(b):
        for t in range(t_len):
            for i in range(t):
                if not keys[i]:
                    continue
                for h in range(w_q.shape[0]):
                    pv = w_p[h] @ w_v[h] @ tokens[bi, i]
                    if kind == "values":
                        out[bi, t] += beta ** (t - i) * pv
                    else:
                        weight = sum(beta**m for m in range(1, t - i + 1))
                        out[bi, t] += weight * (w_k[h] @ tokens[bi, i]) @ (w_q[h] @ tokens[bi, t]) * pv
            if normalize:
                count = sum(1 for i in range(t_len) if keys[i] and (not causal or i <= t))
                out[bi, t] /= max(count, 1)
    return out


_momentum_update = jax.jit(attn.momentum_update, static_argnames=("kind", "causal", "normalize", "query_only"))


@settings(max_examples=4)
@given(kind=st.sampled_from(["values", "dual"]), causal=st.booleans(), normalize=st.booleans(),
       include_query=st.booleans(), beta=st.floats(0.0, 1.0), t_len=st.integers(1, 6), heads=st.integers(1, 2),
       seed=st.integers(0, 1000))
def test_momentum_update_equals_loop_reference(x64, kind, causal, normalize, include_query, beta, t_len, heads, seed):
    rng = np.random.default_rng(seed)
    dd, kk = 3, 2
    tokens = rng.normal(size=(2, t_len, dd))
    layer = {name: jnp.asarray(rng.normal(size=shape)) for name, shape in
             (("w_q", (heads, kk, dd)), ("w_k", (heads, kk, dd)), ("w_v", (heads, kk, dd)), ("w_p", (heads, dd, kk)))}
    keys = attn.key_mask(t_len, t_len - 1, include_query)
    got = _momentum_update(jnp.asarray(tokens), layer, keys, beta, kind=kind, causal=causal, normalize=normalize)
    ref = _loop_momentum(tokens, layer, keys, beta, kind, causal, normalize)
    assert np.max(np.abs(np.asarray(got) - ref)) < 1e-12 * max(1.0, np.abs(ref).max())
    q = _momentum_update(jnp.asarray(tokens), layer, keys, beta, kind=kind, causal=causal, normalize=normalize,
                             query_only=True)
    assert np.max(np.abs(np.asarray(q)[:, 0] - ref[:, -1])) < 1e-12 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("kind", ["values", "dual"])
def test_momentum_zero_equals_no_momentum_and_positive_beta_changes_the_prediction(x64, kind):
    config = ic.ModelConfig(dim=3, n_layers=2, n_heads=2, causal=True, init_scale=2.0)
    params = ic.init_params(jax.random.PRNGKey(0), config)
    batch = ic.sample_tasks(jax.random.PRNGKey(1), 5, 6, 3, x_dist="normal")
    base = np.asarray(predict(params, batch))
    with_arch = lambda beta: params.replace(arch=dataclasses.replace(params.arch, momentum=beta,  # noqa: E731
                                                                     momentum_kind=kind))
    assert np.max(np.abs(np.asarray(predict(with_arch(0.0), batch)) - base)) < 1e-14
    assert np.max(np.abs(np.asarray(predict(with_arch(0.7), batch)) - base)) > 1e-4


def test_momentum_options_are_validated():
    with pytest.raises(ValueError, match="linear attention only"):
        ic.ModelConfig(attention="softmax", momentum=0.5, momentum_kind="dual")
    with pytest.raises(ValueError):
        ic.ModelConfig(momentum=1.5)
    with pytest.raises(ValueError):
        ic.ModelConfig(momentum=0.5, momentum_kind="heavy")
    assert ic.ModelConfig(momentum=0.5).arch().momentum == 0.5


def test_query_momentum_weights_on_a_known_example():
    np.testing.assert_allclose(MO.query_momentum_weights(3, 0.5, "dual"), [1.875, 1.75, 1.5])
    np.testing.assert_allclose(MO.query_momentum_weights(3, 0.5, "values"), [0.125, 0.25, 0.5])


@settings(max_examples=4)
@given(d=st.integers(1, 6), n=st.integers(1, 10), beta=st.floats(0.0, 0.99), eta=st.floats(0.05, 3.0),
       seed=st.integers(0, 1000))
def test_hand_momentum_attention_equals_weighted_gd_heavy_ball_at_w0_and_affine_gd(x64, d, n, beta, eta, seed):
    # (a1) dual momentum = one GD step with weights 1 + beta + ... + beta^(N-i) = heavy ball over the demonstrations
    # with gradients at W0; (a2) the paper's momentum = a GD step on (W, b) with decayed weights on the bias.
    batch = ic.sample_tasks(jax.random.PRNGKey(seed), 6, n, d, x_dist="normal")
    w0 = jax.random.normal(jax.random.PRNGKey(seed + 1), (d,))
    errs = {k: float(v) for k, v in MO.relation_errors(batch, w0, eta, beta).items()}
    tol = 1e-10 * max(1.0, errs["scale"])
    assert errs["a1_weighted_gd"] < tol
    assert errs["a1_heavy_ball_at_w0"] < tol
    assert errs["a2_affine_gd"] < tol
    if beta > 0.05 and n > 1:  # a genuine re-weighting: not a plain GD step with the mean weight
        assert errs["a1_distance_to_plain_gd"] > 1e-8


def test_values_momentum_adds_a_term_that_does_not_depend_on_the_query(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(3), 6, 5, 3, x_dist="normal")
    hand = ic.gd_params(3, 0.7, n_context=5)
    model = hand.replace(arch=dataclasses.replace(hand.arch, momentum=0.6, momentum_kind="values"))
    bias = np.asarray(predict(model, batch)) - np.asarray(ic.GD(eta=0.7, steps=1)(batch))
    shifted = batch.replace(x_query=2.0 * batch.x_query + 1.0)
    bias2 = np.asarray(predict(model, shifted)) - np.asarray(ic.GD(eta=0.7, steps=1)(shifted))
    assert np.abs(bias).max() > 1e-3
    assert np.max(np.abs(bias2 - bias)) < 1e-12


@settings(max_examples=3)
@given(d=st.integers(1, 5), n=st.integers(1, 9), out_dim=st.integers(1, 2), seed=st.integers(0, 1000))
def test_k_heavy_ball_layers_equal_k_momentum_gd_steps(x64, d, n, out_dim, seed):
    rng = np.random.default_rng(seed)
    batch = ic.sample_tasks(jax.random.PRNGKey(seed), 5, n, d, out_dim=out_dim, x_dist="normal")
    schedules = [(rng.uniform(0.05, 0.6, k), rng.uniform(0.0, 0.95, k)) for k in range(1, 6)]
    models = tuple(heavy_ball_params(d, e, m, len(e), n, out_dim) for e, m in schedules)
    errs = MO.heavy_ball_errors(models, batch, tuple((jnp.asarray(e), jnp.asarray(m)) for e, m in schedules))
    scale = float(np.abs(np.asarray(ic.MomentumGD(eta=jnp.asarray(schedules[-1][0]), mu=jnp.asarray(schedules[-1][1]), steps=5)(batch))).max())
    assert scale > 1e-3
    for k, err in zip(range(1, 6), errs):
        assert float(err) < 1e-10 * max(1.0, scale), k


def test_heavy_ball_layers_with_constant_steps_equal_the_momentum_gd_learner(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(4), 5, 7, 3, x_dist="normal")
    params = heavy_ball_params(3, 0.3, 0.8, 4, 7)
    ref = np.asarray(ic.MomentumGD(eta=0.3, mu=0.8, steps=4)(batch))
    assert np.max(np.abs(np.asarray(MO.heavy_ball_predict(params, batch)) - ref)) < 1e-10 * max(1.0,
                                                                                                  np.abs(ref).max())
    # mu = 0 is plain GD, and with mu > 0 the prediction differs from it.
    plain = np.asarray(MO.heavy_ball_predict(heavy_ball_params(3, 0.3, 0.0, 4, 7), batch))
    assert np.max(np.abs(plain - np.asarray(ic.GD(eta=0.3, steps=4)(batch)))) < 1e-12
    assert np.max(np.abs(plain - ref)) > 1e-3


def test_heavy_ball_tokens_carry_x_y_a_zero_residual_channel_and_a_constant():
    batch = ic.sample_tasks(jax.random.PRNGKey(5), 2, 4, 3, out_dim=2)
    tokens = np.asarray(heavy_ball_tokens(batch))
    assert tokens.shape == (2, 5, heavy_ball_token_dim(3, 2)) == (2, 5, 8)
    np.testing.assert_array_equal(tokens[:, :4, :3], np.asarray(batch.x))
    np.testing.assert_array_equal(tokens[:, :4, 3:5], np.asarray(batch.y))
    np.testing.assert_array_equal(tokens[:, -1, :3], np.asarray(batch.x_query))
    assert np.all(tokens[:, -1, 3:7] == 0.0) and np.all(tokens[:, :, 5:7] == 0.0) and np.all(tokens[:, :, 7] == 1.0)


def test_heavy_ball_params_rejects_a_schedule_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"eta must be a scalar or have shape \(n_steps,\) = \(3,\)"):
        heavy_ball_params(2, [0.1, 0.2], 0.5, 3, 4)
    with pytest.raises(ValueError, match="mu must be"):
        heavy_ball_params(2, 0.1, [0.5, 0.5], 3, 4)
