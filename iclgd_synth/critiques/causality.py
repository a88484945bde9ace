"""Layer causality: does ICL's layer-by-layer change of the query look more like standard or layer-causal fine-tuning?

"In-context Learning and Gradient Descent Revisited" observes that ICL at layer l can only use what layers <= l
computed, while GD fine-tuning updates layer l with gradients flowing back from deeper layers; its layer-causal
variant (each layer's input detached, a read-out after every layer, loss = sum of per-layer losses) aligned better
with ICL. This module runs that comparison on trained multi-layer linear self-attention models.

Definitions (the testbed's choices; fine-tuning in detail in :mod:`~iclgd_synth.critiques.finetune`):

- ICL per-layer update of the query: h^l_ICL = e_q^l - e_q^(l-1) with the demonstrations in context (a D-vector);
  ZSL: the same for the query alone; FT: the same for the query alone through a fine-tuned zero-shot copy.
- Fine-tuning: full-batch GD on the demonstrations (each a lone query (x_i, 0) with target y_i), of either
  ``"attention"`` (W_K, W_V of every layer; the models are trained with the query as a key so that the zero-shot copy
  is not trivially zero) or ``"adapters"`` (per-layer matrices A_l reading the token's x-part, the fine-tunable
  counterpart of the dual form's implicit weights); ``"standard"``, ``"layer_causal"`` (detached inputs, sum of
  per-layer read-out losses, all layers at once) or ``"forward_order"`` (layer-causal, one layer after the other).
  The step size is tuned on separate tasks (lowest query loss of the fine-tuned copy) for each variant and number of
  steps, so each variant is compared at its best.
- Metrics per layer l: SimAOU = cos(h^l_ICL - h^l_ZSL, h^l_FT - h^l_ZSL) per task, averaged; the relative distance
  ||h^l_FT - h^l_ICL|| / ||h^l_ICL - h^l_ZSL||; SimAM_delta on the query's self-attention score, the only key shared by
  the three runs: one scalar per task, so the cosine is taken across tasks (a per-task cosine of scalars would only
  be a sign); at layer 1 the ICL and ZSL scores coincide (same input token), so SimAM_delta is undefined there.
  Baseline for both: the standard fine-tuning update's norm in a random direction (a fine-tuned copy moved from the
  zero-shot copy by a Gaussian direction with the same per-leaf norm).
- Explicit GD reference per layer: the l-th step of K-step GD on the in-context loss (from W0 = 0, eta tuned for K
  steps on the tuning tasks) changes GD's prediction w x_q by (w_l - w_(l-1)) x_q; as a query-token update (the
  read-out is minus the y-entry) that is g^l = (0, ..., 0, -(w_l - w_(l-1)) x_q). GD without demonstrations changes
  nothing, so its zero-shot update is 0 and SimAOU_GD = cos(h^l_ICL - h^l_ZSL, g^l); also the relative distance
  ||(h^l_ICL - h^l_ZSL) - g^l|| / ||g^l|| and the max abs difference.

Exact control: the hand-constructed K-layer GD model (query not a key, so a lone token has no key, its zero-shot copy
is the identity, h_ZSL = 0, and only adapters can be fine-tuned). Its layer l changes the query's y-entry by
-(w_l - w_(l-1)) x_q, the l-th GD step, so it matches the explicit GD reference exactly (SimAOU_GD = 1). With adapter
fine-tuning, one step of size eta from A = 0:

- forward-order (layer-causal, one layer after the other) reproduces *every* layer's update exactly: adapter l is
  tuned after adapters < l are final, on layer l's own read-out loss, so its input on demonstration i already carries
  the first l - 1 GD steps (y-entry -w_(l-1) x_i) and its gradient is that of GD's l-th step: adapter l becomes minus
  the l-th GD update;
- standard and simultaneous layer-causal fine-tuning reproduce *layer 1 only*: all adapters take their one step at
  A = 0, where every layer is the identity, so every layer sees the raw demonstrations (x_i, 0) (standard: the final
  read-out's gradient passes unchanged through identity layers; layer-causal: each layer's own loss at the identity
  input) and every adapter becomes the *first* step's update, which is right at layer 1 and wrong from layer 2 on
  (there GD's step acts on the residuals y_i - w_(l-1) x_i).

The ``causal`` study (:mod:`iclgd_synth.studies.causal`) measures all of this with :func:`evaluate_model`,
:func:`hand_control` and :func:`comparisons`; its report (:mod:`iclgd_synth.reports.causal`) lists per variant the
layers reproduced exactly, and the tests check it in float64.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from iclgd_synth.constructions import gd_params
from iclgd_synth.critiques import alignment as A
from iclgd_synth.critiques import finetune as F
from iclgd_synth.learners import GD
from iclgd_synth.metrics import loss as model_loss
from iclgd_synth.model import TransformerParams
from iclgd_synth.precision import to_float64
from iclgd_synth.tasks import TaskBatch


def per_layer_alignment(params: TransformerParams, batch: TaskBatch, tuned: F.ZeroShotModel,
                        baseline: F.ZeroShotModel | None = None) -> dict[str, Any]:
    """Per-layer SimAOU, relative distance and SimAM_delta of the fine-tuned copies ``tuned`` (leading task axis)
    against the ICL model ``params`` on ``batch`` (and SimAOU and SimAM_delta of a ``baseline`` set of copies).

    Also per layer: ``max_abs_map_change_icl_vs_zsl`` = max over tasks |m_ICL - m_ZSL| of the query's score on itself
    (0 up to rounding at layer 1, where both runs feed the same token (x_q, 0); nonzero from layer 2 on when the
    query is a key) and ``icl_change_scale`` = max |h_ICL - h_ZSL| (the scale for "exact" comparisons)."""
    d = batch.dim
    zs = F.zero_shot_copy(params, d)
    first = F.lone_tokens(batch.x_query, batch.out_dim)
    icl_tok, icl_s = F.icl_query_pass(params, batch)
    zsl_tok, zsl_s = F.shared_query_pass(zs, batch)
    ft_tok, ft_s = F.per_task_query_pass(tuned, batch)
    h_icl, h_zsl, h_ft = (np.asarray(F.layer_updates(t, first)) for t in (icl_tok, zsl_tok, ft_tok))
    # Tasks whose fine-tuned copy diverged are left out of every metric (and counted in "ft_diverged").
    ok = np.all(np.isfinite(h_ft), axis=(0, 2)) & np.all(np.isfinite(np.asarray(ft_s)), axis=0)
    h_icl, h_zsl, h_ft = h_icl[:, ok], h_zsl[:, ok], h_ft[:, ok]
    icl_s, zsl_s, ft_s = (np.asarray(v)[:, ok] for v in (icl_s, zsl_s, ft_s))
    n_layers = h_icl.shape[0]
    out: dict[str, Any] = {"simaou": [], "simaou_sem": [], "rel_distance": [], "simam_delta": [],
                           "ft_query_loss": F.query_loss(ft_tok, batch, d), "ft_diverged": F.n_diverged(ft_tok),
                           "zsl_query_loss": F.query_loss(zsl_tok, batch, d),
                           "icl_query_loss": F.query_loss(icl_tok, batch, d)}
    for l in range(n_layers):
        s = A.summarize(A.sim_aou(h_icl[l], h_zsl[l], h_ft[l]))
        out["simaou"].append(s["mean"])
        out["simaou_sem"].append(s["sem"])
        dist = np.linalg.norm(h_ft[l] - h_icl[l], axis=-1)
        ref = np.linalg.norm(h_icl[l] - h_zsl[l], axis=-1)
        out["rel_distance"].append(float(np.mean(dist) / max(np.mean(ref), 1e-300)))
        out["simam_delta"].append(A.sim_am_delta_across_tasks(icl_s[l], zsl_s[l], ft_s[l]))
    if baseline is not None:
        b_tok, b_s = F.per_task_query_pass(baseline, batch)
        h_b = np.asarray(F.layer_updates(b_tok, first))[:, ok]
        b_s = np.asarray(b_s)[:, ok]
        out["simaou_random_direction"] = [A.summarize(A.sim_aou(h_icl[l], h_zsl[l], h_b[l]))["mean"]
                                          for l in range(n_layers)]
        out["simam_delta_random_direction"] = [A.sim_am_delta_across_tasks(icl_s[l], zsl_s[l], b_s[l])
                                               for l in range(n_layers)]
    out["max_abs_diff"] = [float(np.max(np.abs(h_ft[l] - h_icl[l]), initial=0.0)) for l in range(n_layers)]
    out["max_abs_map_change_icl_vs_zsl"] = [float(np.max(np.abs(icl_s[l] - zsl_s[l]), initial=0.0))
                                            for l in range(n_layers)]
    out["icl_change_scale"] = [float(np.max(np.abs(h_icl[l] - h_zsl[l]), initial=0.0)) for l in range(n_layers)]
    return out


def gd_step_updates(batch: TaskBatch, eta: float, n_layers: int) -> np.ndarray:
    """The per-step change of K-step GD's prediction (from W0 = 0, step ``eta``) as a query-token update, (K, B, D):
    y-entry -(W_l - W_(l-1)) x_q (minus the change of GD's prediction W x_q: the read-out is minus the y-entry),
    x-entries 0."""
    w_prev = np.zeros((batch.batch_size, batch.out_dim, batch.dim))
    xq = np.asarray(batch.x_query, np.float64)
    steps = []
    for l in range(1, n_layers + 1):
        w_l = np.asarray(GD(eta=eta, steps=l).weights(batch), np.float64)
        pred_change = np.einsum("bod,bd->bo", w_l - w_prev, xq)
        steps.append(np.concatenate([np.zeros_like(xq), -pred_change], axis=-1))
        w_prev = w_l
    return np.stack(steps)


def gd_step_alignment(params: TransformerParams, batch: TaskBatch, eta: float) -> dict[str, Any]:
    """Per layer l, the model's ICL change of the query (relative to zero-shot) against the l-th step of K-step GD
    with step ``eta`` (K = the model's number of layer applications): SimAOU_GD = cos(h_ICL - h_ZSL, g), relative
    distance ||(h_ICL - h_ZSL) - g|| / ||g|| (means over tasks), max abs difference, and the prediction's loss of
    K-step GD (for scale). See the module docstring."""
    d = batch.dim
    zs = F.zero_shot_copy(params, d)
    first = F.lone_tokens(batch.x_query, batch.out_dim)
    icl_tok, _ = F.icl_query_pass(params, batch)
    zsl_tok, _ = F.shared_query_pass(zs, batch)
    delta = np.asarray(F.layer_updates(icl_tok, first)) - np.asarray(F.layer_updates(zsl_tok, first))
    g = gd_step_updates(batch, eta, delta.shape[0])
    zero = np.zeros_like(g[0])
    out: dict[str, Any] = {"eta": float(eta), "simaou": [], "simaou_sem": [], "rel_distance": [],
                           "max_abs_diff": [], "gd_step_scale": []}
    for l in range(delta.shape[0]):
        s = A.summarize(A.sim_aou(delta[l], zero, g[l]))
        out["simaou"].append(s["mean"])
        out["simaou_sem"].append(s["sem"])
        out["rel_distance"].append(float(np.mean(np.linalg.norm(delta[l] - g[l], axis=-1))
                                         / max(np.mean(np.linalg.norm(g[l], axis=-1)), 1e-300)))
        out["max_abs_diff"].append(float(np.max(np.abs(delta[l] - g[l]))))
        out["gd_step_scale"].append(float(np.max(np.abs(g[l]))))
    return out


def exact_layers(r: Mapping[str, Any], rel_tol: float = 1e-10) -> list[int]:
    """The (1-based) layers at which a per-layer comparison is exact: max abs difference <= rel_tol * max(1, scale)."""
    scale = r.get("icl_change_scale", r.get("gd_step_scale"))
    return [l + 1 for l, (err, sc) in enumerate(zip(r["max_abs_diff"], scale)) if err <= rel_tol * max(1.0, sc)]


def hand_control(dim: int, n_layers: int, eta: float, batch: TaskBatch, n_context: int) -> dict[str, Any]:
    """Per-layer alignment of the hand K-layer GD model with adapter fine-tuning (one step of size eta, every mode)
    and with the explicit GD steps (key ``"gd_steps"``); ``"exact_layers"`` lists per comparison the layers it
    reproduces exactly."""
    params = gd_params(dim, eta, n_layers=n_layers, n_context=n_context)
    zs = F.zero_shot_copy(params, dim)
    out: dict[str, Any] = {
        mode: per_layer_alignment(params, batch, F.finetune(zs, batch, eta, param_set="adapters", mode=mode, steps=1))
        for mode in F.MODES}
    out["gd_steps"] = gd_step_alignment(params, batch, eta)
    out["exact_layers"] = {name: exact_layers(out[name]) for name in (*F.MODES, "gd_steps")}
    return out


def compare_to_standard(standard: Any, other: Any, *, tie_tol: float = 1e-12) -> dict[str, int]:
    """Cell-by-cell comparison of a variant's SimAOU with standard fine-tuning's: ``wins`` (other > standard +
    tie_tol), ``losses``, ``ties`` and ``undefined`` (either value NaN: counted apart, never as a win or a loss)."""
    s, o = np.asarray(standard, np.float64).ravel(), np.asarray(other, np.float64).ravel()
    if s.shape != o.shape:
        raise ValueError(f"compare_to_standard needs equal shapes, got {s.shape} and {o.shape}")
    ok = np.isfinite(s) & np.isfinite(o)
    diff = np.where(ok, o - s, 0.0)
    return {"wins": int(np.sum(ok & (diff > tie_tol))), "losses": int(np.sum(ok & (diff < -tie_tol))),
            "ties": int(np.sum(ok & (np.abs(diff) <= tie_tol))), "undefined": int(np.sum(~ok)), "cells": int(s.size)}


def evaluate_model(params: TransformerParams, tune_batch: TaskBatch, test: TaskBatch, gd_eta: float, *,
                   ft_steps: Sequence[int], lr_grid: Sequence[float]) -> dict[str, Any]:
    """Layer causality of one trained model (call inside :func:`iclgd_synth.precision.float64`; the parameters are
    converted to float64): its ICL loss on ``test``, its per-layer alignment with the explicit GD steps of step
    ``gd_eta`` (``"gd_steps"``), and per fine-tuned parametrisation, number of steps and mode
    (``"alignment"["<param_set>|<steps>|<mode>"]``) the :func:`per_layer_alignment` of the zero-shot copy fine-tuned
    on each test task with the step size tuned on ``tune_batch`` from ``lr_grid`` (key ``"lr"``); standard
    fine-tuning also gets the random-direction baseline."""
    d = test.dim
    p64 = to_float64(params)
    zs = F.zero_shot_copy(p64, d)
    entry: dict[str, Any] = {"icl_loss": model_loss(p64, test), "alignment": {},
                             "gd_steps": gd_step_alignment(p64, test, gd_eta)}
    for param_set in F.PARAM_SETS:
        for steps in ft_steps:
            for mode in F.MODES:
                lr, _ = F.tune_lr(zs, tune_batch, param_set=param_set, mode=mode, steps=steps, grid=lr_grid)
                tuned = F.finetune(zs, test, lr, param_set=param_set, mode=mode, steps=steps)
                base = (F.random_like_update(jax.random.PRNGKey(steps), tuned, zs, param_set)
                        if mode == "standard" else None)
                r = per_layer_alignment(p64, test, tuned, base)
                r["lr"] = lr
                entry["alignment"][f"{param_set}|{steps}|{mode}"] = r
    return entry


def comparisons(models: Mapping[str, Any], ft_steps: Sequence[int]) -> dict[str, Any]:
    """Layer-causal vs standard and forward-order vs standard, cell by cell (depth, parametrisation, steps, layer),
    overall and per depth; and the per-depth mean SimAOU (over the finite cells) of every variant and of the
    explicit GD steps. ``models`` maps a depth to an :func:`evaluate_model` entry."""
    out: dict[str, Any] = {}
    for variant in ("layer_causal", "forward_order"):
        by_depth, all_s, all_o = {}, [], []
        for k, entry in models.items():
            s_k, o_k = [], []
            for ps in F.PARAM_SETS:
                for st in ft_steps:
                    s_k += entry["alignment"][f"{ps}|{st}|standard"]["simaou"]
                    o_k += entry["alignment"][f"{ps}|{st}|{variant}"]["simaou"]
            by_depth[k] = compare_to_standard(s_k, o_k)
            all_s += s_k
            all_o += o_k
        out[f"{variant}_vs_standard"] = {"all": compare_to_standard(all_s, all_o), "by_depth": by_depth}
    means: dict[str, Any] = {}
    for k, entry in models.items():
        row = {}
        for mode in F.MODES:
            vals = np.array([v for ps in F.PARAM_SETS for st in ft_steps
                             for v in entry["alignment"][f"{ps}|{st}|{mode}"]["simaou"]], np.float64)
            row[mode] = float(np.mean(vals[np.isfinite(vals)])) if np.isfinite(vals).any() else float("nan")
            row[f"{mode}_undefined"] = int(np.sum(~np.isfinite(vals)))
        gd = np.asarray(entry["gd_steps"]["simaou"], np.float64)
        row["explicit_gd_steps"] = float(np.mean(gd[np.isfinite(gd)])) if np.isfinite(gd).any() else float("nan")
        means[k] = row
    out["mean_simaou_by_depth"] = means
    return out
