"""Hand-constructed linear self-attention weights that implement gradient-descent steps exactly.

One GD step on L(W) = 1/(2N) sum_i ||W x_i - y_i||^2 from W0 ("Transformers learn in-context by gradient descent",
Proposition 1):

    W_K = W_Q = [[I_d, 0], [0, 0]]     W_V = [[0, 0], [W0, -I]]     P = (eta / N) I

turns every token (x_j, y_j) into (x_j, y_j - Delta W x_j) with Delta W = -(eta/N) sum_i (W0 x_i - y_i) x_i^T, and the
query token (x_q, -W0 x_q) into (x_q, -(W0 + Delta W) x_q): the read-out is the one-step GD prediction. K such layers
are K GD steps. GD++ adds the input transformation x_j <- (I - gamma X X^T) x_j through the x-block of W_V and
P = [[-gamma I, 0], [0, (eta/N) I]].

Every function returns :class:`~iclgd_synth.model.TransformerParams`, the same pytree the trainer produces.

About N: P1 writes the 1/N into P, which ties the weights to the number of demonstrations. Pass ``n_context`` to get
exactly that. Leave it None and the construction uses P = eta I with ``Arch.normalize`` (1/N applied inside the
layer), so the same weights implement GD with step eta for any N.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from iclgd_synth.model import Arch, TransformerParams, check_params
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import check_dtype
from iclgd_synth.tokens import heavy_ball_token_dim
from iclgd_synth.validation import check_float, check_int, is_concrete


def gd_layer(dim: int, eta: Any, *, n_context: int | None = None, out_dim: int = 1, w0: Array | None = None,
             gamma: Any = 0.0, dtype: Any = None) -> dict:
    """One layer (one head, Kq = Kv = D) implementing a GD step with step ``eta`` (GD++ when ``gamma`` != 0)."""
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
    d, o = check_int("dim", dim, min_value=1), check_int("out_dim", out_dim, min_value=1)
    check_float("eta", eta)
    check_float("gamma", gamma)
    if n_context is not None:
        check_int("n_context", n_context, min_value=1)
    dd = d + o
    scale = 1.0 if n_context is None else 1.0 / n_context
    w_kq = jnp.zeros((dd, dd), dtype).at[:d, :d].set(jnp.eye(d, dtype=dtype))
    w_v = jnp.zeros((dd, dd), dtype).at[d:, d:].set(-jnp.eye(o, dtype=dtype))
    if w0 is not None:
        w0 = jnp.asarray(w0, dtype)
        if w0.shape not in ((o, d),) + (((d,),) if o == 1 else ()):
            raise ValueError(f"w0 must have shape {'(d,) or ' if o == 1 else ''}(d_out, d) = {(o, d)}, "
                             f"got {tuple(w0.shape)}")
        w_v = w_v.at[d:, :d].set(w0.reshape(o, d))
    w_p = jnp.zeros((dd, dd), dtype).at[d:, d:].set(jnp.asarray(eta, dtype) * scale * jnp.eye(o, dtype=dtype))
    if _is_traced(gamma) or np.any(np.asarray(gamma) != 0):
        w_v = w_v.at[:d, :d].set(jnp.eye(d, dtype=dtype))
        w_p = w_p.at[:d, :d].set(-jnp.asarray(gamma, dtype) * jnp.eye(d, dtype=dtype))
    return {"w_q": w_kq[None], "w_k": w_kq[None], "w_v": w_v[None], "w_p": w_p[None]}


def gd_params(dim: int, eta: Any, n_layers: int = 1, *, n_context: int | None = None, out_dim: int = 1,
              w0: Array | None = None, recurrent: bool = False, dtype: Any = None) -> TransformerParams:
    """LSA parameters whose prediction equals ``n_layers`` steps of GD with step ``eta`` from W0 (default 0).

    Args:
      dim: input dimension d (>= 1).
      eta: step size, a finite real; for a deep model also a sequence of ``n_layers`` per-layer step sizes.
      n_layers: number of GD steps K (>= 1).
      n_context: N, to write 1/N into P as the reference paper does; None (default) applies 1/N inside the layer.
      out_dim: output dimension d_out (>= 1).
      w0: the initial model, (d,) or (d_out, d); None means 0.
      recurrent: one layer applied K times (requires a scalar eta) instead of K separate layers.
      dtype: a float dtype (None: JAX's default float); an integer dtype would truncate the weights.
    """
    dtype = check_dtype(dtype)
    etas = _per_layer("eta", eta, n_layers, recurrent)
    return _stack(dim, n_layers, recurrent, n_context,
                  [gd_layer(dim, e, n_context=n_context, out_dim=out_dim, w0=w0, dtype=dtype) for e in etas])


def gdpp_params(dim: int, eta: Any, gamma: Any, n_layers: int = 1, *, n_context: int, out_dim: int = 1,
                recurrent: bool = False, dtype: Any = None) -> TransformerParams:
    """LSA parameters implementing ``n_layers`` steps of GD++ (per-layer eta and gamma allowed), from W0 = 0.

    ``n_context`` is required: the step carries 1/N but the input transformation (I - gamma X X^T) does not.
    """
    check_int("n_context", n_context, min_value=1)
    dtype = check_dtype(dtype)  # an integer dtype would truncate eta / N to 0: a model predicting zeros
    etas = _per_layer("eta", eta, n_layers, recurrent)
    gammas = _per_layer("gamma", gamma, n_layers, recurrent)
    layers = [gd_layer(dim, e, n_context=n_context, out_dim=out_dim, gamma=g, dtype=dtype)
              for e, g in zip(etas, gammas)]
    return _stack(dim, n_layers, recurrent, n_context, layers)


def heavy_ball_layer(dim: int, eta: Any, mu: Any, n_context: int, out_dim: int = 1, dtype: Any = None) -> dict:
    """One layer (1 + d_out heads, key and value size D') performing one heavy-ball step on every token.

    It reads the tokens e = (x, y, r, 1) of :func:`iclgd_synth.tokens.heavy_ball_tokens` (D' = d + 2 d_out + 1; r is
    the previous step's change of the residual target, r_j = -(w_k - w_{k-1}) x_j, 1 a constant channel). Head 0 is
    the GD head (W_K^T W_Q = the x-block identity, value -y, projected with eta / N onto y *and* r); for each output
    dimension m, head 1 + m has key = the constant channel, query = r_m, value = the constant channel, so its output
    at token j is N r_{j,m}, projected with mu / N onto y_m and (mu - 1) / N onto r_m. Then
    y_j <- y_j - Delta w x_j + mu r_j and r_j <- -Delta w x_j + mu r_j: one heavy-ball step
    w_{k+1} = w_k - eta grad L(w_k) + mu (w_k - w_{k-1}) on every token's residual. Needs non-causal keys over the N
    demonstrations and no normalisation (the default :class:`~iclgd_synth.model.Arch`).
    """
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
    d, o = check_int("dim", dim, min_value=1), check_int("out_dim", out_dim, min_value=1)
    n = check_int("n_context", n_context, min_value=1)
    check_float("eta", eta)
    check_float("mu", mu)
    dd = heavy_ball_token_dim(d, o)
    ys, rs, one = slice(d, d + o), slice(d + o, d + 2 * o), d + 2 * o
    h = 1 + o
    w_q = np.zeros((h, dd, dd))
    w_k = np.zeros((h, dd, dd))
    w_v = np.zeros((h, dd, dd))
    w_p = np.zeros((h, dd, dd))
    w_q[0, :d, :d] = w_k[0, :d, :d] = np.eye(d)           # head 0: scores x_i . x_j
    w_v[0, ys, ys] = -np.eye(o)                            # value: minus the residual target
    eye_o = np.eye(o)
    for m in range(o):                                     # head 1 + m: per-token term r_{j,m}
        w_k[1 + m, 0, one] = 1.0                           # key: the constant channel
        w_q[1 + m, 0, d + o + m] = 1.0                     # query: r_{j,m}
        w_v[1 + m, 0, one] = 1.0                           # value: the constant channel
    w_p[0, ys, ys] = w_p[0, rs, ys] = float(eta) / n * eye_o   # GD head: onto y and r
    for m in range(o):
        w_p[1 + m, d + m, 0] = float(mu) / n                  # mu r onto y
        w_p[1 + m, d + o + m, 0] = (float(mu) - 1.0) / n      # (mu - 1) r onto r
    w_q, w_k, w_v, w_p = (jnp.asarray(a, dtype) for a in (w_q, w_k, w_v, w_p))
    return {"w_q": w_q, "w_k": w_k, "w_v": w_v, "w_p": w_p}


def heavy_ball_params(dim: int, eta: Any, mu: Any, n_steps: int, n_context: int, out_dim: int = 1,
                      dtype: Any = None) -> TransformerParams:
    """K layers implementing K heavy-ball steps (scalar or per-step ``eta`` and ``mu``), from w = 0
    (:func:`heavy_ball_layer`; read out as minus the y-part of the query token of
    :func:`iclgd_synth.tokens.heavy_ball_tokens`)."""
    k = check_int("n_steps", n_steps, min_value=1)
    etas, mus = (np.asarray(v, np.float64) for v in (eta, mu))
    for name, v in (("eta", etas), ("mu", mus)):
        if v.shape not in ((), (k,)):
            raise ValueError(f"{name} must be a scalar or have shape (n_steps,) = ({k},), got {v.shape}")
    etas, mus = np.broadcast_to(etas, (k,)), np.broadcast_to(mus, (k,))
    layers = tuple(heavy_ball_layer(dim, float(e), float(m), n_context, out_dim, dtype) for e, m in zip(etas, mus))
    return TransformerParams(layers=layers, arch=Arch())


def split_heads(params: TransformerParams, n_heads: int) -> TransformerParams:
    """Spread each single-head construction over ``n_heads`` heads that sum to the same update.

    Head h keeps the rows of W_K and W_Q for its share of the input coordinates (a partition of the first d rows;
    the y rows go to the last head), so sum_h W_K,h^T W_Q,h equals the original W_K^T W_Q. The output is unchanged
    for linear attention; every head's key size stays D.
    """
    check_params(params)
    layers = []
    for layer in params.layers:
        if layer["w_q"].shape[0] != 1:
            raise ValueError("split_heads takes single-head parameters")
        dd = layer["w_q"].shape[-1]
        h = check_int("n_heads", n_heads, min_value=1, max_value=dd)
        owner = np.minimum(np.arange(dd) * h // dd, h - 1)
        masks = jnp.asarray(owner[None, :] == np.arange(h)[:, None], layer["w_q"].dtype)  # (H, Kq)
        layers.append({
            "w_q": layer["w_q"] * masks[:, :, None], "w_k": layer["w_k"] * masks[:, :, None],
            "w_v": jnp.repeat(layer["w_v"], h, axis=0), "w_p": jnp.repeat(layer["w_p"], h, axis=0),
        })
    return params.replace(layers=tuple(layers))


def from_products(kq: Array, pv: Array, *, arch: Arch = Arch()) -> TransformerParams:
    """Single-head parameters with given products W_K^T W_Q = ``kq`` and P W_V = ``pv`` (each (D, D) or (K, D, D)).

    Linear attention depends on the weights only through these products, so this rebuilds a model from them
    (W_K = P = I, W_Q = kq, W_V = pv); used for interpolating between trained and constructed weights.
    """
    kq, pv = jnp.asarray(kq), jnp.asarray(pv)
    if kq.shape != pv.shape or kq.ndim not in (2, 3) or kq.shape[-1] != kq.shape[-2]:
        raise ValueError(f"kq and pv must both have shape (D, D) or (K, D, D); got {kq.shape} and {pv.shape}")
    kq, pv = (kq[None], pv[None]) if kq.ndim == 2 else (kq, pv)
    eye = jnp.eye(kq.shape[-1], dtype=kq.dtype)[None]
    layers = tuple({"w_q": q[None], "w_k": eye, "w_v": v[None], "w_p": eye} for q, v in zip(kq, pv))
    return TransformerParams(layers=layers, arch=arch)


def _per_layer(name: str, value: Any, n_layers: int, recurrent: bool) -> list:
    n_layers = check_int("n_layers", n_layers, min_value=1)
    # A traced value (under jit / vmap) has a known shape though not a value: per-layer step sizes work there too.
    shape = tuple(np.shape(value)) if _is_traced(value) else np.asarray(check_float(name, value)).shape
    if shape == ():
        return [value] * (1 if recurrent else n_layers)
    if recurrent:
        raise ValueError(f"{name} must be a scalar for a recurrent model (one set of weights), got shape {shape}")
    if shape != (n_layers,):
        raise ValueError(f"{name} must be a scalar or have shape (n_layers,) = ({n_layers},), got {shape}")
    return [value[i] for i in range(n_layers)]


def _stack(dim, n_layers, recurrent, n_context, layers) -> TransformerParams:
    check_int("dim", dim, min_value=1)
    arch = Arch(n_loops=n_layers if recurrent else 1, normalize=n_context is None)
    return TransformerParams(layers=tuple(layers), arch=arch)


def _is_traced(x: Any) -> bool:
    return not is_concrete(x)


def causal_hand_params(dim: int, eta: Any, n_layers: int, n_context: int) -> TransformerParams:
    """The hand-constructed K-step GD weights (1/N in P, ``n_context`` = N) run with a causal mask.

    With the mask, context token t is updated from the prefix sum sum_{i<=t} e_i e_i^T, so after one layer its
    residual target is y_t - Delta W_(t) x_t with Delta W_(t) = (eta/N) sum_{i<=t} y_i x_i^T: the 1/N in P stays
    fixed, so this is one GD step of size eta * t / N on the in-context loss of demonstrations 1..t. The query (last
    token) still sees every key, so one causal layer equals one GD step and is invariant to the order of the
    demonstrations; from layer 2 on the query reads residuals that depend on the order, so a 2+-layer causal model
    is order-sensitive and no longer K-step GD ("Do pretrained Transformers Learn In-Context by Gradient Descent?").
    """
    import dataclasses

    params = gd_params(dim, eta, n_layers=n_layers, n_context=n_context)
    return params.replace(arch=dataclasses.replace(params.arch, causal=True))
