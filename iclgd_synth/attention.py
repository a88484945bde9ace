"""Self-attention updates: linear (dual and quadratic form, with or without a causal mask) and softmax.

Per head h the parameters are W_Q,h and W_K,h (Kq x D), W_V,h (Kv x D) and the projection P_h (D x Kv). The linear
self-attention update of token j is ("Transformers learn in-context by gradient descent", eq. 6)

    sum_h P_h sum_{i in keys(j)} (W_V,h e_i) (W_K,h e_i)^T (W_Q,h e_j)

Keys and values come from the context tokens (plus the query when ``include_query``); with a causal mask token j only
sees keys i <= j. The *dual form* ("Why Can GPT Learn In-Context?", the dual view of linear attention) regroups the
sum as P_h W_V,h C W_K,h^T W_Q,h e_j with C = sum_i e_i e_i^T (D x D): O(N D^2) work instead of O(N^2 D); with a
causal mask C becomes a prefix sum over tokens. The quadratic form builds the T x T score matrix and is kept as the
reference the tests compare against.

All functions return the update (not the new tokens) for every token, or for the query token alone when
``query_only`` (the read-out needs nothing else, which makes the last layer cheap).

*Momentum attention* ("Why Can GPT Learn In-Context?", momentum attention) adds to the update of token t a term over
the keys i strictly before t, for a decay beta (:func:`momentum_update`):

- ``kind="values"`` (the paper's form): sum_h P_h W_V,h sum_{i<t} beta^(t-i) e_i, i.e. decayed values alone;
- ``kind="dual"`` (momentum on the dual form's per-key terms, linear attention only):
  sum_h P_h W_V,h sum_{i<t} (beta + ... + beta^(t-i)) e_i e_i^T W_K,h^T W_Q,h e_t, so that key i enters token t's
  linear attention with weight 1 + beta + ... + beta^(t-i): heavy-ball momentum on the prefix-sum state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iclgd_synth.shapes import Array

FORMS = ("auto", "dual", "quadratic")
MOMENTUM_KINDS = ("values", "dual")


def key_mask(n_tokens: int, n_context_tokens: int, include_query: bool) -> Array:
    """Which tokens are keys and values, (T,) booleans: the context tokens, and the query if ``include_query``."""
    idx = jnp.arange(n_tokens)
    return (idx < n_context_tokens) | (include_query & (idx == n_tokens - 1))


def visible(n_tokens: int, keys_T: Array, causal: bool, query_only: bool) -> Array:
    """Mask (T_q, T) of the keys each query token may attend to."""
    rows = jnp.arange(n_tokens)[-1:] if query_only else jnp.arange(n_tokens)
    mask = jnp.broadcast_to(keys_T[None, :], (rows.shape[0], n_tokens))
    if causal:
        mask = mask & (jnp.arange(n_tokens)[None, :] <= rows[:, None])
    return mask


def head_products(layer: dict) -> tuple[Array, Array]:
    """Per-head products W_K^T W_Q and P W_V, each (H, D, D): all that a linear-attention layer depends on."""
    kq = jnp.einsum("hkd,hke->hde", layer["w_k"], layer["w_q"])
    pv = jnp.einsum("hdv,hve->hde", layer["w_p"], layer["w_v"])
    return kq, pv


def linear_attention_dual(tokens_BxTxD: Array, layer: dict, keys_T: Array, *, causal: bool = False,
                          normalize: bool = False, query_only: bool = False) -> Array:
    """Linear self-attention through C = sum_i e_i e_i^T (prefix sums of it with a causal mask)."""
    kq_HxDxD, pv_HxDxD = head_products(layer)
    keys_BxTxD = tokens_BxTxD * keys_T[None, :, None].astype(tokens_BxTxD.dtype)
    queries_BxTxD = tokens_BxTxD[:, -1:] if query_only else tokens_BxTxD
    if query_only:
        # The query alone (last in the sequence, so it sees every key, causal or not): C z is sum_t e_t (e_t . z),
        # two matrix-vector passes, O(N D) per head instead of forming C and the D x D x D product.
        z_BxHxD = jnp.einsum("hde,bqe->bhd", kq_HxDxD, queries_BxTxD)
        a_BxHxT = jnp.einsum("btd,bhd->bht", keys_BxTxD, z_BxHxD)
        s_BxHxD = jnp.einsum("bht,bte->bhe", a_BxHxT, keys_BxTxD)
        update = jnp.einsum("hde,bhe->bd", pv_HxDxD, s_BxHxD)[:, None, :]
        count = jnp.sum(keys_T)
    elif not causal:
        # Every query sees every key.
        c_BxDxD = jnp.einsum("btd,bte->bde", keys_BxTxD, keys_BxTxD)
        m_BxDxD = jnp.einsum("hde,bef,hfg->bdg", pv_HxDxD, c_BxDxD, kq_HxDxD)
        update = jnp.einsum("bdg,btg->btd", m_BxDxD, queries_BxTxD)
        count = jnp.sum(keys_T)
    else:
        c_BxTxDxD = jnp.cumsum(jnp.einsum("btd,bte->btde", keys_BxTxD, keys_BxTxD), axis=1)
        z_BxTxHxD = jnp.einsum("hde,bte->bthd", kq_HxDxD, queries_BxTxD)
        s_BxTxHxD = jnp.einsum("btde,bthe->bthd", c_BxTxDxD, z_BxTxHxD)
        update = jnp.einsum("hde,bthe->btd", pv_HxDxD, s_BxTxHxD)
        count = jnp.cumsum(keys_T)[:, None]
    if normalize:
        update = update / jnp.maximum(count, 1).astype(update.dtype)
    return update


def linear_attention_quadratic(tokens_BxTxD: Array, layer: dict, keys_T: Array, *, causal: bool = False,
                               normalize: bool = False, query_only: bool = False) -> Array:
    """Linear self-attention through the explicit T x T score matrix (the reference form)."""
    scores_BxHxQxT, v_BxHxTxV, mask_QxT = _scores_and_values(tokens_BxTxD, layer, keys_T, causal, query_only)
    weights = scores_BxHxQxT * mask_QxT.astype(scores_BxHxQxT.dtype)
    if normalize:
        weights = weights / jnp.maximum(mask_QxT.sum(-1, keepdims=True), 1).astype(weights.dtype)
    return _combine(weights, v_BxHxTxV, layer)


def softmax_attention(tokens_BxTxD: Array, layer: dict, keys_T: Array, *, causal: bool = False,
                      normalize: bool = False, query_only: bool = False) -> Array:
    """Softmax self-attention with logits (W_Q e_j).(W_K e_i) / sqrt(Kq); ``normalize`` has no effect."""
    del normalize  # softmax weights already sum to one
    scores_BxHxQxT, v_BxHxTxV, mask_QxT = _scores_and_values(tokens_BxTxD, layer, keys_T, causal, query_only)
    logits = scores_BxHxQxT / jnp.sqrt(jnp.asarray(layer["w_q"].shape[1], scores_BxHxQxT.dtype))
    logits = jnp.where(mask_QxT, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1) * mask_QxT.astype(logits.dtype)
    return _combine(weights, v_BxHxTxV, layer)


def attention_update(tokens_BxTxD: Array, layer: dict, keys_T: Array, *, kind: str = "linear", causal: bool = False,
                     normalize: bool = False, query_only: bool = False, form: str = "auto") -> Array:
    """Dispatch on the attention kind and the computation form ("auto" = dual form for linear attention)."""
    kwargs = dict(causal=causal, normalize=normalize, query_only=query_only)
    if kind == "softmax":
        return softmax_attention(tokens_BxTxD, layer, keys_T, **kwargs)
    if form == "quadratic":
        return linear_attention_quadratic(tokens_BxTxD, layer, keys_T, **kwargs)
    return linear_attention_dual(tokens_BxTxD, layer, keys_T, **kwargs)


def _scores_and_values(tokens_BxTxD, layer, keys_T, causal, query_only):
    t = tokens_BxTxD.shape[1]
    queries = tokens_BxTxD[:, -1:] if query_only else tokens_BxTxD
    q_BxHxQxK = jnp.einsum("hkd,btd->bhtk", layer["w_q"], queries)
    k_BxHxTxK = jnp.einsum("hkd,btd->bhtk", layer["w_k"], tokens_BxTxD)
    v_BxHxTxV = jnp.einsum("hvd,btd->bhtv", layer["w_v"], tokens_BxTxD)
    scores = jnp.einsum("bhqk,bhtk->bhqt", q_BxHxQxK, k_BxHxTxK)
    return scores, v_BxHxTxV, visible(t, keys_T, causal, query_only)


def _combine(weights_BxHxQxT, v_BxHxTxV, layer):
    out_BxHxQxV = jnp.einsum("bhqt,bhtv->bhqv", weights_BxHxQxT, v_BxHxTxV)
    return jnp.einsum("hdv,bhqv->bqd", layer["w_p"], out_BxHxQxV)


def momentum_weights(n_tokens: int, keys_T: Array, beta, kind: str = "values", query_only: bool = False) -> Array:
    """Weight (T_q, T) of key i in token t's momentum term: beta^(t-i) ("values") or beta + ... + beta^(t-i)
    ("dual") for keys i < t, else 0."""
    rows = jnp.arange(n_tokens)[-1:] if query_only else jnp.arange(n_tokens)
    lag = rows[:, None] - jnp.arange(n_tokens)[None, :]
    powers = jnp.asarray(beta, jnp.result_type(float)) ** jnp.arange(n_tokens)
    table = powers if kind == "values" else jnp.cumsum(powers) - 1.0
    weights = table[jnp.clip(lag, 0, n_tokens - 1)]
    return jnp.where((lag > 0) & keys_T[None, :], weights, 0.0)


def momentum_update(tokens_BxTxD: Array, layer: dict, keys_T: Array, beta, *, kind: str = "values",
                    causal: bool = False, normalize: bool = False, query_only: bool = False) -> Array:
    """The momentum-attention term (see the module docstring), added to the attention update of every token (or the
    query alone). With ``normalize`` it is divided by the same key count as the linear attention sum."""
    t = tokens_BxTxD.shape[1]
    w_QxT = momentum_weights(t, keys_T, beta, kind, query_only).astype(tokens_BxTxD.dtype)
    kq_HxDxD, pv_HxDxD = head_products(layer)
    if kind == "values":
        s_BxQxD = jnp.einsum("qt,btd->bqd", w_QxT, tokens_BxTxD)
        update = jnp.einsum("hde,bqe->bqd", pv_HxDxD, s_BxQxD)
    else:
        queries_BxQxD = tokens_BxTxD[:, -1:] if query_only else tokens_BxTxD
        scores_BxHxQxT = jnp.einsum("btd,hde,bqe->bhqt", tokens_BxTxD, kq_HxDxD, queries_BxQxD)
        weighted = scores_BxHxQxT * w_QxT
        update = jnp.einsum("hde,bhqt,bte->bqd", pv_HxDxD, weighted, tokens_BxTxD)
    if normalize:
        count = visible(t, keys_T, causal, query_only).sum(-1)[:, None]
        update = update / jnp.maximum(count, 1).astype(update.dtype)
    return update
