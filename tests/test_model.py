"""The Transformer (iclgd_synth.model, iclgd_synth.attention): dual form = quadratic form = a loop over tokens of
"Transformers learn in-context by gradient descent", eq. 6, for every architecture switch; the variants run; errors.
"""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

import iclgd_synth as ic
from iclgd_synth import attention as attn
from iclgd_synth.model import forward, layer_norm, predict
from iclgd_synth.tokens import build_tokens, n_context_tokens, read_out

# Jitting the whole prediction compiles one program per shape (~0.1 s) instead of one per eager op (~0.5 s in all).
_predict = jax.jit(predict, static_argnames=("form",))
_forward = jax.jit(forward, static_argnums=(2,), static_argnames=("form", "query_only", "return_all"))


def _max_abs(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def _np_batch(seed: int, b: int, n: int, d: int, out_dim: int = 1) -> ic.TaskBatch:
    """Gaussian tasks drawn with NumPy: no compilation per new shape (the sampler is tested in test_tasks.py)."""
    rng = np.random.default_rng(seed)
    # Token entries of about 0.5: the cubic growth of linear attention keeps several layers O(1).
    x, xq = 0.5 * rng.normal(size=(b, n, d)), 0.5 * rng.normal(size=(b, d))
    w = rng.normal(size=(b, out_dim, d)) / np.sqrt(d)
    y, yq = np.einsum("bod,bnd->bno", w, x), np.einsum("bod,bd->bo", w, xq)
    if out_dim == 1:
        y, yq, w = y[..., 0], yq[..., 0], w[:, 0]
    return ic.TaskBatch(x=x, y=y, x_query=xq, y_query=yq, w=w)


def _random_params(seed: int, config: ic.ModelConfig, n_keys: int, gain: float = 1.0) -> ic.TransformerParams:
    """Random multi-head attention weights (NumPy, float64), scaled so every layer's update is O(1).

    Entries have variance 1 / fan-in; the sum over keys is divided by the key count when the architecture does not
    normalize itself, so the update stays O(1) whatever N is.
    """
    rng = np.random.default_rng(seed)
    dd, h = config.token_dim, config.n_heads
    kq, kv = config.key_size or dd, config.value_size or dd
    factor = gain / (1.0 if config.normalize else n_keys)
    f = config.mlp_width or 4 * dd

    def layer():
        out = {"w_q": rng.normal(size=(h, kq, dd)) / np.sqrt(dd), "w_k": rng.normal(size=(h, kq, dd)) / np.sqrt(dd),
               "w_v": rng.normal(size=(h, kv, dd)) / np.sqrt(dd),
               "w_p": factor * rng.normal(size=(h, dd, kv)) / np.sqrt(kv)}
        if config.layer_norm:
            out["ln_attn"] = {"scale": 1.0 + 0.1 * rng.normal(size=dd), "bias": 0.1 * rng.normal(size=dd)}
        if config.mlp:
            out["mlp"] = {"w_in": rng.normal(size=(dd, f)) / np.sqrt(dd), "b_in": 0.1 * rng.normal(size=f),
                          "w_out": rng.normal(size=(f, dd)) / np.sqrt(f), "b_out": 0.1 * rng.normal(size=dd)}
            if config.layer_norm:
                out["ln_mlp"] = {"scale": 1.0 + 0.1 * rng.normal(size=dd), "bias": 0.1 * rng.normal(size=dd)}
        return out

    layers = tuple(layer() for _ in range(1 if config.recurrent else config.n_layers))
    return ic.TransformerParams(layers=jax.tree.map(jnp.asarray, layers), arch=config.arch())


@functools.partial(jax.jit, static_argnames=("n_ctx", "layout"))
def _both_forms(params, batch, n_ctx, layout):
    """Read-out and full tokens in the dual and the quadratic form: one compiled program per example."""
    tokens = build_tokens(batch, layout)
    return (predict(params, batch, form="dual"), predict(params, batch, form="quadratic"),
            forward(params, tokens, n_ctx, form="dual"), forward(params, tokens, n_ctx, form="quadratic"))


# ----------------------------------------------------------------------------------------------- dual vs quadratic form

@given(
    d=st.integers(1, 4), n=st.integers(1, 6), out_dim=st.integers(1, 2), n_heads=st.integers(1, 3),
    key_size=st.integers(1, 4), value_size=st.integers(1, 4), n_layers=st.integers(1, 3), recurrent=st.booleans(),
    causal=st.booleans(), include_query=st.booleans(), normalize=st.booleans(),
    layout=st.sampled_from(["concat", "interleaved"]), seed=st.integers(0, 2**16),
)
def test_dual_form_equals_quadratic_form(x64, d, n, out_dim, n_heads, key_size, value_size, n_layers, recurrent,
                                         causal, include_query, normalize, layout, seed):
    config = ic.ModelConfig(dim=d, out_dim=out_dim, n_layers=n_layers, recurrent=recurrent, n_heads=n_heads,
                            key_size=key_size, value_size=value_size, causal=causal, include_query=include_query,
                            normalize=normalize, layout=layout)
    batch = _np_batch(seed, 3, n, d, out_dim)
    n_ctx = n_context_tokens(n, layout)
    params = _random_params(seed, config, n_ctx + int(include_query), gain=2.0)
    dual, quad, full_dual, full_quad = _both_forms(params, batch, n_ctx, layout)

    chex.assert_shape(dual, (3, out_dim) if out_dim > 1 else (3,))
    chex.assert_equal_shape([full_dual, full_quad])
    scale = float(jnp.max(jnp.abs(quad)))
    assert scale > 1e-6  # a comparison of two all-zero outputs would prove nothing
    # Three cubic layers can grow an O(1) input to O(1e4) for some draws: the bound is 1e-10 relative to O(1) outputs.
    assert _max_abs(dual, quad) < 1e-10 * max(1.0, scale)
    # The full residual stream, every token, not only the query's read-out.
    assert _max_abs(full_dual, full_quad) < 1e-10 * max(1.0, float(jnp.max(jnp.abs(full_quad))))


@pytest.mark.parametrize("options", [
    dict(n_layers=2, n_heads=3, key_size=2, value_size=3, causal=True, include_query=True, normalize=True),
    dict(n_layers=3, recurrent=True, n_heads=2, layout="interleaved"),
], ids=["deep_multihead_causal_include_query_normalize", "recurrent_interleaved"])
def test_dual_form_equals_quadratic_form_for_init_params(x64, options):
    # init_scale / K = 1: unit-variance projections instead of the training init's tiny ones, so outputs are O(1).
    config = ic.ModelConfig(dim=3, init_scale=float(options["n_layers"]), **options)
    params = ic.init_params(jax.random.PRNGKey(0), config)
    n_ctx = n_context_tokens(6, config.layout)
    factor = 2.0 / (1.0 if config.normalize else n_ctx)
    params = params.replace(layers=tuple({**layer, "w_p": factor * layer["w_p"]} for layer in params.layers))
    dual, quad, full_dual, full_quad = _both_forms(params, _np_batch(3, 4, 6, 3), n_ctx, config.layout)
    assert float(jnp.max(jnp.abs(quad))) > 1e-3
    assert _max_abs(dual, quad) < 1e-10 * max(1.0, float(jnp.max(jnp.abs(quad))))
    assert _max_abs(full_dual, full_quad) < 1e-10 * max(1.0, float(jnp.max(jnp.abs(full_quad))))


def _loop_reference_layer(tokens, layer, n_ctx, *, causal, include_query, normalize, softmax=False):
    """One attention layer by explicit loops over tasks, query tokens j and key tokens i (NumPy, float64)."""
    tokens = np.asarray(tokens, np.float64)
    w_q, w_k, w_v, w_p = (np.asarray(layer[k], np.float64) for k in ("w_q", "w_k", "w_v", "w_p"))
    b_size, t, _ = tokens.shape
    keys = [i for i in range(t) if i < n_ctx or (include_query and i == t - 1)]
    out = tokens.copy()
    for b in range(b_size):
        for j in range(t):
            seen = [i for i in keys if not causal or i <= j]
            for h in range(w_q.shape[0]):
                q = w_q[h] @ tokens[b, j]
                scores = np.array([(w_k[h] @ tokens[b, i]) @ q for i in seen])
                if softmax:
                    logits = scores / np.sqrt(w_q.shape[1])
                    weights = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() if seen else scores
                else:
                    weights = scores / max(len(seen), 1) if normalize else scores
                for weight, i in zip(weights, seen):
                    out[b, j] += weight * (w_p[h] @ (w_v[h] @ tokens[b, i]))
    return out


@pytest.mark.parametrize("causal,include_query,normalize", list(itertools.product([False, True], repeat=3)))
def test_linear_attention_layer_equals_the_token_loop_of_eq6(x64, causal, include_query, normalize):
    d, n = 3, 4
    config = ic.ModelConfig(dim=d, n_heads=2, key_size=3, value_size=2, causal=causal, include_query=include_query,
                            normalize=normalize)
    params = _random_params(1, config, n + 1)
    batch = _np_batch(2, 2, n, d)
    tokens = build_tokens(batch)
    expected = _loop_reference_layer(tokens, params.layers[0], n, causal=causal, include_query=include_query,
                                     normalize=normalize)
    assert np.max(np.abs(expected - np.asarray(tokens))) > 1e-2  # the layer does change the tokens
    for form in ("dual", "quadratic"):
        assert _max_abs(_forward(params, tokens, n, form=form), expected) < 1e-12


@pytest.mark.parametrize("causal,include_query", list(itertools.product([False, True], repeat=2)))
def test_softmax_attention_layer_equals_the_token_loop(x64, causal, include_query):
    d, n = 3, 4
    config = ic.ModelConfig(dim=d, n_heads=2, key_size=3, value_size=2, attention="softmax", causal=causal,
                            include_query=include_query)
    params = _random_params(3, config, 1)
    batch = _np_batch(4, 2, n, d)
    tokens = build_tokens(batch)
    expected = _loop_reference_layer(tokens, params.layers[0], n, causal=causal, include_query=include_query,
                                     normalize=False, softmax=True)
    assert _max_abs(_forward(params, tokens, n), expected) < 1e-12


def test_causal_mask_changes_the_context_tokens_but_not_the_one_layer_query(x64):
    # The query (last token) sees every key with or without the mask, so after one layer only context tokens differ.
    base = ic.ModelConfig(dim=3, n_heads=2)
    batch = _np_batch(5, 4, 6, 3)
    tokens = build_tokens(batch)
    plain = _forward(_random_params(0, base, 6), tokens, 6)
    masked = _forward(_random_params(0, base.replace(causal=True), 6), tokens, 6)
    assert _max_abs(plain[:, :-1], masked[:, :-1]) > 1e-2
    assert _max_abs(plain[:, -1], masked[:, -1]) < 1e-12


def test_query_only_forward_equals_last_token_of_full_forward(x64):
    config = ic.ModelConfig(dim=3, n_layers=3, n_heads=2, causal=True)
    params = _random_params(6, config, 5)
    tokens = build_tokens(_np_batch(6, 4, 5, 3))
    full = _forward(params, tokens, 5)
    query = _forward(params, tokens, 5, query_only=True)
    chex.assert_shape(query, (4, 1, 4))
    assert _max_abs(full[:, -1:], query) < 1e-12
    outs = _forward(params, tokens, 5, return_all=True)
    assert len(outs) == 3
    assert _max_abs(outs[-1], full) < 1e-12


def test_attention_depends_only_on_the_products_kq_and_pv(x64):
    config = ic.ModelConfig(dim=3, n_layers=2, n_heads=1)
    params = _random_params(7, config, 6, gain=2.0)
    batch = _np_batch(7, 8, 6, 3)
    rescaled = params.replace(layers=tuple(
        {"w_q": 2.0 * l["w_q"], "w_k": 0.5 * l["w_k"], "w_v": 4.0 * l["w_v"], "w_p": 0.25 * l["w_p"]}
        for l in params.layers))
    reference = _predict(params, batch)
    assert float(jnp.max(jnp.abs(reference))) > 1e-2
    assert _max_abs(_predict(rescaled, batch), reference) < 1e-12
    kq, pv = zip(*(attn.head_products(l) for l in params.layers))
    rebuilt = ic.from_products(jnp.concatenate(kq), jnp.concatenate(pv), arch=params.arch)
    assert _max_abs(_predict(rebuilt, batch), reference) < 1e-12


def test_softmax_attention_averages_values_when_all_keys_are_equal(x64):
    # Softmax weights sum to one: with identical context tokens the update is P W_V e whatever the logits.
    layer = _random_params(8, ic.ModelConfig(dim=2, attention="softmax", n_heads=2), 1).layers[0]
    e = jnp.array([0.3, -1.2, 0.7])
    tokens = jnp.concatenate([jnp.tile(e, (1, 5, 1)), jnp.array([[[1.0, 2.0, 0.0]]])], axis=1)
    update = jax.jit(lambda t, l: attn.softmax_attention(t, l, attn.key_mask(6, 5, False), query_only=True))(tokens,
                                                                                                            layer)
    expected = jnp.einsum("hdv,hve,e->d", layer["w_p"], layer["w_v"], e)
    assert _max_abs(update[0, 0], expected) < 1e-12


def test_layer_norm_gives_zero_mean_unit_variance_tokens(x64):
    x = np.random.default_rng(9).normal(size=(4, 5, 7)) * 3.0 + 1.0
    y = jax.jit(layer_norm)(x, {"scale": np.ones(7), "bias": np.zeros(7)})
    assert float(jnp.max(jnp.abs(y.mean(-1)))) < 1e-12
    assert float(jnp.max(jnp.abs(y.var(-1) - 1.0))) < 1e-5  # eps = 1e-6 inside the square root


def test_mlp_block_is_a_residual_relu_mlp(x64):
    params = _random_params(10, ic.ModelConfig(dim=3, mlp=True, mlp_width=6), 4)
    layer = {**params.layers[0], "w_p": jnp.zeros_like(params.layers[0]["w_p"])}  # attention switched off
    params = params.replace(layers=(layer,))
    tokens = build_tokens(_np_batch(10, 2, 4, 3))
    m = layer["mlp"]
    expected = tokens + jax.nn.relu(tokens @ m["w_in"] + m["b_in"]) @ m["w_out"] + m["b_out"]
    assert float(jnp.max(jnp.abs(expected - tokens))) > 1e-2
    assert _max_abs(_forward(params, tokens, 4), expected) < 1e-12


def test_clip_bounds_every_token_entry():
    config = ic.ModelConfig(dim=3, n_layers=2, clip=0.5)
    params = _random_params(11, config, 5, gain=50.0)
    tokens = build_tokens(_np_batch(11, 4, 5, 3).validated())
    unclipped = _forward(params.replace(arch=config.replace(clip=None).arch()), tokens, 5)
    assert float(jnp.max(jnp.abs(unclipped))) > 0.5
    assert float(jnp.max(jnp.abs(_forward(params, tokens, 5)))) <= 0.5


# ------------------------------------------------------------------------------------------- variants, with/without jit

_ARCHS = [
    ("linear_multihead_vector_output", dict(n_heads=3, key_size=2, value_size=5, out_dim=2)),
    ("linear_causal_recurrent_interleaved", dict(causal=True, n_layers=2, recurrent=True, layout="interleaved")),
    ("softmax_one_head", dict(attention="softmax")),
    ("softmax_two_heads_causal_include_query", dict(attention="softmax", n_heads=2, causal=True, include_query=True)),
    ("layer_norm", dict(layer_norm=True)),
    ("mlp", dict(mlp=True, mlp_width=8)),
    ("layer_norm_mlp_softmax_clip", dict(layer_norm=True, mlp=True, attention="softmax", clip=10.0, n_layers=2)),
]


class ModelVariantsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_ARCHS)
    def test_predict_has_the_read_out_shape_is_finite_and_jit_invariant(self, options):
        config = ic.ModelConfig(dim=4, **options)
        params = jax.tree.map(lambda a: a.astype(jnp.float32), _random_params(0, config, 6))
        batch = _np_batch(1, 5, 6, 4, config.out_dim).validated()
        out = self.variant(predict)(params, batch)
        chex.assert_shape(out, (5, config.out_dim) if config.out_dim > 1 else (5,))
        chex.assert_tree_all_finite(out)
        assert float(jnp.max(jnp.abs(out))) > 1e-4  # the attention did something
        chex.assert_trees_all_close(out, _predict(params, batch), atol=1e-5, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("deep", False), ("recurrent", True))
    def test_layer_predictions_has_one_read_out_per_layer_application(self, recurrent):
        config = ic.ModelConfig(dim=3, n_layers=3, recurrent=recurrent, n_heads=2, key_size=5, value_size=4)
        params = jax.tree.map(lambda a: a.astype(jnp.float32), _random_params(2, config, 5))
        batch = _np_batch(1, 6, 5, 3).validated()
        per_layer = self.variant(ic.layer_predictions)(params, batch)
        chex.assert_shape(per_layer, (3, 6))
        chex.assert_tree_all_finite(per_layer)
        chex.assert_trees_all_close(per_layer[-1], _predict(params, batch), atol=1e-6)
        assert float(jnp.min(jnp.abs(per_layer[0] - per_layer[1]))) > 0.0  # every layer moves the read-out


@pytest.mark.parametrize("options", [
    dict(n_layers=3, n_heads=2, key_size=5, value_size=4),
    dict(n_layers=3, recurrent=True, n_heads=2, key_size=5, value_size=4),
    dict(n_layers=1, layer_norm=True, mlp=True, mlp_width=7),
], ids=["deep", "recurrent", "layer_norm_mlp"])
def test_init_params_shapes(options):
    config = ic.ModelConfig(dim=3, **options)
    params = ic.init_params(jax.random.PRNGKey(0), config)
    n_layers, recurrent = config.n_layers, config.recurrent
    assert len(params.layers) == (1 if recurrent else n_layers)
    assert params.arch.n_loops == (n_layers if recurrent else 1)
    assert params.depth == n_layers and params.token_dim == 4 and params.n_heads == config.n_heads
    h, kq, kv = config.n_heads, config.key_size or 4, config.value_size or 4
    for layer in params.layers:
        chex.assert_shape([layer["w_q"], layer["w_k"], layer["w_v"], layer["w_p"]],
                          [(h, kq, 4), (h, kq, 4), (h, kv, 4), (h, 4, kv)])
        if config.mlp:
            chex.assert_shape([layer["mlp"]["w_in"], layer["mlp"]["w_out"], layer["ln_attn"]["scale"],
                               layer["ln_mlp"]["bias"]], [(4, 7), (7, 4), (4,), (4,)])
    chex.assert_tree_all_finite(params)
    batch = _np_batch(1, 6, 5, 3).validated()
    chex.assert_shape(_predict(params, batch), (6,))


# --------------------------------------------------------------------------------------------------------------- errors

@pytest.fixture
def small():
    return _np_batch(0, 4, 5, 3).validated(), ic.gd_params(3, 1.0, 2)


def test_lsa_predict_rejects_labels_of_the_wrong_length(small):
    batch, params = small
    with pytest.raises(ValueError, match=r"batch\.y must have shape"):
        predict(params, batch.replace(y=batch.y[:, :4]))
    with pytest.raises(ValueError, match=r"batch\.x_query"):
        predict(params, batch.replace(x_query=batch.x_query[:, :2]))
    with pytest.raises(ValueError, match=r"batch\.y_query"):
        predict(params, batch.replace(y_query=batch.y_query[:3]))


def test_lsa_predict_rejects_params_whose_token_size_does_not_match_the_batch(small):
    batch, _ = small
    for params in (ic.gd_params(4, 1.0), ic.gd_params(3, 1.0, out_dim=2)):
        with pytest.raises(ValueError, match="params expect tokens of size D"):
            params(batch)
        with pytest.raises(ValueError, match="params expect tokens of size D"):
            ic.layer_predictions(params, batch)


def test_lsa_predict_rejects_malformed_params(small):
    batch, params = small
    with pytest.raises(TypeError, match="params must be"):
        predict({"layers": params.layers}, batch)
    with pytest.raises(ValueError, match="params.layers"):
        predict(params.replace(layers=()), batch)
    bad = {**params.layers[0], "w_k": params.layers[0]["w_k"][:, :, :3]}
    with pytest.raises(ValueError, match="w_k"):
        predict(params.replace(layers=(bad,)), batch)
    with pytest.raises(ValueError, match="lacks.*w_v"):
        predict(params.replace(layers=({k: v for k, v in params.layers[0].items() if k != "w_v"},)), batch)


def test_lsa_predict_rejects_unknown_form_and_bad_w0(small):
    batch, params = small
    with pytest.raises(ValueError, match="form"):
        predict(params, batch, form="fast")
    with pytest.raises(ValueError, match="w0"):
        predict(params, batch, w0=jnp.zeros(4))
    interleaved = params.replace(arch=ic.Arch(layout="interleaved"))
    with pytest.raises(ValueError, match="w0"):
        predict(interleaved, batch, w0=jnp.zeros(3))


@pytest.mark.parametrize("name,value", [
    ("n_heads", 0), ("n_layers", 0), ("dim", 0), ("attention", "relu"), ("layout", "stacked"), ("clip", 0.0),
    ("init_scale", -1.0), ("key_size", 0),
])
def test_model_config_rejects_bad_fields(name, value):
    with pytest.raises((ValueError, TypeError), match=name):
        ic.ModelConfig(**{name: value})


# ----------------------------------------------------------------------------------------------------- token layouts

def _tiny_batch(out_dim: int) -> ic.TaskBatch:
    """B = 2 tasks, N = 2 pairs, d = 3, with every entry distinct so a misplaced entry cannot go unnoticed."""
    x = np.arange(1.0, 13.0).reshape(2, 2, 3)
    xq = -np.arange(1.0, 7.0).reshape(2, 3)
    y = 100.0 + np.arange(4.0 * out_dim).reshape(2, 2, out_dim)
    yq = 200.0 + np.arange(2.0 * out_dim).reshape(2, out_dim)
    if out_dim == 1:
        y, yq = y[..., 0], yq[..., 0]
    return ic.TaskBatch(x=x, y=y, x_query=xq, y_query=yq).validated()


@pytest.mark.parametrize("out_dim", [1, 2])
def test_concat_tokens_are_context_pairs_then_the_query_with_zero_y_part(x64, out_dim):
    batch = _tiny_batch(out_dim)
    y = np.asarray(batch.labels_BxNxO())
    tokens = np.asarray(build_tokens(batch, "concat"))
    chex.assert_shape(tokens, (2, 3, 3 + out_dim))  # T = N + 1, D = d + d_out
    expected = np.zeros((2, 3, 3 + out_dim))
    for b in range(2):
        for i in range(2):
            expected[b, i] = np.concatenate([batch.x[b, i], y[b, i]])  # e_i = (x_i, y_i)
        expected[b, 2] = np.concatenate([batch.x_query[b], np.zeros(out_dim)])  # e_q = (x_q, 0), last
    np.testing.assert_array_equal(tokens, expected)
    assert n_context_tokens(2, "concat") == 2


@pytest.mark.parametrize("out_dim", [1, 2])
def test_concat_query_token_carries_minus_w0_x_query(x64, out_dim):
    # "Transformers learn in-context by gradient descent": with an initial model W0 the query is (x_q, -W0 x_q).
    batch = _tiny_batch(out_dim)
    w0 = np.arange(1.0, 1.0 + 3 * out_dim).reshape(out_dim, 3) / 10.0
    tokens = np.asarray(build_tokens(batch, "concat", w0=w0 if out_dim > 1 else w0[0]))
    for b in range(2):
        np.testing.assert_allclose(tokens[b, 2, 3:], -w0 @ np.asarray(batch.x_query[b]), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(tokens[b, 2, :3], batch.x_query[b])
    np.testing.assert_array_equal(tokens[:, :2], np.asarray(build_tokens(batch, "concat"))[:, :2])  # context as is
    per_task = np.stack([w0, 2 * w0])  # a batched (B, d_out, d) W0
    tokens = np.asarray(build_tokens(batch, "concat", w0=per_task))
    np.testing.assert_allclose(tokens[1, 2, 3:], -2 * w0 @ np.asarray(batch.x_query[1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("out_dim", [1, 2])
def test_interleaved_tokens_are_x1_then_0_y1_and_so_on_then_the_query(x64, out_dim):
    batch = _tiny_batch(out_dim)
    y = np.asarray(batch.labels_BxNxO())
    tokens = np.asarray(build_tokens(batch, "interleaved"))
    chex.assert_shape(tokens, (2, 5, 3 + out_dim))  # T = 2N + 1
    expected = np.zeros((2, 5, 3 + out_dim))
    for b in range(2):
        for i in range(2):
            expected[b, 2 * i, :3] = batch.x[b, i]  # (x_i, 0)
            expected[b, 2 * i + 1, 3:] = y[b, i]  # (0, y_i)
        expected[b, 4, :3] = batch.x_query[b]  # (x_q, 0), last
    np.testing.assert_array_equal(tokens, expected)
    assert n_context_tokens(2, "interleaved") == 4


def test_read_out_is_minus_the_y_part_of_the_last_token():
    tokens = jnp.arange(2 * 3 * 5.0).reshape(2, 3, 5)
    chex.assert_trees_all_equal(read_out(tokens, 3, False), -tokens[:, -1, 3])
    chex.assert_trees_all_equal(read_out(tokens, 3, True), -tokens[:, -1, 3:])


# ----------------------------------------------------------------------------------------- compiled once, then reused

@pytest.mark.parametrize("options", [dict(recurrent=True), dict(recurrent=False)], ids=["recurrent", "deep"])
def test_repeated_eager_lsa_predict_compiles_nothing_new(options, compiles_of):
    # The recurrent path used to build a fresh fori_loop closure per call, so every eager call recompiled it.
    def run(params, batch):  # the prediction, and the forward pass on given tokens
        return params(batch), ic.forward(params, build_tokens(batch), 7)

    params, batch = ic.gd_params(4, 0.3, 4, **options), _np_batch(3, 9, 7, 4).validated()
    first, _ = run(params, batch)
    # Same architecture and shapes, new weights and tasks.
    new_params, new_batch = ic.gd_params(4, 0.4, 4, **options), _np_batch(4, 9, 7, 4).validated()
    (second, _), compiled = compiles_of(lambda: run(new_params, new_batch))
    assert compiled == []
    chex.assert_shape([first, second], (9,))
    chex.assert_trees_all_close(first, ic.GD(eta=0.3, steps=4)(batch), atol=1e-5, rtol=1e-5)  # still 4 GD steps


@given(d=st.sampled_from([1, 4]), n=st.sampled_from([2, 6]), heads=st.sampled_from([1, 3]), causal=st.booleans(),
       include_query=st.booleans(), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_query_only_dual_update_equals_the_quadratic_form(x64, d, n, heads, causal, include_query, normalize, seed):
    # The query-only dual path never forms C (two matrix-vector passes); it must equal the O(T^2) reference.
    rng = np.random.default_rng(seed)
    dd, kq = d + 1, int(rng.integers(1, 4))
    layer = {name: jnp.asarray(rng.normal(size=shape)) for name, shape in
             (("w_q", (heads, kq, dd)), ("w_k", (heads, kq, dd)), ("w_v", (heads, dd, dd)), ("w_p", (heads, dd, dd)))}
    tokens = jnp.asarray(rng.normal(size=(3, n + 1, dd)))
    keys = attn.key_mask(n + 1, n, include_query)
    kw = dict(causal=causal, normalize=normalize, query_only=True)
    dual = attn.linear_attention_dual(tokens, layer, keys, **kw)
    quad = attn.linear_attention_quadratic(tokens, layer, keys, **kw)
    chex.assert_shape(dual, (3, 1, dd))
    assert dual.dtype == jnp.float64
    assert float(jnp.max(jnp.abs(quad))) > 1e-3
    chex.assert_trees_all_close(dual, quad, rtol=1e-12, atol=1e-12)
