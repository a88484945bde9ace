"""ICL vs fine-tuning metrics, the hand construction's dual form as a meta-gradient, and momentum attention: the
library functions of the ``dual`` study (:mod:`iclgd_synth.studies.dual`).

The dual form of linear attention itself (the query's attention update = (W_ZSL + Delta W_ICL) e_q + b) is the
library module :mod:`iclgd_synth.dual_form`. For the hand-constructed GD layer (W0 = 0) Delta W_ICL has a single
nonzero block, row y, columns x: -(eta/N) sum_i y_i x_i^T = eta * grad L(W0), the negative of the GD step's update
(:func:`hand_dual_form`, :func:`meta_gradient_errors`).

**ICL vs fine-tuning** ("Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as
Meta-Optimizers"; definitions in :mod:`~iclgd_synth.critiques.alignment` and :mod:`~iclgd_synth.critiques.finetune`).
A 1-layer LSA trained with ``include_query`` (so that the query alone, the zero-shot model, has a key: itself);
h = the query's attention update (a D-vector):

- h_ICL: demonstrations in context; h_ZSL: query alone; h_FT: query alone after fine-tuning W_K and W_V of the
  zero-shot model by full-batch GD on the demonstrations (each a lone query (x_i, 0) with target y_i; step size tuned
  on separate tasks for the lowest query loss).
- SimAOU as the paper defines it: each attention output normalised to unit length, then
  cos(h^_ICL - h^_ZSL, h^_FT - h^_ZSL) per task, averaged (the unnormalised cosine beside it). With one output
  channel nearly all of an update's energy can sit in the y entry, which makes the unnormalised cosine close to a
  sign test of the prediction change (:func:`icl_vs_ft` reports the share). Fine-tuning full-batch (``steps`` GD
  steps) or as in the paper (one SGD step per demonstration, in order, batch 1, W_K and W_V).
- Nulls (what replaces FT): a random direction of FT's norm, another task's FT, another task's ICL, the oracle that
  sets the read-out to y_q, and explicit learners unrelated to the model (ridge, a GD step: :func:`tuned_learners`;
  update = zero-shot output with the read-out set to their prediction, influence = leave-one-out); shuffled
  influences for Kendall; for Rec2FTP the selection-corrected rate (ICL independent of FT given the zero-shot error).
  The untrained-model control runs the same protocol on an initialised model (in the study).
- SimAM_delta on the query's own attention score, the only key ICL, ZSL and FT share (ZSL and FT see the query
  alone). It is undefined at layer 1 of any model, hence for a 1-layer model: the score (W_K e_q).(W_Q e_q) depends
  only on the token entering the layer, which at layer 1 is (x_q, 0) with and without demonstrations, so
  m_ICL - m_ZSL = 0 (the report gives the measured max |m_ICL - m_ZSL|). From layer 2 on ICL's earlier layers have
  changed the query token using the demonstrations, m_ICL - m_ZSL != 0 and SimAM_delta is defined
  (:func:`simam_delta_by_steps` on a K-layer query-as-key LSA: one cosine across tasks of the scalar changes, as in
  :mod:`~iclgd_synth.critiques.causality`, with its random-direction baseline, next to the per-layer SimAOU).
- Known-answer control: the hand-constructed GD layer with its adapter fine-tuned by one GD step of size eta (from
  0) on the demonstrations: fine-tuning then equals ICL exactly, and the metrics must read SimAOU 1, Kendall signed
  1 (contribution (eta/N) y_i x_i.x_q and influence y_i x_i.x_q rank alike) and Rec2FTP 1.
- Kendall's tau per task between ICL's attention over the demonstrations and FT's per-demonstration influence:
  (i) |score| = |(W_K e_i).(W_Q e_q)| against |influence|, (ii) the signed contribution of demonstration i to the ICL
  prediction against the signed influence, where influence_i = -<grad_theta y_hat_ZSL(x_q), grad_theta l_i(theta_0)>
  is the first-order change of the zero-shot prediction per unit step from a GD step on demonstration i alone.
  Baseline: the same with the influences shuffled within each task.
- Rec2FTP: of the tasks where FT lowers the query's error below zero-shot's, the fraction where ICL does;
  reported with ICL's unconditional rate, the selection-corrected rate and each null in place of FT.
- Dai's SimAM before (ICL vs ZSL) and after (ICL vs FT) fine-tuning on the query's score on itself, one cosine across
  tasks: 1 before by construction at layer 1.

**Momentum attention**: the exact relations of :mod:`~iclgd_synth.critiques.momentum` measured in float64 on random
sizes (:func:`momentum_equivalence_errors`), and the hand GD layer with momentum attention
(:func:`hand_momentum_losses`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.constructions import gd_params, heavy_ball_params
from iclgd_synth.critiques import alignment as A
from iclgd_synth.critiques import causality as CA
from iclgd_synth.critiques import finetune as F
from iclgd_synth.critiques import momentum as MO
from iclgd_synth.dual_form import DualForm, dual_form
from iclgd_synth.learners import GD, Ridge, tune_gd
from iclgd_synth.metrics import loss as model_loss
from iclgd_synth.model import TransformerParams
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, validate_batch
from iclgd_synth.tokens import build_tokens
from iclgd_synth.validation import check_choice, check_float


# ------------------------------------------------------------------------------- the hand layer's dual form

def hand_dual_form(batch: TaskBatch, eta: float) -> tuple[DualForm, Array]:
    """The dual form of the hand-constructed GD layer (1/N in P, W0 = 0) on ``batch``, and eta * grad L(W0), the
    negative of the GD step's update from W0 = 0, (B, 1, d) (float64 recommended)."""
    batch = validate_batch(batch)
    hand = gd_params(batch.dim, eta, n_context=batch.n_context)
    return dual_form(hand, batch), -GD(eta=eta, steps=1).weights(batch)


def meta_gradient_errors(df_hand: DualForm, meta_BxOxd: Array, dim: int) -> dict[str, float]:
    """How far the hand layer's Delta W_ICL is from eta * grad L(W0) in its (y, x) block, the largest entry outside
    that block (both 0 up to rounding) and the scale max |eta * grad L(W0)|."""
    delta = df_hand.delta_w_icl
    off_block = delta.at[:, dim:, :dim].set(0.0)
    return {"hand_block_vs_meta_gradient": float(jnp.max(jnp.abs(delta[:, dim:, :dim] - meta_BxOxd))),
            "hand_off_block_max": float(jnp.max(jnp.abs(off_block))),
            "meta_gradient_scale": float(jnp.max(jnp.abs(meta_BxOxd)))}


# ------------------------------------------------------------------------------------------------- ICL vs fine-tuning

def icl_attention_terms(params: TransformerParams, batch: TaskBatch) -> tuple[Array, Array]:
    """Layer 1's scores of the query over the demonstrations (summed over heads) and each demonstration's signed
    contribution to the prediction (minus the y-part of its term, summed over output channels), each (B, N)."""
    s_BxHxN, contrib_BxNxO = _layer1_terms(params, batch)
    return s_BxHxN.sum(1), contrib_BxNxO.sum(-1)


def _layer1_terms(params: TransformerParams, batch: TaskBatch) -> tuple[Array, Array]:
    """Layer 1's per-head scores of the query over the demonstrations (B, H, N) and each demonstration's signed
    contribution to the prediction per output channel (B, N, d_out)."""
    batch = validate_batch(batch)
    tokens = build_tokens(batch, params.arch.layout)
    lyr = params.layers[0]
    n, d = batch.n_context, batch.dim
    k = jnp.einsum("hkd,btd->bhtk", lyr["w_k"], tokens[:, :n])
    q = jnp.einsum("hkd,bd->bhk", lyr["w_q"], tokens[:, -1])
    s_BxHxN = jnp.einsum("bhtk,bhk->bht", k, q)
    pv = jnp.einsum("hdv,hve,bte->bhtd", lyr["w_p"], lyr["w_v"], tokens[:, :n])
    contrib = -jnp.einsum("bht,bhto->bto", s_BxHxN, pv[..., d:])
    if params.arch.normalize:
        contrib = contrib / (n + int(params.arch.include_query))
    return s_BxHxN, contrib


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


def demo_contributions(params: TransformerParams, batch: TaskBatch) -> Array:
    """Each demonstration's signed contribution to layer 1's prediction (minus the y-part of its term), per output
    channel, (B, N, d_out)."""
    return _layer1_terms(params, batch)[1]


@functools.partial(jax.jit, static_argnames=("param_set",))
def ft_influence_channels(zs: F.ZeroShotModel, batch: TaskBatch, param_set: str = "attention") -> Array:
    """:func:`ft_influence` per output channel, (B, N, d_out): influence_{i,o} = -<grad_theta y_hat_o(x_q),
    grad_theta l_i> with l_i = 0.5 ||y_hat(x_i) - y_i||^2."""
    o = batch.out_dim

    def one(x_Nxd, y_NxO, xq_d):
        theta0 = F.select_params(zs, param_set)

        def pred(theta, x_Mxd):
            toks = F.lone_tokens(x_Mxd, o)
            return F.readout(F.lone_forward(F.insert_params(zs, theta, param_set), toks)[-1], zs.dim)

        j_q = jax.jacrev(lambda th: pred(th, xq_d[None])[0])(theta0)  # leaves (O, ...)

        def demo_grad(x_d, y_o):
            return jax.grad(lambda th: 0.5 * jnp.sum((pred(th, x_d[None])[0] - y_o) ** 2))(theta0)

        g_demos = jax.vmap(demo_grad)(x_Nxd, y_NxO)  # leaves (N, ...)
        dots = jax.tree.map(lambda jq, gd: gd.reshape(gd.shape[0], -1) @ jq.reshape(jq.shape[0], -1).T,
                            j_q, g_demos)
        return -sum(jax.tree.leaves(dots))

    return jax.vmap(one)(batch.x, batch.labels_BxNxO(), batch.x_query)


def as_BxO(pred: Any) -> np.ndarray:
    """Predictions (B,) or (B, d_out) as (B, d_out) float64."""
    p = np.asarray(pred, np.float64)
    return p[:, None] if p.ndim == 1 else p


def leave_one_out_influence(learner: Any, batch: TaskBatch) -> np.ndarray:
    """Per demonstration, how much an explicit learner's query prediction moves because of it: prediction with all N
    demonstrations minus the prediction without demonstration i, (B, N, d_out). The influence of a learner that has
    nothing to do with the model (a ridge regression, a GD step), for the competent-learner null of Kendall's tau."""
    batch = validate_batch(batch)
    b, n = batch.batch_size, batch.n_context
    if n < 2:
        raise ValueError("leave_one_out_influence needs N >= 2 demonstrations")
    keep_NxM = np.array([[j for j in range(n) if j != i] for i in range(n)])
    y = batch.labels_BxNxO()
    x_drop = batch.x[:, keep_NxM].reshape(b * n, n - 1, batch.dim)
    y_drop = y[:, keep_NxM].reshape(b * n, n - 1, batch.out_dim)
    xq = jnp.repeat(batch.x_query, n, axis=0)
    yq = jnp.repeat(batch.query_labels_BxO(), n, axis=0)
    if not batch.vector_output:
        y_drop, yq = y_drop[..., 0], yq[:, 0]
    dropped = TaskBatch(x=x_drop, y=y_drop, x_query=xq, y_query=yq)
    full = as_BxO(learner(batch))
    return full[:, None, :] - as_BxO(learner(dropped)).reshape(b, n, batch.out_dim)


def other_task_batch(batch: TaskBatch) -> TaskBatch:
    """The same queries with the demonstrations of the next task (rolled by one along the task axis): ICL of an
    unrelated task, a learner that improves on a poor zero-shot prediction without being related to this task's FT."""
    return batch.replace(x=jnp.roll(batch.x, 1, axis=0), y=jnp.roll(batch.y, 1, axis=0),
                         w=None if batch.w is None else jnp.roll(batch.w, 1, axis=0))


def tuned_learners(tune_batch: TaskBatch, lam_grid: Any = None) -> dict[str, Any]:
    """The competent learners of the nulls, tuned on ``tune_batch`` and unrelated to any model's weights: ridge
    regression (lambda from a log grid, lowest query loss) and one GD step (eta tuned, :func:`tune_gd`)."""
    grid = np.logspace(-6, 2, 17) if lam_grid is None else np.asarray(lam_grid, np.float64)
    y = as_BxO(tune_batch.y_query)
    losses = {float(lam): float(np.mean((as_BxO(Ridge(lam=float(lam))(tune_batch)) - y) ** 2)) for lam in grid}
    lam = min(losses, key=losses.get)
    return {"ridge": Ridge(lam=lam), "GD, 1 step": GD(eta=tune_gd(tune_batch, 1).eta, steps=1)}


def _readout_update(h_zsl_BxD: np.ndarray, pred_BxO: np.ndarray, dim: int) -> np.ndarray:
    """The attention output a learner gives if it sets a 1-layer model's read-out to its prediction and changes
    nothing else: the zero-shot output with the y entries set to minus the prediction (the read-out is minus the
    y entry and the query enters with y = 0)."""
    h = np.array(h_zsl_BxD, np.float64, copy=True)
    h[:, dim:] = -pred_BxO
    return h


#: Nulls beside FT in :func:`icl_vs_ft`, by metric (learners passed in are added to all three).
SIMAOU_NULLS = ("random direction", "other task's FT", "other task's ICL", "oracle (y_q)")
KENDALL_NULLS = ("shuffled",)
REC2FTP_NULLS = ("random direction", "other task's FT", "other task's ICL")


def icl_vs_ft(params: TransformerParams, batch: TaskBatch, lr: float, steps: int, key: Array, *,
              param_set: str = "attention", protocol: str = "full_batch", learners: Mapping[str, Any] | None = None,
              n_bins: int = 5) -> dict[str, Any]:
    """All ICL-vs-FT metrics for a 1-layer linear-attention model (float64 recommended), each beside its nulls.

    ``param_set="attention"`` (the study's setting) fine-tunes W_K, W_V and needs ``include_query``;
    ``"adapters"`` fine-tunes the adapter (see :mod:`~iclgd_synth.critiques.finetune`): for the hand-constructed GD
    layer with ``lr`` = its eta and one step, fine-tuning *is* ICL, the known-answer control (SimAOU 1, Kendall
    signed 1, Rec2FTP 1). ``protocol``: ``"full_batch"`` (``steps`` GD steps) or ``"sequential"`` (``steps`` passes
    of one SGD step per demonstration in order, batch 1: the paper's protocol).

    Returns, for FT: ``simaou`` (the paper's normalised SimAOU), ``simaou_unnormalised``, ``kendall_abs``,
    ``kendall_signed`` (summaries over tasks) and ``rec2ftp`` (with the selection-corrected ``expected`` rate); under
    ``nulls[name][metric]`` the same metrics with FT replaced by each null: a random direction of FT's norm, another
    task's FT, another task's ICL, the oracle that predicts y_q (SimAOU only), shuffled influences (Kendall only), and
    every explicit learner of ``learners`` (name -> learner; its update is the zero-shot output with the read-out set
    to its prediction, its influences leave-one-out). Also: the share of each update's energy in the y entries, Dai's
    SimAM before and after FT (layer 1: before is 1 by construction), losses and counts."""
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
    learners = dict(learners or {})
    first = F.lone_tokens(batch.x_query, batch.out_dim)
    tuned = F.finetune_protocol(zs, batch, lr, param_set=param_set, mode="standard", steps=steps, protocol=protocol)
    toks, scores = {}, {}
    toks["icl"], scores["icl"] = F.icl_query_pass(params, batch)
    toks["zsl"], scores["zsl"] = F.shared_query_pass(zs, batch)
    toks["ft"], scores["ft"] = F.per_task_query_pass(tuned, batch)
    toks["random direction"], scores["random direction"] = F.per_task_query_pass(
        F.random_like_update(key, tuned, zs, param_set), batch)
    toks["other task's FT"], _ = F.per_task_query_pass(jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), tuned), batch)
    toks["other task's ICL"], _ = F.icl_query_pass(params, other_task_batch(batch))
    h = {k: np.asarray(F.layer_updates(t, first)[0], np.float64) for k, t in toks.items()}
    pred = {k: -np.asarray(t[-1][:, d:], np.float64) for k, t in toks.items()}
    y = as_BxO(batch.query_labels_BxO())
    pred["oracle (y_q)"] = y
    h["oracle (y_q)"] = _readout_update(h["zsl"], y, d)
    for name, learner in learners.items():
        pred[name] = as_BxO(learner(batch))
        h[name] = _readout_update(h["zsl"], pred[name], d)
    err = {k: A.error_norms(p, y) for k, p in pred.items()}

    def simaou(k):
        return {"simaou": A.summarize(A.normalised_sim_aou(h["icl"], h["zsl"], h[k])),
                "simaou_unnormalised": A.summarize(A.sim_aou(h["icl"], h["zsl"], h[k]))}

    def rec(k):
        return A.rec2ftp_selection_corrected(err["zsl"], err["icl"], err[k], n_bins)

    # Kendall: ICL's |score| and signed per-channel contribution against per-demonstration influences.
    score_abs = np.abs(np.asarray(icl_attention_terms(params, batch)[0], np.float64))
    contrib = np.asarray(demo_contributions(params, batch), np.float64)
    infl = np.asarray(ft_influence_channels(zs, batch, param_set), np.float64)

    def kendall(influence):
        return {"kendall_abs": A.summarize(A.kendall_tau(score_abs, np.linalg.norm(influence, axis=-1))),
                "kendall_signed": A.summarize(A.kendall_tau_channels(contrib, influence))}

    rng = np.random.default_rng(0)
    shuffled = np.stack([r[rng.permutation(r.shape[0])] for r in infl])

    nulls: dict[str, dict[str, Any]] = {k: simaou(k) for k in SIMAOU_NULLS}
    for k in REC2FTP_NULLS:
        nulls[k]["rec2ftp"] = rec(k)
    nulls["shuffled"] = kendall(shuffled)
    for name, learner in learners.items():
        nulls[name] = {**simaou(name), **kendall(leave_one_out_influence(learner, batch)), "rec2ftp": rec(name)}

    y_part = slice(d, None)
    return {
        "protocol": protocol,
        **simaou("ft"), **kendall(infl), "rec2ftp": rec("ft"), "nulls": nulls,
        "y_energy_fraction": {k: A.summarize(A.energy_fraction(h[k] - h["zsl"], y_part)) for k in ("icl", "ft")},
        "y_energy_fraction_normalised": {
            k: A.summarize(A.energy_fraction(A.unit_rows(h[k]) - A.unit_rows(h["zsl"]), y_part))
            for k in ("icl", "ft")},
        "simam": {"before": A.sim_am_across_tasks(scores["icl"][0], scores["zsl"][0]),
                  "after": A.sim_am_across_tasks(scores["icl"][0], scores["ft"][0]),
                  "after_random_direction": A.sim_am_across_tasks(scores["icl"][0], scores["random direction"][0])},
        "simam_delta_defined": False,
        "max_abs_map_change_icl_vs_zsl": float(np.max(np.abs(np.asarray(scores["icl"][0] - scores["zsl"][0])))),
        "max_abs_map_change_ft_vs_zsl": float(np.max(np.abs(np.asarray(scores["ft"][0] - scores["zsl"][0])))),
        "loss": {k: float(0.5 * np.nanmean(err[k] ** 2)) for k in ("icl", "zsl", "ft", "random direction",
                                                                   *learners)},
        "n_diverged": {k: int(np.sum(~np.isfinite(err[k]))) for k in ("ft", "random direction")},
        "h_norm": {k: float(np.nanmean(np.linalg.norm(h[k] - h["zsl"], axis=-1))) for k in ("icl", "ft")},
    }


def variant_key(protocol: str, steps: int) -> str:
    """Key of a fine-tuning variant in the study's metrics: "<steps>" for full-batch GD, "seq<passes>" for the
    paper's sequential protocol."""
    check_choice("protocol", protocol, F.PROTOCOLS)
    return str(int(steps)) if protocol == "full_batch" else f"seq{int(steps)}"


def variant_label(key: str) -> str:
    """Words for a :func:`variant_key`."""
    if key.startswith("seq"):
        n = int(key[3:])
        return f"sequential SGD, {n} pass{'es' * (n > 1)} (paper's protocol)"
    return f"full-batch GD, {int(key)} step{'s' * (int(key) > 1)}"


def icl_vs_ft_variants(params: TransformerParams, tune_batch: TaskBatch, test: TaskBatch,
                       variants: Sequence[tuple[str, int]], learners: Mapping[str, Any] | None = None, *,
                       lr_grid: Any = None, n_bins: int = 5) -> dict[str, dict[str, Any]]:
    """:func:`icl_vs_ft` of a 1-layer query-as-key model for each (protocol, steps) of ``variants``, the fine-tuning
    step size (``lr``) tuned on ``tune_batch`` over ``lr_grid`` (None: :func:`~iclgd_synth.critiques.finetune.tune_lr`'s
    default) for each (float64 recommended); keys from :func:`variant_key`."""
    zs = F.zero_shot_copy(params, test.dim)
    out = {}
    for i, (protocol, s) in enumerate(variants):
        lr, _ = F.tune_lr(zs, tune_batch, param_set="attention", mode="standard", steps=s, protocol=protocol,
                          grid=lr_grid)
        r = icl_vs_ft(params, test, lr, s, jax.random.PRNGKey(1000 * i + s), protocol=protocol, learners=learners,
                      n_bins=n_bins)
        r["lr"] = lr
        out[variant_key(protocol, s)] = r
    return out


def icl_vs_ft_by_steps(params: TransformerParams, tune_batch: TaskBatch, test: TaskBatch, ft_steps: Sequence[int]
                       ) -> dict[int, dict[str, Any]]:
    """:func:`icl_vs_ft` of a 1-layer query-as-key model for each number of full-batch fine-tuning steps, with the
    fine-tuning step size (``lr``) tuned on ``tune_batch`` for each (float64 recommended)."""
    zs = F.zero_shot_copy(params, test.dim)
    out = {}
    for s in ft_steps:
        lr, _ = F.tune_lr(zs, tune_batch, param_set="attention", mode="standard", steps=s)
        r = icl_vs_ft(params, test, lr, s, jax.random.PRNGKey(s))
        r["lr"] = lr
        out[s] = r
    return out


#: The per-layer entries of :func:`~iclgd_synth.critiques.causality.per_layer_alignment` that SimAM_delta reports.
SIMAM_KEYS = ("simaou", "simaou_random_direction", "simam_delta", "simam_delta_random_direction",
              "max_abs_map_change_icl_vs_zsl", "ft_query_loss", "ft_diverged", "zsl_query_loss", "icl_query_loss")


def simam_delta_variants(params: TransformerParams, tune_batch: TaskBatch, test: TaskBatch,
                         variants: Sequence[tuple[str, int]], *, lr_grid: Any = None) -> dict[str, dict[str, Any]]:
    """SimAM_delta and SimAOU per layer of a K-layer query-as-key model against standard fine-tuning of W_K, W_V of
    every layer of its zero-shot copy (step size tuned on ``tune_batch``), with random-direction baselines, for each
    (protocol, steps) of ``variants`` (SimAM_delta is NaN at layer 1, where it is undefined); and Dai's SimAM per
    layer before fine-tuning (ICL vs ZSL) and after (ICL vs FT, and vs the random direction), one cosine across tasks
    of the query's score on itself. Keys from :func:`variant_key`."""
    zs = F.zero_shot_copy(params, test.dim)
    _, icl_s = F.icl_query_pass(params, test)
    _, zsl_s = F.shared_query_pass(zs, test)
    out = {}
    for protocol, s in variants:
        lr, _ = F.tune_lr(zs, tune_batch, param_set="attention", mode="standard", steps=s, protocol=protocol,
                          grid=lr_grid)
        tuned = F.finetune_protocol(zs, test, lr, param_set="attention", mode="standard", steps=s, protocol=protocol)
        base = F.random_like_update(jax.random.PRNGKey(100 + s + 50 * (protocol != "full_batch")), tuned, zs,
                                    "attention")
        r = CA.per_layer_alignment(params, test, tuned, base)
        _, ft_s = F.per_task_query_pass(tuned, test)
        _, b_s = F.per_task_query_pass(base, test)
        layers = range(zs.depth)
        out[variant_key(protocol, s)] = {
            "lr": lr, **{k: r[k] for k in SIMAM_KEYS},
            "simam_before": [A.sim_am_across_tasks(icl_s[l], zsl_s[l]) for l in layers],
            "simam_after": [_finite_cos(icl_s[l], ft_s[l]) for l in layers],
            "simam_after_random_direction": [_finite_cos(icl_s[l], b_s[l]) for l in layers]}
    return out


def _finite_cos(a: Any, b: Any) -> float:
    """:func:`~iclgd_synth.critiques.alignment.sim_am_across_tasks` over the tasks where both are finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return A.sim_am_across_tasks(a[ok], b[ok]) if ok.any() else float("nan")


def simam_delta_by_steps(params: TransformerParams, tune_batch: TaskBatch, test: TaskBatch, ft_steps: Sequence[int]
                         ) -> dict[int, dict[str, Any]]:
    """:func:`simam_delta_variants` for full-batch fine-tuning with each number of steps, keyed by the int."""
    r = simam_delta_variants(params, tune_batch, test, [("full_batch", s) for s in ft_steps])
    return {s: r[str(s)] for s in ft_steps}


def hand_momentum_losses(eta: float, beta: float, tune_batch: TaskBatch, test: TaskBatch
                         ) -> tuple[dict[str, float], np.ndarray]:
    """Test losses of the hand GD layer (1/N in P) with step ``eta``: plain, with momentum attention of both kinds at
    decay ``beta`` and the same eta, and with dual momentum and its own eta (tuned on ``tune_batch`` over
    eta * linspace(0.05, 1.5, 59) for the weighted GD step it is, (a1)); and the demonstration weights of dual
    momentum, (N,)."""
    check_float("beta", beta, min_value=0.0, max_value=1.0)
    d, n = test.dim, test.n_context
    hand = gd_params(d, eta, n_context=n)
    losses = {"hand GD (1 step)": model_loss(hand, test)}
    for kind in ("values", "dual"):
        hp = hand.replace(arch=dataclasses.replace(hand.arch, momentum=beta, momentum_kind=kind))
        losses[f"hand GD + momentum ({kind}, beta {beta}), same eta"] = model_loss(hp, test)
    c = MO.query_momentum_weights(n, beta, "dual")
    best = min(np.linspace(0.05, 1.5, 59) * eta,
               key=lambda e: float(jnp.mean((jnp.einsum("bod,bd->b", MO.weighted_gd_step(tune_batch, e, c),
                                                        tune_batch.x_query) - tune_batch.y_query) ** 2)))
    hpd = gd_params(d, float(best), n_context=n)
    hpd = hpd.replace(arch=dataclasses.replace(hpd.arch, momentum=beta, momentum_kind="dual"))
    losses[f"hand GD + momentum (dual, beta {beta}), eta re-tuned"] = model_loss(hpd, test)
    return losses, c


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
        models = tuple(heavy_ball_params(d, e, m, len(e), n, o) for e, m in schedules)
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


# ------------------------------------------------------------------------------------ headline numbers of one run

#: (metric key in :func:`headline_numbers`, words), in report order.
HEADLINE_METRICS = (
    ("simaou", "SimAOU (paper: normalised outputs)"),
    ("simaou_unnormalised", "SimAOU, unnormalised"),
    ("kendall_abs", "Kendall |score| vs |influence|"),
    ("kendall_signed", "Kendall signed contribution vs influence"),
    ("rec2ftp", "Rec2FTP"),
)


def headline_numbers(r: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """One :func:`icl_vs_ft` result as metric -> comparator -> number (the per-task mean, or the rate): "FT" and every
    null that has the metric; Rec2FTP also gets "selection-corrected expected" (ICL independent of FT given the
    zero-shot error) and "ICL improves (all tasks)" (the unconditional base rate)."""
    out: dict[str, dict[str, float]] = {}
    for metric, _ in HEADLINE_METRICS:
        if metric == "rec2ftp":
            row = {"FT": r["rec2ftp"]["rec2ftp"], "selection-corrected expected": r["rec2ftp"]["expected"],
                   "ICL improves (all tasks)": r["rec2ftp"]["icl_improves_rate"]}
            row.update({k: v["rec2ftp"]["rec2ftp"] for k, v in r["nulls"].items() if "rec2ftp" in v})
        else:
            row = {"FT": r[metric]["mean"]}
            row.update({k: v[metric]["mean"] for k, v in r["nulls"].items() if metric in v})
        out[metric] = {k: float(v) for k, v in row.items()}
    out["y_energy_fraction"] = {k: float(v["mean"]) for k, v in r["y_energy_fraction"].items()}
    out["simam"] = {k: float(v) for k, v in r["simam"].items()}
    return out
