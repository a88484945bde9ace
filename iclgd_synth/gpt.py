"""A GPT-style regression Transformer, trained on every position (next-token) or on the last query (ICL objective).

The critique "Do pretrained Transformers learn in-context by gradient descent?" points out that the "ICL is GD"
evidence comes from models trained on the query alone, with (x, y) tokens and no embedding, while in-context learning
in real models emerges from next-token training of models with an embedding, positions, softmax attention and MLPs.
This module is the second kind, as in the regression testbeds of "What can Transformers learn in-context? A case
study of simple function classes" and "Pretraining task diversity and the emergence of non-Bayesian in-context
learning for regression":

- tokens interleaved as x_1, y_1, x_2, y_2, ..., x_N, y_N, x_q (the package's ``"interleaved"`` layout: an x token
  is (x, 0), a y token (0, y), both in R^D with D = d + d_out), so T = 2N + 1;
- a learned affine read-in R^D -> R^M (M = ``d_model``), plus learned absolute positions (optional);
- ``n_layers`` pre-LayerNorm blocks: h += Attn(LN(h)); h += MLP(LN(h)), causal multi-head attention (softmax, or
  linear: the masked scores q.k / sqrt(M/H) averaged over the visible keys, no softmax), GELU MLP of width
  ``mlp_ratio`` M; a final LayerNorm and a learned affine read-out R^M -> R^d_out;
- the prediction of y_i is read at the x_i token (i = 1..N+1, the query being x_{N+1}), which under the causal mask
  sees x_1, y_1, ..., x_i only: predictions (B, N+1), column n the prediction from the first n pairs.

Parameters are :class:`GPTParams`: a plain pytree of arrays (``weights``, the per-layer arrays stacked on a leading
layer axis L and run under ``lax.scan`` unrolled: on this project's CPU a rolled scan made a training step
of the transience preset 29 ms against 21 ms unrolled, its backward pass slicing and updating the stacked
activations) with the static :class:`GPTConfig` in its tree structure, so
``jax.vmap(init_gpt, (0, None))`` trains seeds together and optax updates apply directly. ``params(batch)`` gives the
query prediction (B,), the call shape of every learner and of :class:`~iclgd_synth.model.TransformerParams`.

Initialisation (:func:`init_gpt`), as in GPT-2 ("Language Models are Unsupervised Multitask Learners") and its
common implementations: every weight matrix and the position table ~ N(0, 0.02^2); the two residual projections per
block (attention output, MLP output) ~ N(0, (0.02 / sqrt(2 L))^2) (the paper scales residual layers by 1/sqrt of
their number, 2 per block); biases 0; LayerNorm gain 1, bias 0, eps 1e-5; no dropout (both testbeds above train
without it). The read-in and read-out use the same N(0, 0.02^2) (the first testbed's code leaves them at its
framework's default linear-layer init; we keep one rule for every matrix).

Optimisers the testbeds used (the trainer is configured elsewhere): "What can Transformers learn in-context?": Adam,
lr 1e-4, batch 64, 500k steps, a curriculum over d and N (12 layers, width 256, 8 heads, d = 20); "Pretraining task
diversity...": Adam, lr 1e-3 with a linear warm-up, batch 256, 500k steps (8 layers, width 128, 2 heads, d = 8,
N = 16, noise variance 0.25).

Losses (pure, jit- and grad-friendly): :func:`icl_loss`, the half-MSE of the last query only, and
:func:`next_token_loss`, the half-MSE averaged over all N+1 positions (every y_i predicted from its prefix, the query
counting as position N+1). Both are 0.5 * mean squared error (summed over output dimensions), as :func:`half_mse`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth import rng
from iclgd_synth.learners.prefix import per_position_half_mse, prefix_targets
from iclgd_synth.model import layer_norm
from iclgd_synth.shapes import Array, PRNGKey
from iclgd_synth.tasks import FLOAT_DTYPES, TaskBatch, check_dtype, validate_batch
from iclgd_synth.tokens import build_tokens
from iclgd_synth.validation import check_choice, check_float, check_int

GPT_ATTENTION = ("softmax", "linear")

#: LayerNorm epsilon of GPT-2.
LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture and initialisation of the GPT-style regression model (hashable: a static jit argument).

    Attributes:
      dim: input dimension d (>= 1). Default 5.
      n_context: context pairs N the model is built for (>= 1); with learned positions the position table has
        T = 2N + 1 rows and longer contexts are refused. Default 10.
      out_dim: output dimension d_out (>= 1); tokens have D = d + d_out entries. Default 1.
      d_model: residual-stream width M (>= 1, a multiple of ``n_heads``). Default 64.
      n_layers: Transformer blocks L (>= 1). Default 2.
      n_heads: attention heads H (>= 1); head size M / H. Default 4.
      mlp_ratio: MLP hidden width F = mlp_ratio * M (integer >= 1). Default 4 (GPT-2's).
      attention: "softmax" (GPT-2's) or "linear" (masked scores averaged over the visible keys). Default "softmax".
      positions: learned absolute position embeddings (True) or none (False). Default True.
      init_std: standard deviation of the normal init of every weight matrix and the position table (residual
        projections get init_std / sqrt(2 L)); > 0. Default 0.02 (GPT-2's).
      dtype: parameter dtype, one of float16, bfloat16, float32, float64. Default "float32".
    """

    dim: int = 5
    n_context: int = 10
    out_dim: int = 1
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    attention: str = "softmax"
    positions: bool = True
    init_std: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        check_int("dim", self.dim, min_value=1)
        check_int("n_context", self.n_context, min_value=1)
        check_int("out_dim", self.out_dim, min_value=1)
        check_int("d_model", self.d_model, min_value=1)
        check_int("n_layers", self.n_layers, min_value=1)
        check_int("n_heads", self.n_heads, min_value=1)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be a multiple of n_heads (head size d_model / n_heads); got d_model = "
                             f"{self.d_model} and n_heads = {self.n_heads}")
        check_int("mlp_ratio", self.mlp_ratio, min_value=1)
        check_choice("attention", self.attention, GPT_ATTENTION)
        if not isinstance(self.positions, (bool, np.bool_)):
            raise TypeError(f"positions must be True or False, got {self.positions!r}")
        check_float("init_std", self.init_std, min_value=0.0, strict_min=True)
        if not isinstance(self.dtype, str):
            raise TypeError(f"dtype must be the name of a float dtype ({', '.join(FLOAT_DTYPES)}), got {self.dtype!r}")
        check_dtype(self.dtype)

    @property
    def token_dim(self) -> int:
        """D = d + d_out."""
        return self.dim + self.out_dim

    @property
    def n_tokens(self) -> int:
        """T = 2N + 1 for the full context."""
        return 2 * self.n_context + 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_ratio * self.d_model

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Named model sizes. ``garg``: 12 layers, width 256, 8 heads for d = 20, N = 40 ("What can Transformers learn
#: in-context?"); ``raventos``: 8 layers, width 128, 2 heads for d = 8, N = 16 ("Pretraining task diversity...");
#: ``cpu``: a small model for d = 5, N = 10 that trains in minutes on two CPU cores.
GPT_PRESETS: dict[str, GPTConfig] = {
    "garg": GPTConfig(dim=20, n_context=40, d_model=256, n_layers=12, n_heads=8),
    "raventos": GPTConfig(dim=8, n_context=16, d_model=128, n_layers=8, n_heads=2),
    "cpu": GPTConfig(dim=5, n_context=10, d_model=64, n_layers=2, n_heads=4),
}


@flax.struct.dataclass
class GPTParams:
    """Parameters of the GPT-style model: ``weights`` (a dict of arrays) and the static ``config``.

    ``weights`` (L layers, M width, H heads, Kh = M / H, F MLP width, D token size, T = 2N + 1, O = d_out)::

        read_in:  {"w": (D, M), "b": (M,)}          pos: (T, M) (only with learned positions)
        blocks:   {"ln_attn", "ln_mlp": {"scale": (L, M), "bias": (L, M)},
                   "w_q", "w_k", "w_v": (L, M, H, Kh), "b_q", "b_k", "b_v": (L, H, Kh),
                   "w_o": (L, H, Kh, M), "b_o": (L, M),
                   "w_in": (L, M, F), "b_in": (L, F), "w_out": (L, F, M), "b_out": (L, M)}
        ln_f:     {"scale": (M,), "bias": (M,)}     read_out: {"w": (M, O), "b": (O,)}
    """

    weights: dict
    config: GPTConfig = flax.struct.field(pytree_node=False, default=GPTConfig())

    def __call__(self, batch: TaskBatch) -> Array:
        """The query prediction for every task of ``batch``, (B,) (or (B, d_out)): the learners' call shape."""
        return gpt_predict(self, batch)


def init_gpt(key: PRNGKey, config: GPTConfig) -> GPTParams:
    """Random initial parameters (GPT-2 style, see the module docstring); vmap over keys for several seeds.
    Jit-compiled once per config."""
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be an iclgd_synth.gpt.GPTConfig, got {type(config).__name__}")
    return _init_gpt(key, config)


@functools.partial(jax.jit, static_argnums=1)
def _init_gpt(key: PRNGKey, config: GPTConfig) -> GPTParams:
    dtype = check_dtype(config.dtype)
    m, h, kh, f, o = config.d_model, config.n_heads, config.head_dim, config.mlp_width, config.out_dim
    n_layers, std = config.n_layers, config.init_std
    resid_std = std / math.sqrt(2 * n_layers)
    # (name, shape, std) of every normal tensor, drawn as one flat vector: one random-number kernel to compile.
    normals = [("w_q", (n_layers, m, h, kh), std), ("w_k", (n_layers, m, h, kh), std),
               ("w_v", (n_layers, m, h, kh), std), ("w_o", (n_layers, h, kh, m), resid_std),
               ("w_in", (n_layers, m, f), std), ("w_out", (n_layers, f, m), resid_std),
               ("read_in", (config.token_dim, m), std), ("read_out", (m, o), std)]
    if config.positions:
        normals.append(("pos", (config.n_tokens, m), std))
    sizes = [math.prod(shape) for _, shape, _ in normals]
    with rng.fixed_mode():  # one fixed threefry mode for every draw (iclgd_synth.rng)
        flat = jax.random.normal(key, (sum(sizes),), dtype)
    offsets = np.cumsum([0] + sizes)
    drawn = {name: s * flat[a:b].reshape(shape) for (name, shape, s), a, b in zip(normals, offsets, offsets[1:])}

    def zeros(*shape):
        return jnp.zeros(shape, dtype)

    def ln(*lead):
        return {"scale": jnp.ones((*lead, m), dtype), "bias": zeros(*lead, m)}

    blocks = {"ln_attn": ln(n_layers), "ln_mlp": ln(n_layers),
              **{name: drawn[name] for name in ("w_q", "w_k", "w_v", "w_o", "w_in", "w_out")},
              "b_q": zeros(n_layers, h, kh), "b_k": zeros(n_layers, h, kh), "b_v": zeros(n_layers, h, kh),
              "b_o": zeros(n_layers, m), "b_in": zeros(n_layers, f), "b_out": zeros(n_layers, m)}
    weights = {"read_in": {"w": drawn["read_in"], "b": zeros(m)}, "blocks": blocks, "ln_f": ln(),
               "read_out": {"w": drawn["read_out"], "b": zeros(o)}}
    if config.positions:
        weights["pos"] = drawn["pos"]
    return GPTParams(weights=weights, config=config)


def check_gpt_params(params: Any) -> GPTConfig:
    """Clear errors for parameters of the wrong kind or shapes that contradict their config; returns the config."""
    if not isinstance(params, GPTParams):
        raise TypeError(f"params must be iclgd_synth.gpt.GPTParams (from init_gpt), got {type(params).__name__}")
    config, w = params.config, params.weights
    expected = {"read_in.w": (config.token_dim, config.d_model), "read_out.w": (config.d_model, config.out_dim),
                "blocks.w_q": (config.n_layers, config.d_model, config.n_heads, config.head_dim)}
    if config.positions:
        expected["pos"] = (config.n_tokens, config.d_model)
    for path, shape in expected.items():
        node = w
        try:
            for part in path.split("."):
                node = node[part]
        except (KeyError, TypeError):
            raise ValueError(f"params.weights lacks {path!r} (expected shape {shape} for its config)") from None
        # The trailing axes: a vmapped stack of seeds adds leading axes.
        if tuple(np.shape(node))[-len(shape):] != shape:
            raise ValueError(f"params.weights[{path!r}] must have shape {shape} for its config, got "
                             f"{tuple(np.shape(node))}")
    return config


def _check_tokens(config: GPTConfig, tokens: Any) -> Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (B, T, D), got {tokens.shape}")
    _, t, dd = tokens.shape
    if dd != config.token_dim:
        raise ValueError(f"tokens must have D = d + d_out = {config.token_dim} entries for this config, got D = {dd}")
    if t % 2 != 1:
        raise ValueError(f"tokens must be interleaved x_1, y_1, ..., x_n, y_n, x_q: an odd count T = 2n + 1, got "
                         f"T = {t}")
    if config.positions and t > config.n_tokens:
        raise ValueError(f"the model has learned positions for n_context = {config.n_context} pairs "
                         f"(T <= {config.n_tokens} tokens), got T = {t} ({(t - 1) // 2} pairs)")
    if not jnp.issubdtype(tokens.dtype, jnp.floating):
        tokens = tokens.astype(jnp.zeros(()).dtype)
    return tokens


def _check_batch(config: GPTConfig, batch: TaskBatch) -> TaskBatch:
    batch = validate_batch(batch)
    if batch.dim != config.dim or batch.out_dim != config.out_dim:
        raise ValueError(f"the model is built for d = {config.dim}, d_out = {config.out_dim}; the batch has "
                         f"d = {batch.dim}, d_out = {batch.out_dim}")
    if config.positions and batch.n_context > config.n_context:
        raise ValueError(f"the model has learned positions for n_context = {config.n_context} pairs, the batch has "
                         f"N = {batch.n_context}")
    return batch.replace(w=None)


def _block(h_BxTxM: Array, p: dict, attention: str, mask_TxT: Array) -> Array:
    """One pre-LayerNorm block: causal multi-head attention, then the GELU MLP, each on the residual stream."""
    a = layer_norm(h_BxTxM, p["ln_attn"], LN_EPS)
    q = jnp.einsum("btm,mhk->bthk", a, p["w_q"]) + p["b_q"]
    k = jnp.einsum("btm,mhk->bthk", a, p["w_k"]) + p["b_k"]
    v = jnp.einsum("btm,mhk->bthk", a, p["w_v"]) + p["b_v"]
    scores_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    # Masked entries are replaced (not added to), so later tokens cannot reach an earlier position even in rounding.
    if attention == "softmax":
        weights = jax.nn.softmax(jnp.where(mask_TxT, scores_BxHxTxT, -jnp.inf), axis=-1)
    else:
        count_T = jnp.arange(1, mask_TxT.shape[0] + 1, dtype=scores_BxHxTxT.dtype)
        weights = jnp.where(mask_TxT, scores_BxHxTxT, 0.0) / count_T[:, None]
    out = jnp.einsum("bhts,bshk->bthk", weights, v)
    h_BxTxM = h_BxTxM + jnp.einsum("bthk,hkm->btm", out, p["w_o"]) + p["b_o"]
    z = layer_norm(h_BxTxM, p["ln_mlp"], LN_EPS)
    return h_BxTxM + jax.nn.gelu(z @ p["w_in"] + p["b_in"], approximate=True) @ p["w_out"] + p["b_out"]


def _position_outputs(params: GPTParams, tokens_BxTxD: Array) -> Array:
    """Pure core: the read-out at every x token, (B, n + 1, O)."""
    config, w = params.config, params.weights
    dtype = jnp.result_type(tokens_BxTxD.dtype, *jax.tree.leaves(w))
    w = jax.tree.map(lambda a: a.astype(dtype), w)
    t = tokens_BxTxD.shape[1]
    h = tokens_BxTxD.astype(dtype) @ w["read_in"]["w"] + w["read_in"]["b"]
    if config.positions:
        h = h + w["pos"][:t]
    mask_TxT = jnp.tril(jnp.ones((t, t), bool))
    block = lambda x, p: (_block(x, p, config.attention, mask_TxT), None)  # noqa: E731
    h, _ = jax.lax.scan(block, h, w["blocks"], unroll=True)  # unrolled: see the module docstring
    h_x = layer_norm(h[:, ::2], w["ln_f"], LN_EPS)  # the x tokens x_1, ..., x_n, x_q
    return h_x @ w["read_out"]["w"] + w["read_out"]["b"]


_jit_position_outputs = jax.jit(_position_outputs)


@jax.jit
def _jit_batch_outputs(params: GPTParams, batch: TaskBatch) -> Array:
    return _position_outputs(params, build_tokens(batch, "interleaved"))


def _squeeze(out_BxPxO: Array, config: GPTConfig) -> Array:
    return out_BxPxO if config.out_dim > 1 else out_BxPxO[..., 0]


def gpt_forward(params: GPTParams, batch_or_tokens: TaskBatch | Array) -> Array:
    """Predictions at every position: (B, n + 1) (or (B, n + 1, d_out)); column j predicts y_{j+1} from the first j
    pairs, read at the x_{j+1} token, and the last column is the query prediction.

    ``batch_or_tokens``: a :class:`TaskBatch` (tokens built in the interleaved layout) or tokens (B, 2n + 1, D)
    already interleaved x_1, y_1, ..., x_n, y_n, x_q. Jit-compiled once per config and shapes; pure, so it can be
    called under an outer jit, grad or vmap.
    """
    config = check_gpt_params(params)
    if isinstance(batch_or_tokens, TaskBatch):
        out = _jit_batch_outputs(params, _check_batch(config, batch_or_tokens))
    else:
        out = _jit_position_outputs(params, _check_tokens(config, batch_or_tokens))
    return _squeeze(out, config)


def gpt_predict(params: GPTParams, batch: TaskBatch) -> Array:
    """The query prediction, (B,) (or (B, d_out)): the last column of :func:`gpt_forward`."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be an iclgd_synth.TaskBatch, got {type(batch).__name__}")
    return gpt_forward(params, batch)[:, -1]


def _outputs(params: GPTParams, batch: TaskBatch) -> tuple[Array, TaskBatch]:
    config = check_gpt_params(params)
    batch = _check_batch(config, batch)
    return _position_outputs(params, build_tokens(batch, "interleaved")), batch


def icl_loss(params: GPTParams, batch: TaskBatch) -> Array:
    """The ICL objective: 0.5 * mean over tasks of the squared error of the query prediction (summed over outputs).

    Pure (no jit inside): differentiate and jit it as part of a training step.
    """
    out_BxPxO, batch = _outputs(params, batch)
    err = out_BxPxO[:, -1] - batch.query_labels_BxO().astype(out_BxPxO.dtype)
    return 0.5 * jnp.mean(jnp.sum(err**2, axis=-1))


def next_token_loss(params: GPTParams, batch: TaskBatch) -> Array:
    """The next-token objective: 0.5 * mean over tasks and the N + 1 positions of the squared error of each y_i
    predicted from its prefix (the query is position N + 1), summed over outputs. Pure, like :func:`icl_loss`."""
    out_BxPxO, batch = _outputs(params, batch)
    target = prefix_targets(batch)
    target_BxPxO = (target if batch.vector_output else target[..., None]).astype(out_BxPxO.dtype)
    return 0.5 * jnp.mean(jnp.sum((out_BxPxO - target_BxPxO) ** 2, axis=-1))


def position_losses(params: GPTParams, batch: TaskBatch) -> Array:
    """Half squared error per position averaged over tasks, (N + 1,): the model's error curve against the number
    of context pairs it has seen (0, 1, ..., N)."""
    return per_position_half_mse(gpt_forward(params, batch), batch)


@functools.partial(jax.jit, static_argnames=("objective",))
def _loss_by_name(params: GPTParams, batch: TaskBatch, objective: str) -> Array:
    return LOSSES[objective](params, batch)


#: The two objectives by name (a study or trainer picks one with a string field).
LOSSES = {"icl": icl_loss, "next_token": next_token_loss}


def gpt_loss(params: GPTParams, batch: TaskBatch, objective: str = "next_token") -> Array:
    """``LOSSES[objective](params, batch)``, jit-compiled; ``objective`` is "icl" or "next_token"."""
    check_choice("objective", objective, tuple(LOSSES))
    check_gpt_params(params)
    return _loss_by_name(params, validate_batch(batch), objective)
