"""Momentum attention and gradient descent with momentum: the exact relations, and where each holds.

"Why Can GPT Learn In-Context?" proposes momentum attention, MoAttn(V, K, q_t) = Attn(V, K, q_t) + sum_{i<t}
beta^(t-i) v_i, as the attention analogue of GD with momentum. In this testbed (concat layout, demonstrations at
positions i = 0..N-1, the query at position N and not a key, the hand-constructed GD weights W_K^T W_Q = diag(I, 0),
P W_V = (eta/N) [[0, 0], [W0, -I]]) three exact statements hold. Each is tested in float64.

(a1) **Momentum on the dual form** (``momentum_kind="dual"``). Linear attention's implicit weight at position t is the
     prefix sum C_t = sum_{i<=t} v_i k_i^T: an online pass over the demonstrations in which step i adds demonstration
     i's meta-gradient, *every gradient taken at W0* (the dual view). Heavy-ball momentum on that pass,
     u_t = beta u_{t-1} + [t is a key] v_t k_t^T and C_t = C_{t-1} + u_t, gives C_t = sum_i s_{t-i} v_i k_i^T with
     s_m = 1 + beta + ... + beta^m. The query (position N, no gradient of its own) therefore weights demonstration i
     by s_{N-i} = (1 - beta^(N-i+1)) / (1 - beta), and with the hand weights the prediction is exactly one GD step on
     the weighted loss (1/(2N)) sum_i s_{N-i} ||W x_i - y_i||^2 from W0, which is also N heavy-ball steps over the
     demonstrations in order, with every gradient evaluated at W0, plus one momentum-only step for the query
     position. Conditions: linear attention, query not a key (with ``include_query`` the query adds its own term
     with weight 1), gradients at W0 (the dual form never re-evaluates gradients), no 1/N inside the layer or, with
     ``normalize``, N in P replaced by the key count. Earlier demonstrations weigh more: the model is order-sensitive.
(a2) **The paper's momentum attention** (``momentum_kind="values"``) adds sum_i beta^(N-i) P W_V e_i to the query:
     decayed *values* without their keys, i.e. a term that does not depend on the query input x_q. With the hand
     weights the prediction is exactly one GD step on an affine model (W, b) from (W0, 0) in which W's loss weights
     every demonstration by 1 and the bias b's loss weights demonstration i by beta^(N-i):
     y_hat = (W0 + Delta W_GD) x_q + (eta/N) sum_i beta^(N-i) (y_i - W0 x_i). It is not a re-weighting of the
     demonstrations' meta-gradients: it adds a bias that does not depend on the query, so it is not momentum
     (nothing carries a velocity from one update to the next); on zero-mean tasks the bias is pure noise (the study
     measures its cost).

(a1) and (a2) are implementation checks: each side is built from the same formula, so they hold by construction.
(b) is a genuine construction of heavy-ball GD, but a different one from the paper's momentum attention (extra token
channels and heads).
(b)  **Heavy-ball GD across layers**, w_{k+1} = w_k - eta_k grad L(w_k) + mu_k (w_k - w_{k-1}), w_{-1} = w_0 = 0, is
     realised by K linear-attention layers on tokens with two extra channels, e = (x, y, r, 1): r holds the previous
     step's change of the residual target (r_j = -(w_k - w_{k-1}) x_j), 1 is a constant. Per layer, head 1 is the
     GD head (W_K^T W_Q = the x-block identity, value -y, projected with eta_k / N onto y *and* r); for each output
     dimension m one more head has key = the constant channel, query = r_m, value = the constant channel, so its
     output at token j is N r_{j,m}: the per-token term, projected with mu_k / N onto y_m and (mu_k - 1) / N onto
     r_m. Then y_j <- y_j - Delta w_k x_j + mu_k r_j and r_j <- -Delta w_k x_j + mu_k r_j: exactly the heavy-ball
     step on every token's residual, and the read-out -y_q is the K-step heavy-ball prediction (learners.MomentumGD).
     Conditions: non-causal keys over the N demonstrations, no normalisation, the constant channel present.
     The construction is :func:`iclgd_synth.constructions.heavy_ball_params` and its tokens
     :func:`iclgd_synth.tokens.heavy_ball_tokens`; this module reads them out and compares them with MomentumGD.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.constructions import gd_params
from iclgd_synth.learners._common import initial_weights, linear_readout, prepare, step_schedule
from iclgd_synth.learners.gd import GD
from iclgd_synth.learners.momentum import MomentumGD
from iclgd_synth.model import TransformerParams, forward, predict
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.tokens import heavy_ball_tokens
from iclgd_synth.validation import check_float, check_int


# ------------------------------------------------------------------------------------------- (a) momentum over demos

def query_momentum_weights(n_context: int, beta: float, kind: str = "dual") -> np.ndarray:
    """Weight of demonstration i (0-indexed) in the query's momentum-attention output, (N,).

    ``"dual"``: the total weight s_{N-i} = 1 + beta + ... + beta^(N-i) of its meta-gradient. ``"values"``: the weight
    beta^(N-i) of its value in the added term (the meta-gradient keeps weight 1)."""
    check_int("n_context", n_context, min_value=1)
    check_float("beta", beta, min_value=0.0)
    lag = n_context - np.arange(n_context)
    if kind == "values":
        return beta ** lag.astype(np.float64)
    if kind == "dual":
        return np.array([sum(beta**m for m in range(int(k) + 1)) for k in lag])
    raise ValueError(f"kind must be 'dual' or 'values', got {kind!r}")


def weighted_gd_step(batch: TaskBatch, eta: Any, weights_N: Any, w0: Array | None = None) -> Array:
    """One GD step on (1/(2N)) sum_i c_i ||W x_i - y_i||^2 from W0: the weights W1, (B, d_out, d)."""
    batch, y_BxNxO, _ = prepare(batch)
    w = initial_weights(batch, w0)
    c = jnp.asarray(weights_N, batch.x.dtype)
    resid = jnp.einsum("bod,bnd->bno", w, batch.x) - y_BxNxO
    grad = jnp.einsum("n,bno,bnd->bod", c, resid, batch.x) / batch.n_context
    return w - eta * grad


def heavy_ball_at_w0(batch: TaskBatch, eta: Any, beta: Any, w0: Array | None = None, *,
                     query_step: bool = True) -> Array:
    """Heavy ball over the demonstrations in their order, every gradient evaluated at W0 (the dual view), (B, O, d).

    u_i = beta u_{i-1} - (eta/N) (W0 x_i - y_i) x_i^T, W_i = W_{i-1} + u_i for i = 1..N, then (``query_step``) one
    step with zero gradient for the query position. An explicit loop, independent of the closed form."""
    batch, y_BxNxO, _ = prepare(batch)
    w0_ = initial_weights(batch, w0)
    resid = jnp.einsum("bod,bnd->bno", w0_, batch.x) - y_BxNxO
    g_NxBxOxd = jnp.einsum("bno,bnd->nbod", resid, batch.x) * (eta / batch.n_context)
    if query_step:
        g_NxBxOxd = jnp.concatenate([g_NxBxOxd, jnp.zeros_like(g_NxBxOxd[:1])], axis=0)

    def step(carry, g):
        w, u = carry
        u = beta * u - g
        return (w + u, u), None

    (w, _), _ = jax.lax.scan(step, (w0_, jnp.zeros_like(w0_)), g_NxBxOxd)
    return w


def values_momentum_prediction(batch: TaskBatch, eta: Any, beta: Any, w0: Array | None = None) -> Array:
    """One GD step on the affine model (W, b) from (W0, 0), the bias's loss weighting demonstration i by
    beta^(N-i): the prediction (W0 + Delta W) x_q + b, (B,) or (B, d_out)."""
    batch, y_BxNxO, _ = prepare(batch)
    n = batch.n_context
    w1 = weighted_gd_step(batch, eta, jnp.ones(n), w0)
    w0_ = initial_weights(batch, w0)
    resid = jnp.einsum("bod,bnd->bno", w0_, batch.x) - y_BxNxO
    decay = jnp.asarray(query_momentum_weights(n, float(beta), "values"), batch.x.dtype)
    b = -(eta / n) * jnp.einsum("n,bno->bo", decay, resid)
    pred = jnp.einsum("bod,bd->bo", w1, batch.x_query) + b
    return pred if batch.vector_output else pred[:, 0]


# ------------------------------------------------------------------------------------- (b) heavy ball across layers

def heavy_ball_predict(params: TransformerParams, batch: TaskBatch) -> Array:
    """Read-out -y of the query after the heavy-ball layers, (B,) or (B, d_out)."""
    batch, _, _ = prepare(batch)
    tokens = heavy_ball_tokens(batch)
    out = forward(params, tokens, batch.n_context, query_only=True)
    o = batch.out_dim
    pred = -out[:, -1, batch.dim:batch.dim + o]
    return pred if batch.vector_output else pred[:, 0]


def heavy_ball_reference(batch: TaskBatch, eta: Any, mu: Any, n_steps: int) -> Array:
    """The explicit heavy-ball prediction (learners.MomentumGD with per-step schedules), for comparison."""
    batch, _, _ = prepare(batch)
    etas = step_schedule("eta", eta, n_steps, batch.x.dtype)
    mus = step_schedule("mu", mu, n_steps, batch.x.dtype)
    return linear_readout(MomentumGD(eta=etas, mu=mus, steps=n_steps).weights(batch), batch.x_query, batch.vector_output)


# ------------------------------------------------------------------------------------------------- measured errors

@functools.partial(jax.jit, static_argnames=("eta", "beta"))
def relation_errors(batch: TaskBatch, w0: Array, eta: float, beta: float) -> dict[str, Array]:
    """Max abs errors of (a1) and (a2) for the hand GD layer with momentum attention, from W0 = ``w0``, and how far
    the dual-momentum model is from a plain GD step with the mean weight (it is a genuine re-weighting)."""
    d, n = batch.dim, batch.n_context
    hand = gd_params(d, eta, n_context=n, w0=w0)
    pred = {kind: predict(hand.replace(arch=dataclasses.replace(hand.arch, momentum=beta, momentum_kind=kind)),
                          batch, w0=w0) for kind in ("dual", "values")}
    c = query_momentum_weights(n, beta, "dual")
    ref_w = jnp.einsum("bod,bd->b", weighted_gd_step(batch, eta, c, w0), batch.x_query)
    ref_hb = jnp.einsum("bod,bd->b", heavy_ball_at_w0(batch, eta, beta, w0), batch.x_query)
    ref_aff = values_momentum_prediction(batch, eta, beta, w0)
    plain = GD(eta=eta * float(np.mean(c)), steps=1, w0=w0)(batch)
    return {"a1_weighted_gd": jnp.max(jnp.abs(pred["dual"] - ref_w)),
            "a1_heavy_ball_at_w0": jnp.max(jnp.abs(pred["dual"] - ref_hb)),
            "a2_affine_gd": jnp.max(jnp.abs(pred["values"] - ref_aff)), "scale": jnp.max(jnp.abs(ref_w)),
            "a1_distance_to_plain_gd": jnp.max(jnp.abs(pred["dual"] - plain))}


@jax.jit
def heavy_ball_errors(models: tuple, batch: TaskBatch, schedules: tuple) -> list[Array]:
    """Max abs error of each heavy-ball layer stack in ``models`` against MomentumGD with its (etas, mus)."""
    return [jnp.max(jnp.abs(heavy_ball_predict(p, batch) - heavy_ball_reference(batch, e, m, e.shape[0])))
            for p, (e, m) in zip(models, schedules)]
