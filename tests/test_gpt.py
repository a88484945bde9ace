"""The GPT-style regression model (iclgd_synth.gpt): configuration errors, the GPT-2 initialisation, shapes, strict
causality (a later token never changes an earlier prediction), agreement of the query predictor, the two losses with
their definitions, and a tiny Adam run that lowers each objective."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import iclgd_synth as ic
from iclgd_synth.gpt import (
    GPT_PRESETS, GPTConfig, GPTParams, gpt_forward, gpt_loss, gpt_predict, icl_loss, init_gpt, next_token_loss,
    position_losses,
)
from iclgd_synth.learners.prefix import per_position_half_mse

# One tiny architecture per attention kind (with and without learned positions), shared by every test here.
TINY = GPTConfig(dim=3, n_context=5, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2)


def _tiny(attention: str = "softmax", positions: bool = True, seed: int = 0, **changes) -> GPTParams:
    return init_gpt(jax.random.PRNGKey(seed), TINY.replace(attention=attention, positions=positions, **changes))


def _tasks(seed: int, b: int = 8, n: int = 5, d: int = 3, **options) -> ic.TaskBatch:
    return ic.sample_tasks(jax.random.PRNGKey(seed), b, n, d, x_dist="normal", **options)


# ------------------------------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize("changes, match", [
    ({"d_model": 10, "n_heads": 4}, "d_model must be a multiple of n_heads"),
    ({"attention": "relu"}, "attention must be one of 'softmax', 'linear'"),
    ({"n_layers": 0}, "n_layers must be an integer >= 1"),
    ({"mlp_ratio": 0}, "mlp_ratio must be an integer >= 1"),
    ({"init_std": 0.0}, r"init_std must be in \(0.0, inf\]"),
    ({"positions": "yes"}, "positions must be True or False"),
    ({"dtype": "int32"}, "dtype must be a float dtype"),
    ({"n_context": 0}, "n_context must be an integer >= 1"),
])
def test_bad_config_raises_an_error_naming_the_field(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TINY.replace(**changes)


def test_presets_are_the_testbed_sizes():
    def sizes(c):
        return c.dim, c.n_context, c.n_layers, c.d_model, c.n_heads

    garg, raventos = GPT_PRESETS["garg"], GPT_PRESETS["raventos"]
    assert sizes(garg) == (20, 40, 12, 256, 8) and sizes(raventos) == (8, 16, 8, 128, 2)
    assert garg.n_tokens == 81 and garg.head_dim == 32 and garg.mlp_width == 1024


def test_init_follows_the_gpt2_conventions():
    config = GPTConfig(dim=4, n_context=6, d_model=256, n_layers=3, n_heads=4)
    w = init_gpt(jax.random.PRNGKey(0), config).weights
    blocks = w["blocks"]
    for name in ("w_q", "w_k", "w_v", "w_in"):
        assert abs(float(jnp.std(blocks[name])) / 0.02 - 1) < 0.02, name
    for name in ("w_o", "w_out"):  # residual projections: 0.02 / sqrt(2 L)
        assert abs(float(jnp.std(blocks[name])) / (0.02 / np.sqrt(6)) - 1) < 0.02, name
    assert abs(float(jnp.std(w["pos"])) / 0.02 - 1) < 0.05
    chex.assert_shape(w["pos"], (13, 256))
    chex.assert_shape(blocks["w_in"], (3, 256, 1024))
    for ln in (blocks["ln_attn"], blocks["ln_mlp"], w["ln_f"]):
        assert np.all(np.asarray(ln["scale"]) == 1.0) and np.all(np.asarray(ln["bias"]) == 0.0)
    for name in ("b_q", "b_k", "b_v", "b_o", "b_in", "b_out"):
        assert np.all(np.asarray(blocks[name]) == 0.0), name
    assert "pos" not in _tiny("linear", positions=False).weights


# -------------------------------------------------------------------------------------------------------------- shapes

def test_forward_gives_one_prediction_per_x_token():
    params = _tiny()
    batch = _tasks(0)
    chex.assert_shape(gpt_forward(params, batch), (8, 6))
    chex.assert_shape(params(batch), (8,))
    chex.assert_shape(gpt_forward(params, _tasks(0, n=2)), (8, 3))  # shorter contexts use the first positions
    vector = _tiny(out_dim=2)
    chex.assert_shape(gpt_forward(vector, _tasks(0, out_dim=2)), (8, 6, 2))
    chex.assert_shape(vector(_tasks(0, out_dim=2)), (8, 2))
    unbounded = _tiny("linear", positions=False)
    chex.assert_shape(gpt_forward(unbounded, _tasks(0, n=7)), (8, 8))  # no positions: any length


def test_bad_inputs_raise_clear_errors():
    params = _tiny()
    with pytest.raises(ValueError, match="learned positions for n_context = 5 pairs, the batch has N = 7"):
        gpt_forward(params, _tasks(0, n=7))
    with pytest.raises(ValueError, match="built for d = 3, d_out = 1; the batch has d = 2"):
        gpt_forward(params, _tasks(0, d=2))
    with pytest.raises(ValueError, match="an odd count T = 2n \\+ 1, got T = 4"):
        gpt_forward(params, jnp.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="D = d \\+ d_out = 4"):
        gpt_forward(params, jnp.zeros((2, 5, 3)))
    with pytest.raises(TypeError, match="params must be iclgd_synth.gpt.GPTParams"):
        gpt_forward(params.weights, _tasks(0))
    with pytest.raises(ValueError, match="objective must be one of 'icl', 'next_token'"):
        gpt_loss(params, _tasks(0), "last")


# ----------------------------------------------------------------------------------------------------------- causality

@given(arch=st.sampled_from([("softmax", True), ("linear", False)]), t=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_changing_later_tokens_never_changes_an_earlier_prediction(arch, t, seed):
    params = _tiny(*arch)
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(4, 11, 4)).astype(np.float32)
    changed = tokens.copy()
    changed[:, t + 1:] = 10 * rng.normal(size=changed[:, t + 1:].shape)  # every token after token t
    before, after = np.asarray(gpt_forward(params, tokens)), np.asarray(gpt_forward(params, changed))
    seen = t // 2 + 1  # x tokens at indices 0, 2, ..., t: predictions for y_1 .. y_seen
    np.testing.assert_array_equal(after[:, :seen], before[:, :seen])  # exactly, not approximately
    assert np.max(np.abs(after[:, -1] - before[:, -1])) > 1e-4  # and the later ones do react


def test_a_truncated_context_predicts_what_the_full_forward_reads_at_that_position():
    params = _tiny()
    batch = _tasks(3)
    full = np.asarray(gpt_forward(params, batch))
    tokens = ic.build_tokens(batch, "interleaved")
    np.testing.assert_array_equal(np.asarray(gpt_forward(params, tokens)), full)  # tokens or batch: the same
    n = 2  # the first n pairs and x_{n+1} as the query
    short = ic.TaskBatch(x=batch.x[:, :n], y=batch.y[:, :n], x_query=batch.x[:, n], y_query=batch.y[:, n])
    np.testing.assert_allclose(np.asarray(params(short)), full[:, n], atol=1e-6)
    np.testing.assert_allclose(np.asarray(gpt_forward(params, tokens[:, :1]))[:, 0], full[:, 0], atol=1e-6)  # x_1


def test_query_predictor_is_the_last_column_and_seeds_vmap():
    params = _tiny()
    batch = _tasks(1)
    np.testing.assert_array_equal(np.asarray(params(batch)), np.asarray(gpt_forward(params, batch))[:, -1])
    np.testing.assert_array_equal(np.asarray(gpt_predict(params, batch)), np.asarray(params(batch)))
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    stacked = jax.vmap(lambda k: init_gpt(k, params.config))(keys)
    preds = jax.vmap(lambda p: gpt_forward(p, batch))(stacked)
    chex.assert_shape(preds, (2, 8, 6))
    for i in range(2):
        one = init_gpt(keys[i], params.config)
        np.testing.assert_allclose(preds[i], gpt_forward(one, batch), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("out_dim", [1, 2])
def test_losses_are_half_mean_squared_errors_of_the_query_and_of_every_position(out_dim):
    params = _tiny(out_dim=out_dim)
    batch = _tasks(2, out_dim=out_dim)
    pred = np.asarray(gpt_forward(params, batch), np.float64)
    pred = pred if out_dim > 1 else pred[..., None]
    y = np.asarray(batch.labels_BxNxO(), np.float64)
    target = np.concatenate([y, np.asarray(batch.query_labels_BxO(), np.float64)[:, None]], axis=1)
    sq = ((pred - target) ** 2).sum(-1)  # (B, N + 1)
    assert float(gpt_loss(params, batch, "icl")) == pytest.approx(0.5 * sq[:, -1].mean(), rel=1e-5)
    assert float(gpt_loss(params, batch, "next_token")) == pytest.approx(0.5 * sq.mean(), rel=1e-5)
    np.testing.assert_allclose(position_losses(params, batch), 0.5 * sq.mean(0), rtol=1e-5)
    np.testing.assert_allclose(per_position_half_mse(gpt_forward(params, batch), batch), 0.5 * sq.mean(0), rtol=1e-5)


def test_a_tiny_adam_run_lowers_each_objective():
    # A fixed task (pool of one) is learnable in a few dozen steps: the check is that gradients reach every part of
    # the model under either objective, not in-context learning. Both objectives share one compiled run
    # (lax.switch on the objective's index), which halves the compile time of this test.
    task = ic.TaskConfig(dim=3, n_context=5, x_dist="normal", pool_size=1)
    params = _tiny()
    objectives = [icl_loss, next_token_loss]
    optimizer = optax.adam(1e-2)
    steps, size = 60, 32
    data = ic.sample(jax.random.PRNGKey(1), task, steps * size)
    data = jax.tree.map(lambda a: a.reshape(steps, size, *a.shape[1:]), data)

    @jax.jit
    def run(params, which):
        def step(carry, batch):
            p, opt = carry
            loss, grads = jax.value_and_grad(lambda q: jax.lax.switch(which, objectives, q, batch))(p)
            updates, opt = optimizer.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), loss

        (p, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), data)
        return p, losses

    held_out = ic.sample(jax.random.PRNGKey(2), task, 256)
    target = np.concatenate([np.asarray(held_out.y), np.asarray(held_out.y_query)[:, None]], axis=1)

    def held_out_losses(p):  # (ICL, next-token) from one forward pass
        sq = (np.asarray(gpt_forward(p, held_out)) - target) ** 2
        return np.array([0.5 * sq[:, -1].mean(), 0.5 * sq.mean()])

    before = held_out_losses(params)
    for which in range(2):
        trained, losses = run(params, which)
        assert np.all(np.isfinite(np.asarray(losses)))
        after = held_out_losses(trained)
        assert after[which] < 0.3 * before[which], (objectives[which].__name__, before, after)
