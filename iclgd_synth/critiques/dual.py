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
- SimAOU = cos(h_ICL - h_ZSL, h_FT - h_ZSL) per task, averaged; baselines: the same FT update norm in a random
  direction, and the fine-tuned copy of *another* task.
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
- Rec2FTP: of the tasks where FT lowers the query's absolute error below zero-shot's, the fraction where ICL does;
  reported with ICL's unconditional rate and with the random-direction FT in place of FT.

**Momentum attention**: the exact relations of :mod:`~iclgd_synth.critiques.momentum` measured in float64 on random
sizes (:func:`momentum_equivalence_errors`), and the hand GD layer with momentum attention
(:func:`hand_momentum_losses`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.constructions import gd_params, heavy_ball_params
from iclgd_synth.critiques import alignment as A
from iclgd_synth.critiques import causality as CA
from iclgd_synth.critiques import finetune as F
from iclgd_synth.critiques import momentum as MO
from iclgd_synth.dual_form import DualForm, dual_form
from iclgd_synth.learners import GD
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


def icl_vs_ft_by_steps(params: TransformerParams, tune_batch: TaskBatch, test: TaskBatch, ft_steps: Sequence[int]
                       ) -> dict[int, dict[str, Any]]:
    """:func:`icl_vs_ft` of a 1-layer query-as-key model for each number of fine-tuning steps, with the fine-tuning
    step size (``lr``) tuned on ``tune_batch`` for each (float64 recommended)."""
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


def simam_delta_by_steps(params: TransformerParams, tune_batch: TaskBatch, test: TaskBatch, ft_steps: Sequence[int]
                         ) -> dict[int, dict[str, Any]]:
    """SimAM_delta and SimAOU per layer of a K-layer query-as-key model against standard fine-tuning of W_K, W_V of
    every layer of its zero-shot copy (step size tuned on ``tune_batch``), with random-direction baselines, for each
    number of fine-tuning steps (SimAM_delta is NaN at layer 1, where it is undefined)."""
    zs = F.zero_shot_copy(params, test.dim)
    out = {}
    for s in ft_steps:
        lr, _ = F.tune_lr(zs, tune_batch, param_set="attention", mode="standard", steps=s)
        tuned = F.finetune(zs, test, lr, param_set="attention", mode="standard", steps=s)
        base = F.random_like_update(jax.random.PRNGKey(100 + s), tuned, zs, "attention")
        r = CA.per_layer_alignment(params, test, tuned, base)
        out[s] = {"lr": lr, **{k: r[k] for k in SIMAM_KEYS}}
    return out


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
