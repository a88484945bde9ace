"""The dual form of linear attention as an object, ICL-vs-fine-tuning metrics, and momentum attention.

**Dual form** ("Why Can GPT Learn In-Context?", the dual view of linear attention). For one linear-attention layer
with input tokens e_1..e_T (query e_q last) the query's attention update is

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

**ICL vs fine-tuning** (metrics of the same paper, definitions in :mod:`~iclgd_synth.critiques.alignment` and
:mod:`~iclgd_synth.critiques.finetune`). A 1-layer LSA trained with ``include_query`` (so that the query alone, the
zero-shot model, has a key: itself); h = the query's attention update (a D-vector):

- h_ICL: demonstrations in context; h_ZSL: query alone; h_FT: query alone after fine-tuning W_K and W_V of the
  zero-shot model by full-batch GD on the demonstrations (each a lone query (x_i, 0) with target y_i; step size tuned
  on separate tasks for the lowest query loss).
- SimAOU = cos(h_ICL - h_ZSL, h_FT - h_ZSL) per task, averaged; baselines: the same FT update norm in a random
  direction, and the fine-tuned copy of *another* task.
- SimAM_delta on the query's own attention score, the only key ICL, ZSL and FT share (ZSL and FT see the query
  alone). It is undefined at layer 1 of any model, hence for a 1-layer model: the score (W_K e_q).(W_Q e_q) depends
  only on the token entering the layer, which at layer 1 is (x_q, 0) with and without demonstrations, so
  m_ICL - m_ZSL = 0 (the report gives the measured max |m_ICL - m_ZSL|). From layer 2 on ICL's earlier layers have
  changed the query token using the demonstrations, m_ICL - m_ZSL != 0 and SimAM_delta is defined: the study trains
  a K-layer query-as-key LSA (``multilayer_depth``, default 2) and reports SimAM_delta at layers 2..K (one cosine
  across tasks of the scalar changes, as in :mod:`~iclgd_synth.critiques.causality`) with its random-direction
  baseline, next to the per-layer SimAOU.
- Known-answer control: the hand-constructed GD layer with its adapter fine-tuned by one GD step of size eta (from
  0) on the demonstrations: fine-tuning then equals ICL exactly, and the metrics must read SimAOU 1, Kendall signed
  1 (contribution (eta/N) y_i x_i.x_q and influence y_i x_i.x_q rank alike) and Rec2FTP 1.
- Kendall's tau per task between ICL's attention over the demonstrations and FT's per-demonstration influence:
  (i) |score| = |(W_K e_i).(W_Q e_q)| against |influence|, (ii) the signed contribution of demonstration i to the ICL
  prediction against the signed influence, where influence_i = -<grad_theta y_hat_ZSL(x_q), grad_theta l_i(theta_0)>
  is the first-order change of the zero-shot prediction per unit step from a GD step on demonstration i alone.
  Baseline: the same with the influences shuffled within each task.
- Rec2FTP: of the tasks where FT lowers the query's absolute error below zero-shot's, the fraction where ICL does;
  reported with ICL's unconditional rate and with the random-direction FT in place of FT.

**Export**: ``dual_form.npz`` in the run directory holds, for a few evaluation tasks, every model's W_ZSL,
Delta W_ICL, bias and query token per layer, and the layer's own query update (:func:`export_dual_forms`).

**Momentum attention**: the exact relations of :mod:`~iclgd_synth.critiques.momentum` measured in float64, and
vanilla vs momentum attention trained on the ICL objective with the same data and number of steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth import attention as attn
from iclgd_synth.constructions import gd_params
from iclgd_synth.critiques import _common as C
from iclgd_synth.critiques import alignment as A
from iclgd_synth.critiques import causality as CA
from iclgd_synth.critiques import finetune as F
from iclgd_synth.critiques import momentum as MO
from iclgd_synth.learners import gd_weights, tune_gd
from iclgd_synth.metrics import loss as model_loss
from iclgd_synth.model import ModelConfig, TransformerParams, check_params, forward, layer_norm
from iclgd_synth.shapes import Array
from iclgd_synth.studies.rundir import finish_run
from iclgd_synth.tasks import TASK_PRESETS, TaskBatch, TaskConfig, sample, validate_batch
from iclgd_synth.tokens import build_tokens, n_context_tokens
from iclgd_synth.train import TrainConfig
from iclgd_synth.validation import check_choice

TUNE_SEED, EVAL_SEED = 6_000_011, 7_000_003
#: The 1-layer model of the ICL-vs-FT metrics (the query is a key, so the zero-shot copy has one).
IQ_LABEL = "LSA, query is a key (for ICL vs FT)"


def multilayer_label(k: int) -> str:
    """The K-layer query-as-key model on which SimAM_delta is measured at layers >= 2."""
    return f"LSA, {k} layers, query is a key (SimAM_delta)"


# ---------------------------------------------------------------------------------------------------- the dual form

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
            errs.append(float(jnp.max(jnp.abs(df.output() - ref)) / (jnp.max(jnp.abs(ref)) + 1e-300)))
        index[label] = {"key": key, "layers": params.depth, "max_relative_error": max(errs)}
    arrays["model_labels"] = np.array(list(models))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return index


# ------------------------------------------------------------------------------------------------- ICL vs fine-tuning

def icl_attention_terms(params: TransformerParams, batch: TaskBatch) -> tuple[Array, Array]:
    """Layer 1's scores of the query over the demonstrations (summed over heads) and each demonstration's signed
    contribution to the prediction (minus the y-part of its term), each (B, N)."""
    batch = validate_batch(batch)
    tokens = build_tokens(batch, params.arch.layout)
    lyr = params.layers[0]
    n, d = batch.n_context, batch.dim
    k = jnp.einsum("hkd,btd->bhtk", lyr["w_k"], tokens[:, :n])
    q = jnp.einsum("hkd,bd->bhk", lyr["w_q"], tokens[:, -1])
    s_BxHxN = jnp.einsum("bhtk,bhk->bht", k, q)
    pv = jnp.einsum("hdv,hve,bte->bhtd", lyr["w_p"], lyr["w_v"], tokens[:, :n])
    contrib = -jnp.einsum("bht,bhto->bt", s_BxHxN, pv[..., d:])
    if params.arch.normalize:
        contrib = contrib / (n + int(params.arch.include_query))
    return s_BxHxN.sum(1), contrib


@functools.partial(jax.jit, static_argnames=("param_set",))
def ft_influence(zs: F.ZeroShotModel, batch: TaskBatch, param_set: str = "attention") -> Array:
    """influence_i = -<grad_theta y_hat(x_q), grad_theta l_i> for theta = the fine-tuned parameters (``param_set``:
    W_K, W_V of every layer, or the adapters), (B, N): the first-order change of the zero-shot prediction per unit
    step of GD on demonstration i alone (scalar outputs)."""
    def one(x_Nxd, y_N, xq_d):
        theta0 = F.select_params(zs, param_set)

        def pred(theta, x_Mxd):
            toks = F.lone_tokens(x_Mxd, 1)
            return F.readout(F.lone_forward(F.insert_params(zs, theta, param_set), toks)[-1], zs.dim)[:, 0]

        g_q = jax.grad(lambda th: pred(th, xq_d[None])[0])(theta0)

        def demo_grad(x_d, y):
            return jax.grad(lambda th: 0.5 * (pred(th, x_d[None])[0] - y) ** 2)(theta0)

        g_demos = jax.vmap(demo_grad)(x_Nxd, y_N)
        dots = jax.tree.map(lambda gq, gd: jnp.einsum("...,n...->n", gq, gd), g_q, g_demos)
        return -sum(jax.tree.leaves(dots))

    return jax.vmap(one)(batch.x, batch.y, batch.x_query)


def icl_vs_ft(params: TransformerParams, batch: TaskBatch, lr: float, steps: int, key: Array, *,
              param_set: str = "attention") -> dict[str, Any]:
    """All ICL-vs-FT metrics for a 1-layer linear-attention model (float64 recommended).

    ``param_set="attention"`` (the study's setting) fine-tunes W_K, W_V and needs ``include_query``;
    ``"adapters"`` fine-tunes the adapter (see :mod:`~iclgd_synth.critiques.finetune`): for the hand-constructed GD
    layer with ``lr`` = its eta and one step, fine-tuning *is* ICL, the known-answer control (SimAOU 1, Kendall
    signed 1, Rec2FTP 1)."""
    check_choice("param_set", param_set, F.PARAM_SETS)
    if param_set == "attention" and not params.arch.include_query:
        raise ValueError("icl_vs_ft needs a model with include_query=True: without it the zero-shot model (the query "
                         "alone) has no key, its attention output is 0 whatever W_K and W_V are, and fine-tuning "
                         "them changes nothing")
    batch = validate_batch(batch)
    d = batch.dim
    zs = F.zero_shot_copy(params, d)
    if zs.depth != 1:
        raise ValueError("icl_vs_ft compares one layer; use the causal study for deeper models")
    first = F.lone_tokens(batch.x_query, batch.out_dim)
    icl_tok, icl_score = F.icl_query_pass(params, batch)
    zsl_tok, zsl_score = F.shared_query_pass(zs, batch)
    tuned = F.finetune(zs, batch, lr, param_set=param_set, mode="standard", steps=steps)
    ft_tok, ft_score = F.per_task_query_pass(tuned, batch)
    rand = F.random_like_update(key, tuned, zs, param_set)
    rand_tok, _ = F.per_task_query_pass(rand, batch)
    other = jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), tuned)
    other_tok, _ = F.per_task_query_pass(other, batch)
    h = {name: F.layer_updates(tok, first)[0] for name, tok in
         (("icl", icl_tok), ("zsl", zsl_tok), ("ft", ft_tok), ("rand", rand_tok), ("other", other_tok))}
    simaou = A.sim_aou(h["icl"], h["zsl"], h["ft"])
    simaou_rand = A.sim_aou(h["icl"], h["zsl"], h["rand"])
    simaou_other = A.sim_aou(h["icl"], h["zsl"], h["other"])

    scores, contrib = icl_attention_terms(params, batch)
    infl = np.asarray(ft_influence(zs, batch, param_set))
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(r) for r in infl])
    tau_abs = A.kendall_tau(np.abs(np.asarray(scores)), np.abs(infl))
    tau_signed = A.kendall_tau(np.asarray(contrib), infl)
    tau_abs_base = A.kendall_tau(np.abs(np.asarray(scores)), np.abs(shuffled))
    tau_signed_base = A.kendall_tau(np.asarray(contrib), shuffled)

    y = np.asarray(batch.query_labels_BxO(), np.float64)[:, 0]
    pred = {name: -np.asarray(tok[-1][:, d], np.float64) for name, tok in
            (("icl", icl_tok), ("zsl", zsl_tok), ("ft", ft_tok), ("rand", rand_tok))}
    err = {k: pred[k] - y for k in pred}
    rec = A.rec2ftp(err["zsl"], err["icl"], err["ft"])
    rec_rand = A.rec2ftp(err["zsl"], err["icl"], err["rand"])
    return {
        "simaou": A.summarize(simaou), "simaou_random_direction": A.summarize(simaou_rand),
        "simaou_other_task_ft": A.summarize(simaou_other),
        "simam_delta_defined": False,
        "max_abs_map_change_icl_vs_zsl": float(np.max(np.abs(np.asarray(icl_score[0] - zsl_score[0])))),
        "max_abs_map_change_ft_vs_zsl": float(np.max(np.abs(np.asarray(ft_score[0] - zsl_score[0])))),
        "kendall_abs": A.summarize(tau_abs), "kendall_abs_shuffled": A.summarize(tau_abs_base),
        "kendall_signed": A.summarize(tau_signed), "kendall_signed_shuffled": A.summarize(tau_signed_base),
        "rec2ftp": rec, "rec2ftp_random_direction": rec_rand,
        "loss": {k: float(0.5 * np.mean(e[np.isfinite(e)] ** 2)) for k, e in err.items()},
        "n_diverged": {k: int(np.sum(~np.isfinite(e))) for k, e in err.items()},
        "h_norm": {k: float(np.mean(np.linalg.norm(np.asarray(v) - np.asarray(h["zsl"]), axis=-1)))
                   for k, v in h.items() if k != "zsl"},
    }


# ------------------------------------------------------------------------------------------- momentum equivalences

def momentum_equivalence_errors(seed: int = 0, trials: int = 5, max_steps: int = 5) -> dict[str, Any]:
    """Max abs errors (float64; call inside ``jax.enable_x64(True)``) of the exact momentum relations on random
    sizes: (a1) dual momentum = weighted GD step = heavy ball at W0; (a2) values momentum = affine GD step;
    (b) heavy-ball layers = MomentumGD, for K = 1..max_steps."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"a1_weighted_gd": 0.0, "a1_heavy_ball_at_w0": 0.0, "a2_affine_gd": 0.0,
                           "b_heavy_ball_layers": {k: 0.0 for k in range(1, max_steps + 1)}, "scale": 0.0}
    for _ in range(trials):
        d, n, o = int(rng.integers(1, 9)), int(rng.integers(1, 13)), int(rng.integers(1, 3))
        beta, eta = float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.1, 2.0))
        batch = _random_batch(rng, 16, n, d, 1)
        errs = MO.relation_errors(batch, jnp.asarray(rng.normal(size=d)), eta, beta)
        for k, v in errs.items():
            out[k] = max(out.get(k, 0.0), float(v)) if k != "a1_distance_to_plain_gd" else min(
                out.get(k, np.inf), float(v))
        batch = _random_batch(rng, 16, n, d, o)
        schedules = [(rng.uniform(0.05, 0.5, k), rng.uniform(0.0, 0.95, k)) for k in range(1, max_steps + 1)]
        models = tuple(MO.heavy_ball_params(d, e, m, len(e), n, o) for e, m in schedules)
        errs_b = MO.heavy_ball_errors(models, batch, tuple((jnp.asarray(e), jnp.asarray(m)) for e, m in schedules))
        for k, v in zip(range(1, max_steps + 1), errs_b):
            out["b_heavy_ball_layers"][k] = max(out["b_heavy_ball_layers"][k], float(v))
    return out


def _random_batch(rng: np.random.Generator, b: int, n: int, d: int, o: int) -> TaskBatch:
    """Gaussian tasks drawn with NumPy (no compilation per shape)."""
    x, xq = rng.normal(size=(b, n, d)), rng.normal(size=(b, d))
    w = rng.normal(size=(b, o, d))
    y, yq = np.einsum("bod,bnd->bno", w, x), np.einsum("bod,bd->bo", w, xq)
    if o == 1:
        y, yq, w = y[..., 0], yq[:, 0], w[:, 0]
    return validate_batch(TaskBatch(x=x, y=y, x_query=xq, y_query=yq, w=w))


# --------------------------------------------------------------------------------------------------------- the study

@dataclasses.dataclass(frozen=True)
class DualStudy:
    """Settings of the dual-form / ICL-vs-FT / momentum study.

    Attributes:
      task: task law (default: the reference paper's d = N = 10, x ~ U(-0.5, 0.5)).
      n_tasks: evaluation tasks for the metrics. Default 2000.
      tune_tasks: tasks for tuning step sizes (GD eta, fine-tuning lr). Default 1000.
      ft_steps: numbers of fine-tuning GD steps compared. Default (1, 10).
      beta: momentum-attention decay. Default 0.5.
      causal_depth: layers of the causal pair (vanilla vs momentum) trained in the full study; 0 skips it.
        Default 2.
      multilayer_depth: layers K of a second query-as-key LSA, trained to measure SimAM_delta at layers 2..K (it is
        undefined at layer 1); 0 skips it. Default 2 (also in the quick preset).
      export_tasks: evaluation tasks whose dual form (every model, every layer) is written to dual_form.npz.
        Default 8.
      train_steps, train_batch, lr: training of every model (AdamW, clip 10). Default 3000 steps of 512, lr 1e-3.
      equivalence_trials: random sizes per check of the momentum relations. Default 5.
      seed: training seed. Default 0.
    """

    task: TaskConfig = TASK_PRESETS["vonoswald"]
    n_tasks: int = 2000
    tune_tasks: int = 1000
    ft_steps: tuple[int, ...] = (1, 10)
    beta: float = 0.5
    causal_depth: int = 2
    multilayer_depth: int = 2
    export_tasks: int = 8
    train_steps: int = 3000
    train_batch: int = 512
    lr: float = 1e-3
    equivalence_trials: int = 5
    seed: int = 0

    def quick(self) -> "DualStudy":
        return dataclasses.replace(self, n_tasks=200, tune_tasks=200, ft_steps=(1, 5), causal_depth=0,
                                   train_steps=100, train_batch=128, equivalence_trials=2)

    def config_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["task"] = self.task.to_dict()
        return d

    def models(self) -> dict[str, ModelConfig]:
        d, b = self.task.dim, self.beta
        out = {"LSA": ModelConfig(dim=d),
               f"LSA + momentum (values, beta {b})": ModelConfig(dim=d, momentum=b, momentum_kind="values"),
               f"LSA + momentum (dual, beta {b})": ModelConfig(dim=d, momentum=b, momentum_kind="dual")}
        if self.causal_depth:
            k = self.causal_depth
            out[f"causal LSA, {k} layers"] = ModelConfig(dim=d, n_layers=k, causal=True)
            out[f"causal LSA, {k} layers + momentum (values, beta {b})"] = ModelConfig(
                dim=d, n_layers=k, causal=True, momentum=b, momentum_kind="values")
        out[IQ_LABEL] = ModelConfig(dim=d, include_query=True)
        if self.multilayer_depth:
            out[multilayer_label(self.multilayer_depth)] = ModelConfig(dim=d, n_layers=self.multilayer_depth,
                                                                      include_query=True)
        return out


def run(quick: bool = False, root: str = "runs", force: bool = False, progress: bool = True, **overrides) -> Path:
    """The ``dual`` study; returns the run directory."""
    study = DualStudy()
    study = C.apply_overrides(study.quick() if quick else study, overrides)
    return run_study(study, root, force=force, progress=progress)


def run_study(study: DualStudy, root: str = "runs", *, force: bool = False, progress: bool = True,
              name: str = "dual") -> Path:
    out, done = C.prepare_run(root, name, study.config_dict(), force)
    if done:
        return out
    t_start = time.perf_counter()
    task = study.task
    trained: dict[str, TransformerParams] = {}
    curves: dict[str, np.ndarray] = {}
    train_seconds: dict[str, float] = {}
    for i, (label, model) in enumerate(study.models().items()):
        cfg = TrainConfig(task=task, model=model, batch_size=study.train_batch, n_steps=study.train_steps,
                            lr=study.lr, seeds=(study.seed,), chunk_steps=min(250, study.train_steps),
                            checkpoint_every=1000, eval_batch=1000)
        result = C.train_model(cfg, out / f"ckpt_{i}", progress)
        trained[label], curves[label], train_seconds[label] = result.seed_params(0), result.losses, \
            result.train_seconds

    with jax.enable_x64(True):
        results = _evaluate(study, trained, curves, train_seconds)
        figures = _figures(out, study, results, trained, curves)
        export = {label: C.to_float64(p) for label, p in trained.items()}
        export[f"hand GD (1 step, eta {results['gd_eta']:.4g})"] = results["_hand"]
        results["dual_form_export"] = {
            "file": "dual_form.npz", "n_tasks": study.export_tasks,
            "models": export_dual_forms(out / "dual_form.npz", export,
                                        sample(jax.random.PRNGKey(EVAL_SEED), task, study.export_tasks))}
    results["total_seconds"] = time.perf_counter() - t_start
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    return finish_run(out, name, _report(study, results, figures), public)


def _evaluate(study, trained, curves, train_seconds) -> dict[str, Any]:
    task = study.task
    d, n = task.dim, task.n_context
    tune_batch = sample(jax.random.PRNGKey(TUNE_SEED), task, study.tune_tasks)
    test = sample(jax.random.PRNGKey(EVAL_SEED), task, study.n_tasks)
    eta = tune_gd(tune_batch, 1).eta
    hand = gd_params(d, eta, n_context=n)
    res: dict[str, Any] = {"gd_eta": eta}

    # 1. The dual form: reconstruction of every trained linear model's query update, and the hand construction.
    recon = {}
    for label, params in trained.items():
        p64 = C.to_float64(params)
        errs = []
        for layer in range(p64.depth):
            df = dual_form(p64, test, layer)
            ref = query_attention_update(p64, test, layer)
            errs.append(float(jnp.max(jnp.abs(df.output() - ref)) / (jnp.max(jnp.abs(ref)) + 1e-300)))
        recon[label] = max(errs)
    df_hand = dual_form(hand, test)
    meta = -gd_weights(test, eta, 1)  # eta * grad L(0), minus the GD step's update from W0 = 0, (B, 1, d)
    hand_block_err = float(jnp.max(jnp.abs(df_hand.delta_w_icl[:, d:, :d] - meta)))
    off_block = df_hand.delta_w_icl.at[:, d:, :d].set(0.0)
    res["dual_form"] = {"relative_reconstruction_error": recon, "hand_block_vs_meta_gradient": hand_block_err,
                        "hand_off_block_max": float(jnp.max(jnp.abs(off_block))),
                        "meta_gradient_scale": float(jnp.max(jnp.abs(meta)))}
    res["_dual_hand"] = df_hand
    res["_hand"] = hand
    res["_meta"] = meta

    # 2. ICL vs fine-tuning on the model whose query is a key.
    iq_label = IQ_LABEL
    p_iq = C.to_float64(trained[iq_label])
    zs = F.zero_shot_copy(p_iq, d)
    ft = {}
    for s in study.ft_steps:
        lr, grid = F.tune_lr(zs, tune_batch, param_set="attention", mode="standard", steps=s)
        r = icl_vs_ft(p_iq, test, lr, s, jax.random.PRNGKey(s))
        r["lr"] = lr
        ft[s] = r
    # Known-answer control: the hand GD layer, its adapter fine-tuned with one step of eta, is ICL exactly.
    hand_ft = icl_vs_ft(hand, test, eta, 1, jax.random.PRNGKey(0), param_set="adapters")
    res["icl_vs_ft"] = {"model": iq_label, "by_steps": ft, "icl_model_loss": model_loss(p_iq, test),
                        "hand_control": hand_ft}

    # 2b. SimAM_delta at layers >= 2 of a K-layer query-as-key model (undefined at layer 1).
    if study.multilayer_depth:
        ml_label = multilayer_label(study.multilayer_depth)
        p_ml = C.to_float64(trained[ml_label])
        zs_ml = F.zero_shot_copy(p_ml, d)
        by_steps = {}
        for s in study.ft_steps:
            lr, _ = F.tune_lr(zs_ml, tune_batch, param_set="attention", mode="standard", steps=s)
            tuned = F.finetune(zs_ml, test, lr, param_set="attention", mode="standard", steps=s)
            base = F.random_like_update(jax.random.PRNGKey(100 + s), tuned, zs_ml, "attention")
            r = CA.per_layer_alignment(p_ml, test, tuned, base)
            by_steps[s] = {"lr": lr, **{k: r[k] for k in (
                "simaou", "simaou_random_direction", "simam_delta", "simam_delta_random_direction",
                "max_abs_map_change_icl_vs_zsl", "ft_query_loss", "ft_diverged", "zsl_query_loss",
                "icl_query_loss")}}
        res["simam_delta_multilayer"] = {"model": ml_label, "n_layers": study.multilayer_depth,
                                         "by_steps": by_steps}

    # 3. Momentum: exact relations and training.
    res["momentum_equivalence"] = momentum_equivalence_errors(study.seed, study.equivalence_trials)
    mom = {}
    for label, params in trained.items():
        mom[label] = {"final_train_loss": float(np.mean(curves[label][0, -50:])),
                      "test_loss": model_loss(C.to_float64(params), test), "train_seconds": train_seconds[label]}
    beta = study.beta
    hand_losses = {"hand GD (1 step)": model_loss(hand, test)}
    for kind in ("values", "dual"):
        hp = hand.replace(arch=dataclasses.replace(hand.arch, momentum=beta, momentum_kind=kind))
        hand_losses[f"hand GD + momentum ({kind}, beta {beta}), same eta"] = model_loss(hp, test)
    # The dual-momentum hand model with its own tuned eta (a weighted GD step).
    c = MO.query_momentum_weights(n, beta, "dual")
    best = min(np.linspace(0.05, 1.5, 59) * eta,
               key=lambda e: float(jnp.mean((jnp.einsum("bod,bd->b", MO.weighted_gd_step(tune_batch, e, c),
                                                        tune_batch.x_query) - tune_batch.y_query) ** 2)))
    hpd = gd_params(d, float(best), n_context=n)
    hpd = hpd.replace(arch=dataclasses.replace(hpd.arch, momentum=beta, momentum_kind="dual"))
    hand_losses[f"hand GD + momentum (dual, beta {beta}), eta re-tuned"] = model_loss(hpd, test)
    res["momentum_training"] = {"models": mom, "hand": hand_losses, "dual_weights": c.tolist()}
    return res


def _figures(out, study, results, trained, curves) -> dict[str, str]:
    d = study.task.dim
    figs = {}
    df_hand = results["_dual_hand"]
    mats = {"hand GD: Delta W_ICL (task 0)": np.asarray(df_hand.delta_w_icl[0]),
            "eta * grad L(W0), embedded": np.zeros_like(np.asarray(df_hand.delta_w_icl[0]))}
    mats["eta * grad L(W0), embedded"][d:, :d] = np.asarray(results["_meta"][0])
    lsa = trained.get("LSA")
    if lsa is not None:
        test = sample(jax.random.PRNGKey(EVAL_SEED), study.task, 4)
        mats["trained LSA: Delta W_ICL (task 0)"] = np.asarray(dual_form(C.to_float64(lsa), test).delta_w_icl[0])
    iq = IQ_LABEL
    test = sample(jax.random.PRNGKey(EVAL_SEED), study.task, 4)
    dfi = dual_form(C.to_float64(trained[iq]), test)
    mats["query-key LSA: W_ZSL (task 0)"] = np.asarray(dfi.w_zsl[0])
    figs["dual_form"] = C.matrix_heatmaps(out / "dual_form.png", mats,
                                          title="Dual form at the query (rows: updated channel, columns: query channel;"
                                                " last row/column = y)")
    figs["momentum_training"] = C.loss_curves(
        out / "momentum_training.png", curves, title="Vanilla vs momentum attention, same data and steps",
        baselines={"tuned GD, 1 step": results["momentum_training"]["hand"]["hand GD (1 step)"]})
    ft = results["icl_vs_ft"]["by_steps"]
    vals, errs = {}, {}
    for s, r in ft.items():
        for key, lab in (("simaou", "FT"), ("simaou_random_direction", "random dir."),
                         ("simaou_other_task_ft", "other task's FT")):
            vals[f"{lab}, {s} step{'s' * (int(s) > 1)}"] = r[key]["mean"]
            errs[f"{lab}, {s} step{'s' * (int(s) > 1)}"] = r[key]["sem"]
    figs["simaou"] = C.bar_chart(out / "simaou.png", vals, errors=errs, ylabel="SimAOU (mean over tasks)",
                                 title="SimAOU of ICL against fine-tuning and its baselines")
    return figs


def _report(study: DualStudy, results: dict, figures: Mapping[str, str]) -> str:
    t = study.task
    dfm = results["dual_form"]
    lines = [
        "# The dual form of attention, ICL vs fine-tuning, and momentum attention", "",
        "Claims tested (\"Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as "
        "Meta-Optimizers\"): linear attention over demonstrations is a zero-shot model plus implicit weights "
        "Delta W_ICL built like a gradient update (the dual form); ICL behaves like fine-tuning (SimAOU, attention "
        "maps, Kendall, Rec2FTP); momentum attention is the analogue of GD with momentum.", "",
        f"Tasks: d = {t.dim}, N = {t.n_context}, x ~ {t.x_dist} (half-width {t.x_range}), noise {t.noise}; "
        f"{study.n_tasks} evaluation tasks, {study.tune_tasks} tuning tasks. Models trained for {study.train_steps} "
        f"steps of {study.train_batch} tasks (AdamW lr {study.lr}), same data for all. Evaluation in float64.", "",
        "## 1. The dual form", "",
        "Definition (module `iclgd_synth.critiques.dual`): the query's attention update = (W_ZSL + Delta W_ICL) e_q "
        "+ b, Delta W_ICL = sum_h P_h W_V,h (sum over demonstrations of c_i e_i e_i^T) W_K,h^T W_Q,h, W_ZSL the "
        "query's own term when the query is a key, b the momentum-values term.", "",
        C.table(["check", "measured"], [
            ["hand GD layer: max |Delta W_ICL[y, x] - eta grad L(W0)| (float64)",
             dfm["hand_block_vs_meta_gradient"]],
            ["hand GD layer: max |entry outside that block|", dfm["hand_off_block_max"]],
            ["scale of eta grad L(W0) (max |entry|)", dfm["meta_gradient_scale"]],
        ] + [[f"{k}: max relative error of (W_ZSL + Delta W_ICL) e_q + b vs the layer's output", v]
             for k, v in dfm["relative_reconstruction_error"].items()]),
        "For the hand construction Delta W_ICL is exactly eta times the in-context loss gradient at W0 in the "
        "(y, x) block (the read-out is minus the y-entry, so the prediction is the GD step's), zero elsewhere.", "",
    ]
    ex = results["dual_form_export"]
    lines += ["### Exported dual form", "",
              f"`{ex['file']}` (NumPy archive) holds, for {ex['n_tasks']} evaluation tasks (`tasks/x`, `tasks/y`, "
              "`tasks/x_query`, `tasks/y_query`), per model `model{i}` (label in `model{i}/label`) and layer "
              "application l = 1..K: `model{i}/layer{l}/w_zsl` and `.../delta_w_icl` (B, D, D, acting on the query "
              "token), `.../query` (B, D, the query token entering the layer: the one they act on), `.../bias`, the "
              "per-head form (`w_zsl_heads`, `delta_w_icl_heads`, `q_heads`) and `.../query_update`, the layer's own "
              "change of the query from the forward pass, so that (w_zsl + delta_w_icl) @ query + bias = "
              "query_update can be checked from the file:", "",
              C.table(["model", "key", "layers", "max relative error of the reconstruction"],
                      [[label, v["key"], v["layers"], v["max_relative_error"]] for label, v in ex["models"].items()]),
              ]
    ft = results["icl_vs_ft"]
    lines += ["## 2. ICL vs fine-tuning", "",
              f"Model: {ft['model']} (its loss with demonstrations: {C.fmt(ft['icl_model_loss'])}). Fine-tuning: "
              "full-batch GD on W_K and W_V of the zero-shot copy, the demonstrations as lone queries; step size "
              "tuned on separate tasks.", ""]
    rows = []
    for s, r in ft["by_steps"].items():
        ft_loss = C.fmt(r["loss"]["ft"]) + (f" ({r['n_diverged']['ft']} diverged, left out)"
                                            if r["n_diverged"]["ft"] else "")
        rows.append([s, r["lr"], r["loss"]["zsl"], ft_loss, r["loss"]["icl"],
                     f"{C.fmt(r['simaou']['mean'])} ± {C.fmt(r['simaou']['sem'], 2)}",
                     C.fmt(r["simaou_random_direction"]["mean"]), C.fmt(r["simaou_other_task_ft"]["mean"]),
                     f"{C.fmt(r['kendall_abs']['mean'])} (shuffled {C.fmt(r['kendall_abs_shuffled']['mean'])})",
                     f"{C.fmt(r['kendall_signed']['mean'])} (shuffled {C.fmt(r['kendall_signed_shuffled']['mean'])})",
                     f"{C.fmt(r['rec2ftp']['rec2ftp'])} (of {r['rec2ftp']['n_ft_improves']})",
                     C.fmt(r["rec2ftp"]["icl_improves_rate"]), C.fmt(r["rec2ftp_random_direction"]["rec2ftp"])])
    lines += [C.table(["FT steps", "FT lr", "loss ZSL", "loss FT", "loss ICL", "SimAOU", "SimAOU random dir.",
                       "SimAOU other task's FT", "Kendall |score| vs |influence|", "Kendall signed",
                       "Rec2FTP", "ICL improves (all tasks)", "Rec2FTP random-dir. FT"], rows)]
    hc = ft["hand_control"]
    lines += ["Known-answer control (hand GD layer, adapter fine-tuned by one step of its eta, which is ICL exactly): "
              f"SimAOU {C.fmt(hc['simaou']['mean'])} (over {hc['simaou']['n']} tasks; random direction "
              f"{C.fmt(hc['simaou_random_direction']['mean'])}), Kendall signed {C.fmt(hc['kendall_signed']['mean'])} "
              f"(shuffled {C.fmt(hc['kendall_signed_shuffled']['mean'])}), Rec2FTP {C.fmt(hc['rec2ftp']['rec2ftp'])} "
              f"(of {hc['rec2ftp']['n_ft_improves']}), loss ICL {C.fmt(hc['loss']['icl'])} = loss FT "
              f"{C.fmt(hc['loss']['ft'])}. Expected: 1, 1, 1 and equal losses.", ""]
    r0 = next(iter(ft["by_steps"].values()))
    ml = results.get("simam_delta_multilayer")
    lines += ["### SimAM_delta", "",
              "SimAM_delta = cos(m_ICL - m_ZSL, m_FT - m_ZSL) on the query's score on itself, the only key ICL, ZSL "
              "and FT share. At layer 1 of any model it is undefined: the score depends only on the token entering "
              "the layer, which is (x_q, 0) with and without demonstrations, so m_ICL - m_ZSL = 0 (measured on the "
              f"1-layer model: max |m_ICL - m_ZSL| = {C.fmt(r0['max_abs_map_change_icl_vs_zsl'])}, while FT changes "
              f"the score by up to {C.fmt(r0['max_abs_map_change_ft_vs_zsl'])}). A 1-layer model therefore has no "
              "SimAM_delta. From layer 2 on, the demonstrations have changed the query token through the earlier "
              "layers, and SimAM_delta is defined; it is one cosine across tasks of the scalar changes (a per-task "
              "cosine of scalars is only a sign).", ""]
    if ml:
        rows = []
        for s, r in ml["by_steps"].items():
            for l in range(ml["n_layers"]):
                rows.append([s, r["lr"], l + 1, r["max_abs_map_change_icl_vs_zsl"][l], r["simam_delta"][l],
                             r["simam_delta_random_direction"][l], r["simaou"][l], r["simaou_random_direction"][l]])
        lines += [f"Model: {ml['model']}; fine-tuning of W_K, W_V of every layer (standard), step size tuned.", "",
                  C.table(["FT steps", "FT lr", "layer", "max |m_ICL - m_ZSL|", "SimAM_delta",
                           "SimAM_delta random dir.", "SimAOU", "SimAOU random dir."], rows)]
    else:
        lines += ["(No multi-layer model in this run: `multilayer_depth = 0`.)", ""]
    lines += ["Notes:", "",
              "- The zero-shot model here is weak by design (a lone token attending to itself computes a cubic in "
              "x_q); fine-tuning W_K, W_V of that copy is the testbed's version of the paper's fine-tuning. "
              "Rec2FTP must be read against ICL's unconditional improvement rate.",
              "- Kendall's tau compares ICL's linear attention scores (which can be negative; hence |score|) with "
              "first-order per-demonstration influences of FT; the shuffled baseline is ~0 by construction.", ""]
    me = results["momentum_equivalence"]
    mt = results["momentum_training"]
    lines += ["## 3. Momentum attention", "",
              "Exact relations (module `iclgd_synth.critiques.momentum`; conditions in its docstring), max abs error "
              f"over random sizes in float64 (prediction scale up to {C.fmt(me['scale'])}):", "",
              C.table(["relation", "max abs error"], [
                  ["(a1) dual momentum attention = one GD step with demonstration weights 1 + beta + ... + "
                   "beta^(N-i)", me["a1_weighted_gd"]],
                  ["(a1) = heavy ball over the demonstrations with gradients at W0 (+ a momentum-only query step)",
                   me["a1_heavy_ball_at_w0"]],
                  ["(a2) the paper's momentum attention = GD step on (W, b), the bias weighting demo i by "
                   "beta^(N-i)", me["a2_affine_gd"]],
              ] + [[f"(b) {k} heavy-ball layers = MomentumGD, {k} step{'s' * (int(k) > 1)}", v]
                   for k, v in me["b_heavy_ball_layers"].items()]),
              f"Demonstration weights of dual momentum at beta = {study.beta} (first to last): "
              + ", ".join(f"{w:.3g}" for w in mt["dual_weights"]) + ".", "",
              "Trained on the ICL objective with the same data and the same number of steps:", "",
              C.table(["model", "final training loss (last 50 steps)", "test loss", "train seconds"],
                      [[k, v["final_train_loss"], v["test_loss"], v["train_seconds"]]
                       for k, v in mt["models"].items()]),
              "Hand-constructed references:", "",
              C.table(["model", "test loss"], [[k, v] for k, v in mt["hand"].items()]),
              "The paper's momentum term adds decayed values whatever the query, a bias that does not depend on x_q: "
              "on zero-mean regression tasks it can only add error unless the model learns values that cancel it. "
              "The dual-form momentum re-weights demonstrations (earlier ones more), which full-batch GD has no "
              "reason to want for exchangeable demonstrations.", "",
              "## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()]
    lines += ["", f"Total time: {results['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)
