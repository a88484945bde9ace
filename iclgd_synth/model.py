"""The Transformer: stacked self-attention layers (linear or softmax, optional LayerNorm and MLP) with a residual
stream, and the read-out y_hat = -(y-part of the query token).

Parameters are a plain pytree, :class:`TransformerParams`: a tuple of per-layer dicts of arrays plus the static
architecture (:class:`Arch`) in the tree structure. Hand-constructed weights, trained weights and interpolations
between them are the same kind of object, so one :func:`predict` serves all of them and ``jax.vmap`` over seeds,
``jax.tree.map`` for interpolation and optax updates all just work.

Per-layer dict (H heads, key size Kq, value size Kv, token size D):

    w_q, w_k: (H, Kq, D)   w_v: (H, Kv, D)   w_p: (H, D, Kv)       the attention (P_h is ``w_p``)
    ln_attn / ln_mlp: {"scale": (D,), "bias": (D,)}                 optional pre-LayerNorms
    mlp: {"w_in": (D, F), "b_in": (F,), "w_out": (F, D), "b_out": (D,)}   optional ReLU MLP block

Layers are applied in order, and the whole stack ``arch.n_loops`` times: a *recurrent* model is one layer looped K
times, a *deep* model K layers looped once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth import attention as attn
from iclgd_synth import rng
from iclgd_synth.shapes import Array, PRNGKey
from iclgd_synth.tasks import TaskBatch, check_dtype, validate_batch
from iclgd_synth.tokens import LAYOUTS, build_tokens, n_context_tokens, read_out
from iclgd_synth.validation import check_choice, check_float, check_int, check_key

ATTENTION_KINDS = ("linear", "softmax")


@dataclasses.dataclass(frozen=True)
class Arch:
    """What a parameter pytree cannot say about itself (static, part of the tree structure).

    Attributes:
      n_loops: how many times the layer stack is applied (K for a recurrent 1-layer model). Default 1.
      attention: "linear" or "softmax". Default "linear".
      causal: token j attends only to keys i <= j. Default False (the reference paper's main setting).
      include_query: the query token is also a key/value. Default False (keys are the context only).
      normalize: divide each attention sum by the number of keys a token sees (1/N inside the layer), so that the
        weights do not depend on N. Default False (the reference paper keeps 1/N inside P).
      clip: clip token entries to [-clip, clip] after each layer (deep models in the reference paper: 10). None: off.
      layout: token layout, "concat" or "interleaved". Default "concat".
      momentum: decay beta of momentum attention ("Why Can GPT Learn In-Context?"): token t's update also gets a
        beta-decayed sum over the keys i < t (see :func:`iclgd_synth.attention.momentum_update`). None: off (default).
      momentum_kind: "values" (the paper's: sum_{i<t} beta^(t-i) P W_V e_i) or "dual" (linear attention only: key
        i < t weighted 1 + beta + ... + beta^(t-i) in token t's linear attention). Default "values".
    """

    n_loops: int = 1
    attention: str = "linear"
    causal: bool = False
    include_query: bool = False
    normalize: bool = False
    clip: float | None = None
    layout: str = "concat"
    momentum: float | None = None
    momentum_kind: str = "values"

    def __post_init__(self):
        check_int("n_loops", self.n_loops, min_value=1)
        check_choice("attention", self.attention, ATTENTION_KINDS)
        check_choice("layout", self.layout, LAYOUTS)
        if self.clip is not None:
            check_float("clip", self.clip, min_value=0.0, strict_min=True)
        if self.momentum is not None:
            check_float("momentum", self.momentum, min_value=0.0, max_value=1.0)
        check_choice("momentum_kind", self.momentum_kind, attn.MOMENTUM_KINDS)
        if self.momentum is None and self.momentum_kind != "values":
            raise ValueError(f"momentum_kind={self.momentum_kind!r} only applies with momentum set (a decay beta in "
                             "[0, 1]); set momentum too, or leave momentum_kind at its default 'values'")
        if self.momentum is not None and self.momentum_kind == "dual" and self.attention != "linear":
            raise ValueError("momentum_kind='dual' is defined for linear attention only (attention='linear')")


@flax.struct.dataclass
class TransformerParams:
    """Parameters of a Transformer: ``layers`` (tuple of per-layer dicts) and the static ``arch``."""

    layers: tuple
    arch: Arch = flax.struct.field(pytree_node=False, default=Arch())

    @property
    def token_dim(self) -> int:
        return int(self.layers[0]["w_q"].shape[-1])

    @property
    def n_heads(self) -> int:
        return int(self.layers[0]["w_q"].shape[-3])

    @property
    def depth(self) -> int:
        """Number of layer applications (distinct layers times loops)."""
        return len(self.layers) * self.arch.n_loops

    def __call__(self, batch: TaskBatch) -> Array:
        """The prediction for every task of ``batch``, (B,) (or (B, d_out)): the same call shape as every learner."""
        return predict(self, batch)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and initialisation of a trainable Transformer.

    Attributes:
      dim: input dimension d. Default 10.
      out_dim: output dimension d_out; tokens have D = d + d_out entries. Default 1.
      n_layers: number of layer applications K. Default 1.
      recurrent: one set of weights applied K times (True) or K separate layers (False). Default False.
      n_heads: attention heads H. Default 1.
      key_size: Kq per head; None means D. Default None.
      value_size: Kv per head; None means D. Default None.
      attention: "linear" or "softmax". Default "linear".
      causal, include_query, normalize, clip, layout, momentum, momentum_kind: see :class:`Arch`.
      layer_norm: pre-LayerNorm before the attention (and the MLP). Default False.
      mlp: add a ReLU MLP block after each attention. Default False.
      mlp_width: hidden width F of that MLP (only with ``mlp=True``); None means 4 D. Default None.
      init_scale: variance scale of the truncated-normal init, divided by K and by fan-in (the reference
        paper's 0.002 / K); > 0 (at 0 every weight and gradient is 0 and the model never moves). Default 0.002.
    """

    dim: int = 10
    out_dim: int = 1
    n_layers: int = 1
    recurrent: bool = False
    n_heads: int = 1
    key_size: int | None = None
    value_size: int | None = None
    attention: str = "linear"
    causal: bool = False
    include_query: bool = False
    normalize: bool = False
    clip: float | None = None
    layout: str = "concat"
    layer_norm: bool = False
    mlp: bool = False
    mlp_width: int | None = None
    init_scale: float = 0.002
    momentum: float | None = None
    momentum_kind: str = "values"

    def __post_init__(self):
        check_int("dim", self.dim, min_value=1)
        check_int("out_dim", self.out_dim, min_value=1)
        check_int("n_layers", self.n_layers, min_value=1)
        check_int("n_heads", self.n_heads, min_value=1)
        for name in ("key_size", "value_size", "mlp_width"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), min_value=1)
        if self.mlp_width is not None and not self.mlp:
            raise ValueError(f"mlp_width={self.mlp_width} only applies with mlp=True (there is no MLP block "
                             "otherwise); set mlp=True or leave mlp_width out")
        check_float("init_scale", self.init_scale, min_value=0.0, strict_min=True)
        self.arch()  # validates the remaining fields

    @property
    def token_dim(self) -> int:
        return self.dim + self.out_dim

    def arch(self) -> Arch:
        return Arch(n_loops=self.n_layers if self.recurrent else 1, attention=self.attention, causal=self.causal,
                    include_query=self.include_query, normalize=self.normalize, clip=self.clip, layout=self.layout,
                    momentum=self.momentum, momentum_kind=self.momentum_kind)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def init_params(key: PRNGKey, config: ModelConfig, dtype: Any = None) -> TransformerParams:
    """Random initial parameters for ``config`` (vmap over keys for several seeds); ``key`` is one PRNG key
    (``jax.random.PRNGKey(seed)``), ``dtype`` a float dtype (None: JAX's default float)."""
    check_key("key", key)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be an iclgd_synth.ModelConfig, got {type(config).__name__}")
    dtype = check_dtype(dtype) or jnp.zeros(()).dtype
    dd, h = config.token_dim, config.n_heads
    kq, kv = config.key_size or dd, config.value_size or dd
    n_distinct = 1 if config.recurrent else config.n_layers
    scale = config.init_scale / config.n_layers

    def normal(k, shape, fan_in, s=scale):
        std = jnp.sqrt(s / fan_in) / 0.87962566  # truncated-normal correction, as in variance-scaling inits
        with rng.fixed_mode():
            return std * jax.random.truncated_normal(k, -2.0, 2.0, shape, dtype)

    layers = []
    for layer_index in range(n_distinct):  # keys by fold_in of (layer, tensor): see iclgd_synth.rng
        kk = [rng.derive(key, layer_index, j) for j in range(6)]
        layer = {"w_q": normal(kk[0], (h, kq, dd), dd), "w_k": normal(kk[1], (h, kq, dd), dd),
                 "w_v": normal(kk[2], (h, kv, dd), dd), "w_p": normal(kk[3], (h, dd, kv), kv)}
        if config.layer_norm:
            layer["ln_attn"] = {"scale": jnp.ones(dd, dtype), "bias": jnp.zeros(dd, dtype)}
        if config.mlp:
            f = config.mlp_width or 4 * dd
            layer["mlp"] = {"w_in": normal(kk[4], (dd, f), dd, 2.0), "b_in": jnp.zeros(f, dtype),
                            "w_out": normal(kk[5], (f, dd), f), "b_out": jnp.zeros(dd, dtype)}
            if config.layer_norm:
                layer["ln_mlp"] = {"scale": jnp.ones(dd, dtype), "bias": jnp.zeros(dd, dtype)}
        layers.append(layer)
    return TransformerParams(layers=tuple(layers), arch=config.arch())


def layer_norm(x: Array, p: dict, eps: float = 1e-6) -> Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def apply_layer(tokens_BxTxD: Array, layer: dict, arch: Arch, keys_T: Array, *, query_only: bool = False,
                form: str = "auto") -> Array:
    """One residual block: tokens + attention(LN(tokens)) (+ MLP block). Returns all tokens or the query alone."""
    h = layer_norm(tokens_BxTxD, layer["ln_attn"]) if "ln_attn" in layer else tokens_BxTxD
    update = attn.attention_update(h, layer, keys_T, kind=arch.attention, causal=arch.causal,
                                   normalize=arch.normalize, query_only=query_only, form=form)
    if arch.momentum is not None:
        update = update + attn.momentum_update(h, layer, keys_T, arch.momentum, kind=arch.momentum_kind,
                                               causal=arch.causal, query_only=query_only,
                                               normalize=arch.normalize and arch.attention == "linear")
    out = (tokens_BxTxD[:, -1:] if query_only else tokens_BxTxD) + update
    if "mlp" in layer:
        m, z = layer["mlp"], layer_norm(out, layer["ln_mlp"]) if "ln_mlp" in layer else out
        out = out + jax.nn.relu(z @ m["w_in"] + m["b_in"]) @ m["w_out"] + m["b_out"]
    if arch.clip is not None:
        out = jnp.clip(out, -arch.clip, arch.clip)
    return out


def forward(params: TransformerParams, tokens_BxTxD: Array, n_ctx_tokens: int, *, form: str = "auto",
            query_only: bool = False, return_all: bool = False) -> Array | list[Array]:
    """Run the Transformer on tokens.

    Returns the final tokens (B, T, D), or with ``query_only`` the final query token (B, 1, D) (the last layer then
    updates the query alone). With ``return_all``, the list of the tokens after each layer application.

    Jit-compiled once per architecture, shapes and flags (the static ``arch`` is part of the params' tree structure),
    so repeated eager calls, recurrent roll-outs included, reuse one executable.
    """
    check_choice("form", form, attn.FORMS)
    return _forward(params, tokens_BxTxD, n_ctx_tokens=int(n_ctx_tokens), form=form, query_only=bool(query_only),
                    return_all=bool(return_all))


@functools.partial(jax.jit, static_argnames=("n_ctx_tokens", "form", "query_only", "return_all"))
def _forward(params: TransformerParams, tokens_BxTxD: Array, *, n_ctx_tokens: int, form: str, query_only: bool,
             return_all: bool) -> Array | list[Array]:
    arch, layers = params.arch, params.layers
    t = tokens_BxTxD.shape[1]
    keys_T = attn.key_mask(t, n_ctx_tokens, arch.include_query)
    schedule = [layer for _ in range(arch.n_loops) for layer in layers]
    if return_all:
        outs, x = [], tokens_BxTxD
        for layer in schedule:
            x = apply_layer(x, layer, arch, keys_T, form=form)
            outs.append(x)
        return outs

    def stack(x):
        for layer in layers:
            x = apply_layer(x, layer, arch, keys_T, form=form)
        return x

    x = tokens_BxTxD
    if arch.n_loops > 1:  # all loops but the last in a compiled loop, so long roll-outs compile fast
        x = jax.lax.fori_loop(0, arch.n_loops - 1, lambda _, y: stack(y), x)
    for i, layer in enumerate(layers):
        x = apply_layer(x, layer, arch, keys_T, form=form, query_only=query_only and i == len(layers) - 1)
    return x


def predict(params: TransformerParams, batch: TaskBatch, *, form: str = "auto", w0: Array | None = None) -> Array:
    """The Transformer's prediction for each task of ``batch``: (B,) (or (B, d_out) for vector labels).

    One function serves hand-constructed, trained and interpolated parameters. ``form`` picks the dual (default for
    linear attention) or quadratic computation; ``w0`` places an initial model in the query token (concat layout).
    Arguments are checked here; the computation is one jit-compiled call, compiled once per architecture and shapes.
    """
    check_params(params)
    check_choice("form", form, attn.FORMS)
    batch = validate_batch(batch)
    check_token_dim(params, batch)
    return _predict(params, batch.replace(w=None), w0, form=form)


@functools.partial(jax.jit, static_argnames=("form",))
def _predict(params: TransformerParams, batch: TaskBatch, w0: Array | None, *, form: str) -> Array:
    dtype = jnp.result_type(batch.x.dtype, *jax.tree.leaves(params))
    tokens = build_tokens(jax.tree.map(lambda a: a.astype(dtype), batch), params.arch.layout, w0)
    out = forward(params, tokens, n_context_tokens(batch.n_context, params.arch.layout), form=form, query_only=True)
    return read_out(out, batch.dim, batch.vector_output)


#: The public name: the linear self-attention (or any :class:`TransformerParams`) Transformer's prediction.


def layer_predictions(params: TransformerParams, batch: TaskBatch, *, form: str = "auto") -> Array:
    """The read-out after every layer application, (K, B) (or (K, B, d_out)): per-layer losses and updates."""
    check_params(params)
    batch = validate_batch(batch)
    check_token_dim(params, batch)
    tokens = build_tokens(batch, params.arch.layout)
    outs = forward(params, tokens, n_context_tokens(batch.n_context, params.arch.layout), form=form, return_all=True)
    return jnp.stack([read_out(o, batch.dim, batch.vector_output) for o in outs])


def check_token_dim(params: TransformerParams, batch: TaskBatch) -> None:
    """Raise ValueError unless the parameters' token size D equals the batch's d + d_out."""
    if params.token_dim != batch.dim + batch.out_dim:
        raise ValueError(f"params expect tokens of size D = {params.token_dim}, but the batch has d = {batch.dim} "
                         f"and d_out = {batch.out_dim} (D = d + d_out = {batch.dim + batch.out_dim})")


def check_params(params: Any) -> None:
    """Clear errors for parameter pytrees of the wrong kind or with inconsistent shapes."""
    if not isinstance(params, TransformerParams):
        raise TypeError(f"params must be iclgd_synth.TransformerParams, got {type(params).__name__}")
    if len(params.layers) == 0:
        raise ValueError("params.layers must hold at least one layer")
    token_dim = None
    for i, layer in enumerate(params.layers):
        missing = {"w_q", "w_k", "w_v", "w_p"} - set(layer)
        if missing:
            raise ValueError(f"params.layers[{i}] lacks {sorted(missing)}")
        if np.ndim(layer["w_q"]) != 3:
            raise ValueError(f"params.layers[{i}]['w_q'] must have shape (H, Kq, D), got "
                             f"{tuple(np.shape(layer['w_q']))}")
        h, kq, dd = np.shape(layer["w_q"])
        if token_dim is not None and dd != token_dim:
            raise ValueError(f"params.layers[{i}] works on tokens of size D = {dd} but params.layers[0] on D = "
                             f"{token_dim}: every layer of the residual stream must have the same token size D")
        token_dim = dd
        for name in ("w_q", "w_k", "w_v", "w_p"):
            dt = getattr(layer[name], "dtype", None)
            if dt is not None and not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(f"params.layers[{i}]['{name}'] must hold floats, got dtype {dt}; build the "
                                "parameters with a float dtype (float32 or float64)")
        kv = np.shape(layer["w_v"])[1]
        for name, shape in (("w_k", (h, kq, dd)), ("w_v", (h, kv, dd)), ("w_p", (h, dd, kv))):
            if tuple(np.shape(layer[name])) != shape:
                raise ValueError(f"params.layers[{i}]['{name}'] must have shape {shape} (H, ., D) to match w_q "
                                 f"{(h, kq, dd)}; got {tuple(np.shape(layer[name]))}")
