"""The dual form of linear attention: the query's attention update as implicit weights acting on the query token.

"Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as Meta-Optimizers" (the dual view
of linear attention). For one linear-attention layer with input tokens e_1..e_T (query e_q last) the query's attention
update is

    sum_h P_h sum_{i in keys} c_i (W_V,h e_i)(W_K,h e_i)^T (W_Q,h e_q)  [/ number of keys with ``normalize``]
      = (W_ZSL + Delta W_ICL) e_q + b

with, in token space (D x D, acting on the layer's query token e_q):

    Delta W_ICL = sum_h P_h W_V,h (sum_{i in demonstrations} c_i e_i e_i^T) W_K,h^T W_Q,h
    W_ZSL       = sum_h P_h W_V,h (e_q e_q^T) W_K,h^T W_Q,h   if the query is a key (``include_query``), else 0

and per head in the paper's form, acting on q_h = W_Q,h e_q: Delta W_ICL,h = sum_i c_i (P_h W_V,h e_i)(W_K,h e_i)^T
(D x Kq). Demonstrations are the context tokens (all 2N of them in the interleaved layout). c_i = 1 without
momentum; with ``momentum_kind="dual"`` c_i = 1 + beta + ... + beta^(t-i) (t the query's position); b = 0 except for
``momentum_kind="values"``, b = sum_i beta^(t-i) P W_V e_i. For the hand-constructed GD layer (W0 = 0)
Delta W_ICL has a single nonzero block, row y, columns x: -(eta/N) sum_i y_i x_i^T = eta * grad L(W0), the negative
of the GD step's update (the read-out is minus the y-entry, so the prediction is the GD step's). A causal mask does
not change the query's dual form (the query sees every key); in multi-layer models the layer's input tokens are used.

The layer-level dual form used inside the forward pass (C = sum_i e_i e_i^T, O(N D^2)) is in
:mod:`~iclgd_synth.attention`; this module exposes the query's implicit weights as an object
(:class:`DualForm`), checks them against the model's own update (:func:`reconstruction_error`) and exports them
(:func:`export_dual_forms`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth import attention as attn
from iclgd_synth.model import TransformerParams, check_params, forward, layer_norm
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, validate_batch
from iclgd_synth.tokens import build_tokens, n_context_tokens


@flax.struct.dataclass
class DualForm:
    """The dual form of one linear-attention layer at the query, per task (see the module docstring).

    Attributes:
      delta_w_icl: (B, D, D) the demonstrations' implicit weights, acting on the query token.
      w_zsl: (B, D, D) the query-side part (0 unless the query is a key).
      bias: (B, D) the part independent of the query (momentum attention of kind "values"; else 0).
      query: (B, D) the query token entering the layer (after its LayerNorm, if any).
      delta_w_icl_heads, w_zsl_heads: (B, H, D, Kq) the same per head, acting on q_h = W_Q,h e_q.
      q_heads: (B, H, Kq) the per-head query vectors.
    """

    delta_w_icl: Array
    w_zsl: Array
    bias: Array
    query: Array
    delta_w_icl_heads: Array
    w_zsl_heads: Array
    q_heads: Array

    def output(self) -> Array:
        """(W_ZSL + Delta W_ICL) e_q + b: the query's attention update, (B, D)."""
        return jnp.einsum("bde,be->bd", self.w_zsl + self.delta_w_icl, self.query) + self.bias

    def output_from_heads(self) -> Array:
        """The same from the per-head matrices and query vectors, (B, D)."""
        return jnp.einsum("bhdk,bhk->bd", self.w_zsl_heads + self.delta_w_icl_heads, self.q_heads) + self.bias


def layer_input_tokens(params: TransformerParams, batch: TaskBatch, layer: int = 0, w0: Array | None = None) -> Array:
    """The tokens entering layer application ``layer`` (0-based; recurrent loops count), (B, T, D)."""
    tokens = build_tokens(batch, params.arch.layout, w0)
    if layer == 0:
        return tokens
    outs = forward(params, tokens, n_context_tokens(batch.n_context, params.arch.layout), return_all=True)
    return outs[layer - 1]


def dual_form(params: TransformerParams, batch: TaskBatch, layer: int = 0, w0: Array | None = None) -> DualForm:
    """The dual form of layer application ``layer`` of a linear-attention model at the query, per task."""
    check_params(params)
    batch = validate_batch(batch)
    arch = params.arch
    if arch.attention != "linear":
        raise ValueError("the dual form is defined for linear attention (attention='linear'); softmax attention "
                         "has no fixed implicit weight matrix")
    schedule = [lyr for _ in range(arch.n_loops) for lyr in params.layers]
    if not 0 <= layer < len(schedule):
        raise ValueError(f"layer must be in [0, {len(schedule)}), got {layer}")
    lyr = schedule[layer]
    dtype = jnp.result_type(batch.x.dtype, *jax.tree.leaves(params))
    batch = jax.tree.map(lambda a: a.astype(dtype), batch)
    tokens = layer_input_tokens(params, batch, layer, w0)
    if "ln_attn" in lyr:
        tokens = layer_norm(tokens, lyr["ln_attn"])
    t = tokens.shape[1]
    n_ctx = n_context_tokens(batch.n_context, arch.layout)
    keys_T = attn.key_mask(t, n_ctx, arch.include_query)
    pos = jnp.arange(t)
    c_T = jnp.ones(t, dtype)
    if arch.momentum is not None and arch.momentum_kind == "dual":
        c_T = c_T + attn.momentum_weights(t, keys_T, arch.momentum, "dual", query_only=True)[0].astype(dtype)
    demo_T = (pos < n_ctx).astype(dtype) * c_T
    self_T = ((pos == t - 1) & arch.include_query).astype(dtype)
    count = jnp.maximum(jnp.sum(keys_T), 1).astype(dtype) if arch.normalize else jnp.asarray(1.0, dtype)
    v_BxHxTxV = jnp.einsum("hvd,btd->bhtv", lyr["w_v"], tokens)
    pv_BxHxTxD = jnp.einsum("hdv,bhtv->bhtd", lyr["w_p"], v_BxHxTxV)
    k_BxHxTxK = jnp.einsum("hkd,btd->bhtk", lyr["w_k"], tokens)
    delta_h = jnp.einsum("t,bhtd,bhtk->bhdk", demo_T, pv_BxHxTxD, k_BxHxTxK) / count
    zsl_h = jnp.einsum("t,bhtd,bhtk->bhdk", self_T, pv_BxHxTxD, k_BxHxTxK) / count
    delta = jnp.einsum("bhdk,hke->bde", delta_h, lyr["w_q"])
    zsl = jnp.einsum("bhdk,hke->bde", zsl_h, lyr["w_q"])
    bias = jnp.zeros(tokens.shape[::2], dtype)
    if arch.momentum is not None and arch.momentum_kind == "values":
        w_T = attn.momentum_weights(t, keys_T, arch.momentum, "values", query_only=True)[0].astype(dtype)
        bias = jnp.einsum("t,bhtd->bd", w_T, pv_BxHxTxD) / count
    query = tokens[:, -1]
    q_heads = jnp.einsum("hkd,bd->bhk", lyr["w_q"], query)
    return DualForm(delta_w_icl=delta, w_zsl=zsl, bias=bias, query=query, delta_w_icl_heads=delta_h,
                    w_zsl_heads=zsl_h, q_heads=q_heads)


def query_attention_update(params: TransformerParams, batch: TaskBatch, layer: int = 0,
                           w0: Array | None = None) -> Array:
    """The query's change at layer application ``layer`` as the model computes it (attention-only layers), (B, D)."""
    batch = validate_batch(batch)
    dtype = jnp.result_type(batch.x.dtype, *jax.tree.leaves(params))
    batch = jax.tree.map(lambda a: a.astype(dtype), batch)
    tokens = build_tokens(batch, params.arch.layout, w0)
    outs = forward(params, tokens, n_context_tokens(batch.n_context, params.arch.layout), return_all=True)
    before = tokens if layer == 0 else outs[layer - 1]
    return outs[layer][:, -1] - before[:, -1]


def reconstruction_error(params: TransformerParams, batch: TaskBatch) -> float:
    """max over layer applications of max |(W_ZSL + Delta W_ICL) e_q + b - the layer's query update| relative to the
    largest update (0 up to rounding: the dual form is exact; compute in float64)."""
    errs = [_relative_error(dual_form(params, batch, layer), query_attention_update(params, batch, layer))
            for layer in range(params.depth)]
    return max(errs)


def _relative_error(df: DualForm, ref: Array) -> float:
    return float(jnp.max(jnp.abs(df.output() - ref)) / (jnp.max(jnp.abs(ref)) + 1e-300))


def export_dual_forms(path: str | Path, models: Mapping[str, TransformerParams], batch: TaskBatch
                      ) -> dict[str, Any]:
    """Write the dual form of every layer application of every (linear-attention) model on ``batch`` to ``path``
    (a NumPy .npz archive) and return an index {label: {"key", "layers", "max_relative_error"}}.

    Archive entries (B tasks, D token dim, H heads, Kq key size; model i has key ``model{i}``, layer l is 1-based):

    - ``tasks/x`` (B, N, d), ``tasks/y`` (B, N[, O]), ``tasks/x_query`` (B, d), ``tasks/y_query``: the tasks;
    - ``model_labels``: the labels, in key order; ``model{i}/label``;
    - ``model{i}/layer{l}/w_zsl``, ``.../delta_w_icl`` (B, D, D): the implicit weights, acting on the query token;
    - ``.../query`` (B, D): the query token entering the layer (after its LayerNorm, if any), the one they act on;
    - ``.../bias`` (B, D): the query-independent part (momentum attention of kind "values"; else 0);
    - ``.../w_zsl_heads``, ``.../delta_w_icl_heads`` (B, H, D, Kq) and ``.../q_heads`` (B, H, Kq): the per-head form;
    - ``.../query_update`` (B, D): the layer's change of the query token computed by the model's forward pass, so
      that (w_zsl + delta_w_icl) @ query + bias == query_update can be checked from the file alone.
    """
    batch = validate_batch(batch)
    arrays: dict[str, np.ndarray] = {f"tasks/{name}": np.asarray(getattr(batch, name))
                                     for name in ("x", "y", "x_query", "y_query")}
    index: dict[str, Any] = {}
    for i, (label, params) in enumerate(models.items()):
        key = f"model{i}"
        arrays[f"{key}/label"] = np.array(label)
        errs = []
        for layer in range(params.depth):
            df = dual_form(params, batch, layer)
            ref = query_attention_update(params, batch, layer)
            pre = f"{key}/layer{layer + 1}/"
            for name in ("w_zsl", "delta_w_icl", "query", "bias", "w_zsl_heads", "delta_w_icl_heads", "q_heads"):
                arrays[pre + name] = np.asarray(getattr(df, name))
            arrays[pre + "query_update"] = np.asarray(ref)
            errs.append(_relative_error(df, ref))
        index[label] = {"key": key, "layers": params.depth, "max_relative_error": max(errs)}
    arrays["model_labels"] = np.array(list(models))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return index
