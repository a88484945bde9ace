"""Token layouts: how a task batch becomes the sequence a Transformer reads, and how its prediction is read out.

- ``"concat"`` (the reference paper's): context tokens e_i = (x_i, y_i) in R^D with D = d + d_out and the query
  token e_q = (x_q, -W0 x_q) (zero y-part for W0 = 0); T = N + 1 tokens, the query last.
- ``"interleaved"``: (x_1, 0), (0, y_1), (x_2, 0), (0, y_2), ..., (x_q, 0); T = 2N + 1 tokens, the query last.

In both layouts the prediction is read out as minus the y-part of the query token after the last layer
("Transformers learn in-context by gradient descent", section 2): y_hat = -e_q[d:].

The heavy-ball layers of :func:`iclgd_synth.constructions.heavy_ball_params` read a wider token,
(x, y, r, 1) in R^D' with D' = d + 2 d_out + 1 (:func:`heavy_ball_tokens`): r carries the previous step's change of
the residual target and 1 is a constant channel.
"""

from __future__ import annotations

import jax.numpy as jnp

from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, validate_batch
from iclgd_synth.validation import check_choice

LAYOUTS = ("concat", "interleaved")


def build_tokens(batch: TaskBatch, layout: str = "concat", w0: Array | None = None) -> Array:
    """Tokens (B, T, D) for ``batch``. ``w0``: initial model (d,), (d_out, d) or batched, concat layout only."""
    check_choice("layout", layout, LAYOUTS)
    x_BxNxd, y_BxNxO = batch.x, batch.labels_BxNxO()
    b, n, d = x_BxNxd.shape
    o = y_BxNxO.shape[-1]
    q_y = jnp.zeros((b, o), x_BxNxd.dtype)
    if w0 is not None:
        if layout != "concat":
            raise ValueError("w0 (an initial model in the query token) is only defined for layout='concat'")
        w0 = jnp.asarray(w0, x_BxNxd.dtype)
        w0_BxOxd = as_batched_weights(w0, b, o, d)
        q_y = -jnp.einsum("bod,bd->bo", w0_BxOxd, batch.x_query)
    query = jnp.concatenate([batch.x_query, q_y], axis=-1)[:, None]
    if layout == "concat":
        context = jnp.concatenate([x_BxNxd, y_BxNxO], axis=-1)
        return jnp.concatenate([context, query], axis=1)
    x_tok = jnp.concatenate([x_BxNxd, jnp.zeros((b, n, o), x_BxNxd.dtype)], axis=-1)
    y_tok = jnp.concatenate([jnp.zeros((b, n, d), x_BxNxd.dtype), y_BxNxO], axis=-1)
    context = jnp.stack([x_tok, y_tok], axis=2).reshape(b, 2 * n, d + o)
    return jnp.concatenate([context, query], axis=1)


def n_context_tokens(n_context: int, layout: str = "concat") -> int:
    """How many tokens before the query carry the demonstrations."""
    return n_context if layout == "concat" else 2 * n_context


def read_out(tokens_BxTxD: Array, dim: int, vector_output: bool) -> Array:
    """Prediction from the query token (the last one): minus its y-part, (B,) or (B, d_out)."""
    y_hat = -tokens_BxTxD[:, -1, dim:]
    return y_hat if vector_output else y_hat[:, 0]


def heavy_ball_token_dim(dim: int, out_dim: int = 1) -> int:
    """D' = d + 2 d_out + 1: the tokens (x, y, r, 1) of the heavy-ball layers."""
    return dim + 2 * out_dim + 1


def heavy_ball_tokens(batch: TaskBatch) -> Array:
    """Tokens (x_i, y_i, 0, 1) for the demonstrations and (x_q, 0, 0, 1) for the query, (B, N + 1, D')."""
    batch = validate_batch(batch)
    y_BxNxO = batch.labels_BxNxO()
    b, n, d = batch.x.shape
    o = y_BxNxO.shape[-1]
    dt = batch.x.dtype
    ctx = jnp.concatenate([batch.x, y_BxNxO, jnp.zeros((b, n, o), dt), jnp.ones((b, n, 1), dt)], axis=-1)
    q = jnp.concatenate([batch.x_query, jnp.zeros((b, 2 * o), dt), jnp.ones((b, 1), dt)], axis=-1)
    return jnp.concatenate([ctx, q[:, None]], axis=1)


def as_batched_weights(w: Array, b: int, o: int, d: int) -> Array:
    """Bring a weight given as (d,), (d_out, d), (B, d) or (B, d_out, d) to (B, d_out, d)."""
    if w.shape == (d,) and o == 1:
        return jnp.broadcast_to(w[None, None], (b, 1, d))
    if w.shape == (o, d):
        return jnp.broadcast_to(w[None], (b, o, d))
    if w.shape == (b, d) and o == 1:
        return w[:, None]
    if w.shape == (b, o, d):
        return w
    raise ValueError(f"w0 must have shape (d,), (d_out, d), (B, d) or (B, d_out, d) with d={d}, d_out={o}, B={b}; "
                     f"got {w.shape}")
