"""The Transformer as a Flax NNX module (iclgd_synth.flax_module): hand-constructed GD weights inside the module equal
explicit GD in float64, parameters round-trip exactly with TransformerParams, and an optax step through the module
equals the same step on the pytree."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import iclgd_synth as ic
from iclgd_synth.flax_module import FlaxTransformer, from_flax, to_flax
from iclgd_synth.model import predict
from iclgd_synth.weights.loaders import params_source
from conftest import uniform_batch


_batch = uniform_batch


# sizes drawn once at random from small sets (d, N, K, d_out, recurrent, 1/N in P), then fixed: one compile each
_CASES = [(3, 7, 2, 1, False, True), (6, 4, 3, 2, True, False), (5, 5, 4, 1, True, True)]


@pytest.mark.parametrize("d, n, steps, out_dim, recurrent, n_in_weights", _CASES)
def test_module_on_hand_weights_equals_explicit_gd_in_float64(x64, d, n, steps, out_dim, recurrent, n_in_weights):
    rng = np.random.default_rng(d * 100 + n)
    eta = float(rng.uniform(0.2, 2.0))
    batch = _batch(d + n, 64, n, d, out_dim)
    model = to_flax(ic.gd_params(d, eta, steps, n_context=n if n_in_weights else None, out_dim=out_dim,
                                 recurrent=recurrent))
    assert isinstance(model, nnx.Module) and model.layers[0].w_q[...].dtype == jnp.float64
    explicit = ic.GD(eta=eta, steps=steps)(batch)
    chex.assert_equal_shape([model(batch), explicit])
    assert float(jnp.max(jnp.abs(explicit))) > 1e-3  # all-zero outputs would prove nothing
    np.testing.assert_allclose(model(batch), explicit, rtol=0, atol=1e-10)


def _rich_params(seed: int = 0) -> ic.TransformerParams:
    """Two layers of two heads, unequal key / value sizes, LayerNorms and an MLP, softmax attention looped twice (NumPy
    draws: nothing to compile)."""
    rng = np.random.default_rng(seed)
    h, kq, kv, dd, f = 2, 4, 3, 5, 6

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)

    layers = tuple({"w_q": arr(h, kq, dd), "w_k": arr(h, kq, dd), "w_v": arr(h, kv, dd), "w_p": arr(h, dd, kv),
                    "ln_attn": {"scale": arr(dd), "bias": arr(dd)}, "ln_mlp": {"scale": arr(dd), "bias": arr(dd)},
                    "mlp": {"w_in": arr(dd, f), "b_in": arr(f), "w_out": arr(f, dd), "b_out": arr(dd)}}
                   for _ in range(2))
    return ic.TransformerParams(layers=layers, arch=ic.Arch(n_loops=2, attention="softmax", causal=True))


def test_parameters_round_trip_exactly_both_ways():
    params = _rich_params()
    model = to_flax(params)
    back = from_flax(model)
    assert back.arch == params.arch
    assert jax.tree.structure(back) == jax.tree.structure(params)
    chex.assert_trees_all_equal(back, params)
    # module -> params -> module: the same Flax state, names included
    again = to_flax(back)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(again, nnx.Param)),
                                nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(state["layers"][0]) == {"w_q", "w_k", "w_v", "w_p", "ln_attn", "ln_mlp", "mlp"}
    assert set(state["layers"][1]["mlp"]) == {"w_in", "b_in", "w_out", "b_out"}
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 5)), jnp.float32)
    np.testing.assert_array_equal(model.forward(tokens, 3), ic.forward(params, tokens, 3))


def test_a_module_from_a_config_draws_what_init_params_draws(key):
    config = ic.ModelConfig(dim=4, n_layers=3, recurrent=True, n_heads=2)
    model = FlaxTransformer(config, rngs=nnx.Rngs(params=key))
    chex.assert_trees_all_equal(from_flax(model), ic.init_params(nnx.Rngs(params=key).params(), config))
    assert len(model.layers) == 1 and model.arch.n_loops == 3


def test_an_optax_step_through_the_module_equals_the_step_on_the_pytree(x64, key):
    """nnx.Optimizer on the module and optax on TransformerParams take the same step; a few steps lower the loss, and
    the trained module drops back into the package's metrics."""
    config = ic.ModelConfig(dim=4, n_layers=2, init_scale=0.2)
    params = ic.init_params(key, config, jnp.float64)
    batch = _batch(1, 128, 6, 4)
    tx = optax.adam(1e-2)

    def loss_params(p):
        return ic.half_mse(predict(p, batch), batch.y_query)

    grads = jax.grad(loss_params)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)

    model = to_flax(params)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: ic.half_mse(m(batch), batch.y_query))(model)
        opt.update(model, g)
        return loss

    first = step(model, opt)
    assert float(first) == pytest.approx(float(loss_params(params)), rel=1e-12)
    chex.assert_trees_all_close(from_flax(model), expected, rtol=1e-12, atol=1e-15)
    for _ in range(20):
        last = step(model, opt)
    trained = from_flax(model)
    assert float(last) < 0.9 * float(first)
    assert float(loss_params(trained)) < float(last)  # the loss is the pytree's too, after the last update
    stats = params_source(trained, "flax-trained").read_layer(1)  # and its weights enter the weight statistics
    np.testing.assert_array_equal(stats.w_o,
                                  np.asarray(trained.layers[1]["w_p"], np.float32))


def test_bad_inputs_name_what_to_pass():
    with pytest.raises(ValueError, match="pass rngs"):
        FlaxTransformer(ic.ModelConfig(dim=2))
    with pytest.raises(TypeError, match="ModelConfig or iclgd_synth.TransformerParams"):
        FlaxTransformer({"w_q": np.zeros((1, 2, 2))})
    with pytest.raises(TypeError, match="params must be iclgd_synth.TransformerParams"):
        to_flax([np.zeros((1, 2, 2))])
    with pytest.raises(TypeError, match="needs no conversion"):
        from_flax(ic.gd_params(2, 1.0))
    with pytest.raises(ValueError, match=r"lacks \['w_p'\]"):
        FlaxTransformer(ic.TransformerParams(layers=({"w_q": np.zeros((1, 2, 2)), "w_k": np.zeros((1, 2, 2)),
                                                      "w_v": np.zeros((1, 2, 2))},)))
