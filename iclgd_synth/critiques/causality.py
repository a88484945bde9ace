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
- Nulls a competent learner would pass (:func:`competent_null_updates`): SimAOU of the update that moves the zero-shot
  prediction to a k-nearest-neighbour prediction, or to the truth; and the untrained-model control (the same protocol
  on the untrained initialisation, run by the study). Most of ICL's change sits in the query's y-entry
  (``icl_y_energy``), so SimAOU is largely the sign agreement of the prediction changes, which these nulls share.
- Layer-causal vs standard (:func:`paired_cells`, :func:`tally`): per cell (parametrisation, steps, layer) a paired t
  test over the test tasks of the per-task SimAOU differences (averaged over seeds), with effect size d_z; wins and
  losses count only significant cells (also after Holm's correction), by parametrisation.
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
from iclgd_synth.intervals import LEVEL, holm, paired_test
from iclgd_synth.learners import GD, NearestNeighbours
from iclgd_synth.metrics import loss as model_loss
from iclgd_synth.model import TransformerParams
from iclgd_synth.precision import to_float64
from iclgd_synth.tasks import TaskBatch


def per_layer_alignment(params: TransformerParams, batch: TaskBatch, tuned: F.ZeroShotModel,
                        baseline: F.ZeroShotModel | None = None,
                        nulls: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per-layer SimAOU, relative distance and SimAM_delta of the fine-tuned copies ``tuned`` (leading task axis)
    against the ICL model ``params`` on ``batch``; SimAOU and SimAM_delta of a ``baseline`` set of copies (the random
    direction); SimAOU of fixed null updates ``nulls`` (name -> (B, D) query-token updates, the same at every layer:
    :func:`competent_null_updates`) under ``"simaou_<name>"``.

    Also per layer: ``max_abs_map_change_icl_vs_zsl`` = max over tasks |m_ICL - m_ZSL| of the query's score on itself
    (0 up to rounding at layer 1, where both runs feed the same token (x_q, 0); nonzero from layer 2 on when the
    query is a key), ``icl_change_scale`` = max |h_ICL - h_ZSL| (the scale for "exact" comparisons) and
    ``icl_y_energy`` = the share of sum_tasks ||h_ICL - h_ZSL||^2 in the y-entries (near 1: SimAOU is then mostly
    the sign agreement of the prediction changes). The per-task SimAOU, (K, B) with NaN for left-out tasks, is under
    the private key ``"_simaou_per_task"`` (for paired tests; not JSON)."""
    d = batch.dim
    zs = F.zero_shot_copy(params, d)
    first = F.lone_tokens(batch.x_query, batch.out_dim)
    icl_tok, icl_s = F.icl_query_pass(params, batch)
    zsl_tok, zsl_s = F.shared_query_pass(zs, batch)
    ft_tok, ft_s = F.per_task_query_pass(tuned, batch)
    h_icl, h_zsl, h_ft = (np.asarray(F.layer_updates(t, first)) for t in (icl_tok, zsl_tok, ft_tok))
    # Tasks whose fine-tuned copy diverged are left out of every metric (and counted in "ft_diverged").
    ok = np.all(np.isfinite(h_ft), axis=(0, 2)) & np.all(np.isfinite(np.asarray(ft_s)), axis=0)
    n_layers = h_icl.shape[0]
    per_task = np.full((n_layers, batch.batch_size), np.nan)
    h_icl_all, h_zsl_all = h_icl, h_zsl
    h_icl, h_zsl, h_ft = h_icl[:, ok], h_zsl[:, ok], h_ft[:, ok]
    icl_s, zsl_s, ft_s = (np.asarray(v)[:, ok] for v in (icl_s, zsl_s, ft_s))
    out: dict[str, Any] = {"simaou": [], "simaou_sem": [], "rel_distance": [], "simam_delta": [],
                           "ft_query_loss": F.query_loss(ft_tok, batch, d), "ft_diverged": F.n_diverged(ft_tok),
                           "zsl_query_loss": F.query_loss(zsl_tok, batch, d),
                           "icl_query_loss": F.query_loss(icl_tok, batch, d)}
    for l in range(n_layers):
        sims = A.sim_aou(h_icl[l], h_zsl[l], h_ft[l])
        per_task[l, ok] = sims
        s = A.summarize(sims)
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
    for name, u in (nulls or {}).items():
        zero = np.zeros_like(h_zsl_all[0])
        out[f"simaou_{name}"] = [A.summarize(A.sim_aou(h_icl_all[l] - h_zsl_all[l], zero, u))["mean"]
                                 for l in range(n_layers)]
    delta = h_icl_all - h_zsl_all
    out["icl_y_energy"] = [float(np.sum(delta[l][:, d:] ** 2) / max(np.sum(delta[l] ** 2), 1e-300))
                           for l in range(n_layers)]
    out["max_abs_diff"] = [float(np.max(np.abs(h_ft[l] - h_icl[l]), initial=0.0)) for l in range(n_layers)]
    out["max_abs_map_change_icl_vs_zsl"] = [float(np.max(np.abs(icl_s[l] - zsl_s[l]), initial=0.0))
                                            for l in range(n_layers)]
    out["icl_change_scale"] = [float(np.max(np.abs(h_icl[l] - h_zsl[l]), initial=0.0)) for l in range(n_layers)]
    out["_simaou_per_task"] = per_task
    return out


def competent_null_updates(params: TransformerParams, batch: TaskBatch, *, k: int = 3) -> dict[str, np.ndarray]:
    """Query-token updates of learners that improve the prediction but have nothing to do with the model, (B, D) each:
    the update that would move the zero-shot copy's final prediction p_ZSL to

    - ``"nearest_neighbours"``: the k-nearest-neighbour prediction from the demonstrations (a competent learner
      unrelated to attention and to GD);
    - ``"toward_truth"``: the true query label y_q (an oracle: the direction any improving learner shares).

    As a token update the change delta of the prediction sits in the y-entries with a minus sign (the read-out is
    minus the y-part): u = (0, ..., 0, -(target - p_ZSL)). A SimAOU against these is the score that merely improving
    the prediction earns."""
    d = batch.dim
    zs = F.zero_shot_copy(params, d)
    zsl_tok, _ = F.shared_query_pass(zs, batch)
    p_zsl = np.asarray(F.readout(zsl_tok[-1], d), np.float64)
    nn = np.asarray(NearestNeighbours(k=k)(batch), np.float64).reshape(p_zsl.shape)
    truth = np.asarray(batch.query_labels_BxO(), np.float64).reshape(p_zsl.shape)
    zeros = np.zeros((batch.batch_size, d))
    return {"nearest_neighbours": np.concatenate([zeros, -(nn - p_zsl)], -1),
            "toward_truth": np.concatenate([zeros, -(truth - p_zsl)], -1)}


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


def evaluate_model(params: TransformerParams, tune_batch: TaskBatch, test: TaskBatch, gd_eta: float, *,
                   ft_steps: Sequence[int], lr_grid: Sequence[float], modes: Sequence[str] = F.MODES,
                   key: int = 0) -> dict[str, Any]:
    """Layer causality of one model (call inside :func:`iclgd_synth.precision.float64`; the parameters are converted
    to float64): its ICL loss on ``test``, its per-layer alignment with the explicit GD steps of step ``gd_eta``
    (``"gd_steps"``), and per fine-tuned parametrisation, number of steps and mode in ``modes``
    (``"alignment"["<param_set>|<steps>|<mode>"]``) the :func:`per_layer_alignment` of the zero-shot copy fine-tuned
    on each test task with the step size tuned on ``tune_batch`` from ``lr_grid`` (key ``"lr"``). Standard
    fine-tuning also gets the random-direction baseline (drawn from ``key`` and the number of steps); ``"nulls"``
    holds the per-layer SimAOU of the competent learners (:func:`competent_null_updates`) and ``"icl_y_energy"`` the
    share of ICL's change in the y-entries. The per-task SimAOU of every variant, (K, B), is under the private key
    ``"_per_task"`` (pop it before saving: it is for :func:`paired_cells`)."""
    d = test.dim
    p64 = to_float64(params)
    zs = F.zero_shot_copy(p64, d)
    nulls = competent_null_updates(p64, test)
    entry: dict[str, Any] = {"icl_loss": model_loss(p64, test), "alignment": {},
                             "gd_steps": gd_step_alignment(p64, test, gd_eta), "_per_task": {}}
    for param_set in F.PARAM_SETS:
        for steps in ft_steps:
            for mode in modes:
                lr, _ = F.tune_lr(zs, tune_batch, param_set=param_set, mode=mode, steps=steps, grid=lr_grid)
                tuned = F.finetune(zs, test, lr, param_set=param_set, mode=mode, steps=steps)
                base = (F.random_like_update(jax.random.fold_in(jax.random.PRNGKey(key), steps), tuned, zs,
                                             param_set) if mode == "standard" else None)
                r = per_layer_alignment(p64, test, tuned, base, None if "nulls" in entry else nulls)
                if "nulls" not in entry:
                    entry["nulls"] = {name: r.pop(f"simaou_{name}") for name in nulls}
                    entry["icl_y_energy"] = r["icl_y_energy"]
                r["lr"] = lr
                name = f"{param_set}|{steps}|{mode}"
                entry["_per_task"][name] = r.pop("_simaou_per_task")
                entry["alignment"][name] = r
    return entry


def paired_cells(per_task_by_seed: Sequence[Mapping[str, np.ndarray]], ft_steps: Sequence[int], variant: str,
                 *, level: float = LEVEL) -> list[dict[str, Any]]:
    """Paired test, per cell (parametrisation, steps, layer) of one model, of ``variant``'s per-task SimAOU against
    standard fine-tuning's, the tasks paired.

    ``per_task_by_seed``: per seed, "<param_set>|<steps>|<mode>" -> (K, B) per-task SimAOU (the same B test tasks for
    every seed; NaN where undefined). Per task the difference variant - standard is averaged over the seeds where both
    are defined; the cell's test is :func:`iclgd_synth.intervals.paired_test` on these B differences (mean difference
    with its interval, t, two-sided p, effect size d_z = mean / sd of the differences). Also per seed the mean
    difference over tasks (``seed_mean_diffs``) and ``seeds_agreeing`` (seeds whose mean difference has the sign of
    the pooled one). ``verdict``: "win" / "loss" when p < 1 - level (sign of the mean difference), "within noise"
    otherwise, "undefined" with fewer than two defined tasks."""
    cells = []
    for ps in F.PARAM_SETS:
        for st in ft_steps:
            std = np.stack([np.asarray(p[f"{ps}|{st}|standard"], np.float64) for p in per_task_by_seed])
            oth = np.stack([np.asarray(p[f"{ps}|{st}|{variant}"], np.float64) for p in per_task_by_seed])
            diff = oth - std  # (S, K, B)
            for l in range(diff.shape[1]):
                d_sb = diff[:, l]
                ok = np.isfinite(d_sb)
                n_ok = ok.sum(axis=0)
                d_task = np.where(n_ok > 0, np.where(ok, d_sb, 0.0).sum(axis=0) / np.maximum(n_ok, 1), np.nan)
                t = paired_test(d_task, np.zeros_like(d_task), level)
                seed_means = [float(np.mean(row[np.isfinite(row)])) if np.isfinite(row).any() else float("nan")
                              for row in d_sb]
                if t["n"] < 2 or not np.isfinite(t["p"]):
                    verdict = "undefined"
                elif t["significant"]:
                    verdict = "win" if t["mean"] > 0 else "loss"
                else:
                    verdict = "within noise"
                sign = np.sign(t["mean"]) if np.isfinite(t["mean"]) else 0.0
                cells.append({"param_set": ps, "steps": int(st), "layer": l + 1, "mean_diff": t["mean"],
                              "lo": t["lo"], "hi": t["hi"], "t": t["t"], "p": t["p"],
                              "effect_size": t["effect_size"], "n_tasks": t["n"], "seed_mean_diffs": seed_means,
                              "seeds_agreeing": int(sum(1 for m in seed_means if np.sign(m) == sign != 0)),
                              "n_seeds": len(seed_means), "n_layers": int(diff.shape[1]), "verdict": verdict})
    return cells


def tally(cells: Sequence[Mapping[str, Any]], *, level: float = LEVEL) -> dict[str, Any]:
    """Win / loss / within-noise / undefined counts of :func:`paired_cells` results, overall and per parametrisation
    (``"attention"`` = W_K, W_V, the set "In-context Learning and Gradient Descent Revisited" fine-tunes; ``"adapters"``)
    , per number of steps and per layer position (``"first"``, ``"middle"``, ``"last"``); ``"holm"``: the same counts when significance is taken after Holm's correction over all
    the given cells; ``"consistent"``: significant after Holm and every seed's mean difference of the same sign."""
    keep = holm(np.array([c["p"] if np.isfinite(c["p"]) else 1.0 for c in cells]), level)

    def count(sel, mode):
        out = {"wins": 0, "losses": 0, "within_noise": 0, "undefined": 0, "cells": 0}
        for c, k in sel:
            out["cells"] += 1
            v = c["verdict"]
            if v in ("win", "loss") and mode != "raw":
                if not k or (mode == "consistent" and c["seeds_agreeing"] < c["n_seeds"]):
                    v = "within noise"
            out[{"win": "wins", "loss": "losses", "within noise": "within_noise", "undefined": "undefined"}[v]] += 1
        return out

    pairs = list(zip(cells, keep))
    res: dict[str, Any] = {}
    for mode in ("raw", "holm", "consistent"):
        res[mode] = {"all": count(pairs, mode),
                     "by_param_set": {ps: count([p for p in pairs if p[0]["param_set"] == ps], mode)
                                      for ps in F.PARAM_SETS},
                     "by_steps": {str(s): count([p for p in pairs if p[0]["steps"] == s], mode)
                                  for s in sorted({c["steps"] for c in cells})},
                     "by_position": {pos: count([p for p in pairs if _position(p[0]) == pos], mode)
                                     for pos in ("first", "middle", "last")}}
    return res


def _position(cell: Mapping[str, Any]) -> str:
    """"first" (layer 1), "last" (the model's last layer) or "middle"."""
    if cell["layer"] == 1:
        return "first"
    return "last" if cell["layer"] == cell.get("n_layers", -1) else "middle"


def comparisons(models: Mapping[str, Any], per_task: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
                ft_steps: Sequence[int]) -> dict[str, Any]:
    """Layer-causal vs standard and forward-order vs standard: :func:`paired_cells` per depth and :func:`tally`
    overall (Holm over every cell of the variant) and per depth. ``models`` maps a depth to its (seed-combined)
    :func:`evaluate_model` entry, ``per_task`` a depth to the per-seed ``"_per_task"`` dicts."""
    out: dict[str, Any] = {}
    for variant in ("layer_causal", "forward_order"):
        cells = {k: paired_cells(per_task[k], ft_steps, variant) for k in models}
        flat = [dict(c, depth=k) for k in models for c in cells[k]]
        out[f"{variant}_vs_standard"] = {"cells": cells, "all": tally(flat),
                                         "by_depth": {k: tally(cells[k]) for k in models}}
    return out


def mean_simaou(entry: Mapping[str, Any], ft_steps: Sequence[int]) -> dict[str, Any]:
    """One seed's mean SimAOU over layers, parametrisations and step counts (the finite cells) of every fine-tuning
    mode present, of the random-direction baseline, of the competent-learner nulls and of the explicit GD steps; and
    the number of undefined cells per mode."""
    row: dict[str, Any] = {}

    def mean(vals):
        v = np.asarray(vals, np.float64)
        return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")

    modes = [m for m in F.MODES if f"{F.PARAM_SETS[0]}|{ft_steps[0]}|{m}" in entry["alignment"]]
    for mode in modes:
        vals = [v for ps in F.PARAM_SETS for st in ft_steps for v in entry["alignment"][f"{ps}|{st}|{mode}"]["simaou"]]
        row[mode] = mean(vals)
        row[f"{mode}_undefined"] = int(np.sum(~np.isfinite(np.asarray(vals, np.float64))))
    row["random_direction"] = mean([v for ps in F.PARAM_SETS for st in ft_steps
                                    for v in entry["alignment"][f"{ps}|{st}|standard"]["simaou_random_direction"]])
    for name, vals in entry.get("nulls", {}).items():
        row[name] = mean(vals)
    row["explicit_gd_steps"] = mean(entry["gd_steps"]["simaou"])
    # SimAM_delta (defined from layer 2 on) of standard fine-tuning and of its random direction.
    for col, field in (("simam_delta_standard", "simam_delta"),
                       ("simam_delta_random_direction", "simam_delta_random_direction")):
        row[col] = mean([v for ps in F.PARAM_SETS for st in ft_steps
                         for v in entry["alignment"][f"{ps}|{st}|standard"][field]])
    return row
