"""Fine-tuning of zero-shot copies (iclgd_synth.critiques.finetune) and the layer-causality control
(iclgd_synth.critiques.causality): the hand K-layer GD model's per-layer updates are reproduced exactly by
forward-order adapter fine-tuning and only at layer 1 by standard fine-tuning; layer-causal gradients stay local."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iclgd_synth as ic
from iclgd_synth.critiques import causality as CA
from iclgd_synth.critiques import finetune as F


@jax.jit
def _hand_updates(batch, eta):
    """Per-layer query updates of the hand model (ICL) and of its adapter fine-tuned copies, 1 step of size eta."""
    k = 3 if batch.n_context % 2 else 2  # the depth is static through the batch shape (see the test)
    params = ic.gd_params(batch.dim, eta, n_layers=k, n_context=batch.n_context)
    zs = F.zero_shot_copy(params, batch.dim)
    first = F.lone_tokens(batch.x_query, 1)
    icl, _ = F.icl_query_pass(params, batch)
    out = {"icl": F.layer_updates(icl, first)}
    for mode in F.MODES:
        toks, _ = F.per_task_query_pass(F.finetune(zs, batch, eta, param_set="adapters", mode=mode, steps=1), batch)
        out[mode] = F.layer_updates(toks, first)
    return out


@settings(max_examples=3)
@given(d=st.integers(1, 5), n=st.integers(2, 9), eta=st.floats(0.2, 2.0), seed=st.integers(0, 1000))
def test_forward_order_adapter_finetuning_reproduces_the_hand_gd_layers(x64, d, n, eta, seed):
    batch = ic.sample_tasks(jax.random.PRNGKey(seed), 6, n, d, x_dist="normal")
    u = {k: np.asarray(v) for k, v in _hand_updates(batch, eta).items()}
    scale = np.abs(u["icl"]).max()
    assert scale > 1e-4
    # ICL's layer l is the l-th GD step: -(w_l - w_{l-1}) x_q in the y-entry, nothing else.
    k = u["icl"].shape[0]
    w_prev = np.zeros((6, d))
    for l in range(k):
        w_l = np.asarray(ic.gd_weights(batch, eta, l + 1))[:, 0]
        step = np.einsum("bd,bd->b", w_l - w_prev, np.asarray(batch.x_query))
        np.testing.assert_allclose(u["icl"][l][:, d], -step, atol=1e-10 * max(1.0, scale))
        w_prev = w_l
    assert np.abs(u["forward_order"] - u["icl"]).max() < 1e-10 * max(1.0, scale)
    for mode in ("standard", "layer_causal"):
        assert np.abs(u[mode][0] - u["icl"][0]).max() < 1e-10 * max(1.0, scale)   # layer 1 agrees
        assert np.abs(u[mode][1] - u["icl"][1]).max() > 1e-6 * scale             # layer 2 does not
        np.testing.assert_allclose(u[mode][1], u[mode][0], atol=1e-12 * max(1.0, scale))  # every layer = step 1


def test_zero_shot_copy_equals_the_model_on_a_lone_query(x64):
    params = ic.init_params(jax.random.PRNGKey(0), ic.ModelConfig(dim=3, n_layers=2, include_query=True,
                                                                  init_scale=2.0))
    batch = ic.sample_tasks(jax.random.PRNGKey(1), 5, 4, 3, x_dist="normal")
    zs = F.zero_shot_copy(params, 3)
    toks, _ = F.shared_query_pass(zs, batch)
    lone = F.lone_tokens(batch.x_query, 1)[:, None]
    ref = ic.forward(params, lone, 0, return_all=True)
    for l in range(2):
        np.testing.assert_allclose(np.asarray(toks[l]), np.asarray(ref[l][:, 0]), atol=1e-13)
    assert np.abs(np.asarray(toks[-1] - lone[:, 0])).max() > 1e-4  # the lone query does attend to itself


def test_icl_query_pass_matches_forward_and_recurrent_models_are_unrolled(x64):
    params = ic.init_params(jax.random.PRNGKey(2), ic.ModelConfig(dim=2, n_layers=3, recurrent=True,
                                                                  init_scale=3.0))
    batch = ic.sample_tasks(jax.random.PRNGKey(3), 4, 5, 2, x_dist="normal")
    toks, scores = F.icl_query_pass(params, batch)
    ref = ic.forward(params, ic.build_tokens(batch), 5, return_all=True)
    assert toks.shape == (3, 4, 3)
    np.testing.assert_allclose(np.asarray(toks), np.stack([np.asarray(r[:, -1]) for r in ref]), atol=1e-13)
    assert float(jnp.max(jnp.abs(scores))) == 0.0  # the query is not a key
    assert F.zero_shot_copy(params, 2).depth == 3


def _layer1_grad(model, batch, mode):
    def loss(theta):
        return F.task_loss(F.insert_params(model, theta, "attention"), batch.x[0], batch.labels_BxNxO()[0], mode)

    return jax.grad(loss)(F.select_params(model, "attention"))["kv"][0][1]


def test_layer_causal_gradients_do_not_see_later_layers(x64):
    config = ic.ModelConfig(dim=3, n_layers=2, include_query=True, init_scale=2.0)
    params = ic.init_params(jax.random.PRNGKey(4), config)
    other = params.replace(layers=(params.layers[0], ic.init_params(jax.random.PRNGKey(5), config).layers[1]))
    batch = ic.sample_tasks(jax.random.PRNGKey(6), 1, 6, 3, x_dist="normal")
    m1, m2 = F.zero_shot_copy(params, 3), F.zero_shot_copy(other, 3)
    # Layer 1's W_V gradient: the same whatever layer 2 is under layer-causal FT, different under standard FT.
    lc = np.abs(np.asarray(_layer1_grad(m1, batch, "layer_causal") - _layer1_grad(m2, batch, "layer_causal"))).max()
    st_ = np.abs(np.asarray(_layer1_grad(m1, batch, "standard") - _layer1_grad(m2, batch, "standard"))).max()
    assert lc < 1e-14
    assert st_ > 1e-8


def test_random_like_update_keeps_the_update_norm(x64):
    params = ic.gd_params(3, 1.0, n_layers=2, n_context=5)
    batch = ic.sample_tasks(jax.random.PRNGKey(7), 4, 5, 3)
    zs = F.zero_shot_copy(params, 3)
    tuned = F.finetune(zs, batch, 1.0, param_set="adapters", mode="standard", steps=1)
    rand = F.random_like_update(jax.random.PRNGKey(0), tuned, zs, "adapters")
    n_t = np.linalg.norm(np.asarray(tuned.adapters).reshape(4, -1), axis=1)
    n_r = np.linalg.norm(np.asarray(rand.adapters).reshape(4, -1), axis=1)
    np.testing.assert_allclose(n_r, n_t, rtol=1e-12)
    assert np.abs(np.asarray(rand.adapters - tuned.adapters)).max() > 1e-3


def test_finetune_options_are_validated():
    params = ic.gd_params(2, 1.0, n_context=3)
    zs = F.zero_shot_copy(params, 2)
    batch = ic.sample_tasks(jax.random.PRNGKey(0), 2, 3, 2)
    with pytest.raises(ValueError):
        F.finetune(zs, batch, 0.1, param_set="everything")
    with pytest.raises(ValueError):
        F.finetune(zs, batch, 0.1, mode="sideways")
    with pytest.raises(ValueError, match="attention-only"):
        F.zero_shot_copy(ic.init_params(jax.random.PRNGKey(0), ic.ModelConfig(dim=2, mlp=True)), 2)


def test_hand_control_report_numbers(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(8), 32, 6, 3)
    r = CA.hand_control(3, 2, 2.0, batch, 6)
    assert max(r["forward_order"]["max_abs_diff"]) < 1e-12
    assert r["forward_order"]["simaou"] == pytest.approx([1.0, 1.0])
    assert r["standard"]["rel_distance"][0] < 1e-12 and r["standard"]["rel_distance"][1] > 1e-2
