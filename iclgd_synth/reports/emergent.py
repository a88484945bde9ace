"""Report and figures of the ``emergent`` study (:mod:`iclgd_synth.studies.emergent`), from its metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iclgd_synth import plotting
from iclgd_synth.intervals import format_ci
from iclgd_synth.reports.tables import fmt, table
from iclgd_synth.studies.protocol import load_arrays

#: Baselines shown in the error tables (when present), in this order.
SHOWN = ("least_squares", "ridge", "gd_1", "gd_2", "gd_5", "averaging", "nearest_neighbours", "zero")
OBJECTIVE_NAMES = {"next_token": "next-token objective", "icl": "ICL objective (query only)"}


def _columns(n_context: int) -> list[int]:
    """The context lengths shown in tables: a few, always 0, 1, d-ish and N."""
    picks = sorted({0, 1, 2, n_context // 2, n_context - 1, n_context})
    return [n for n in picks if 0 <= n <= n_context]


def render(config, metrics: dict[str, Any], out: Path) -> str:
    out = Path(out)
    t = config.train
    m = t.model
    n_ctx = metrics["n_context"]
    cols = _columns(n_ctx)
    lines = [f"# {metrics.get('study', 'emergent')}", "", metrics.get("description", ""), "",
             f"Tasks: d = {t.task.dim}, N = {n_ctx}, x ~ {t.task.x_dist}, w ~ N(0, {t.task.w_scale}^2 I), label noise "
             f"sigma in {list(config.noises)}. Model: GPT-style, {m.n_layers} blocks, width {m.d_model}, {m.n_heads} "
             f"heads, {m.attention} attention, learned positions {m.positions}; interleaved tokens x_1, y_1, ..., "
             f"x_q, the prediction of y_(n+1) read at x_(n+1). Training: {t.n_steps} steps of {t.batch_size} tasks, "
             f"Adam(W) lr {t.lr} ({t.schedule}, warm-up {t.warmup_steps}), clip {t.clip_norm}, seeds {list(t.seeds)}. "
             f"Errors are half-MSE per context length n (the prediction of y_(n+1) from n pairs) on "
             f"{config.eval_tasks} held-out tasks; GD's step size is tuned per n on {config.tune_tasks} other tasks; "
             "ridge uses the Bayes lambda sigma^2 / tau^2. Distances are the mean squared difference of predictions "
             "divided by d. Model errors are means over seeds with a 95% interval.", ""]
    for noise in metrics["noises"]:
        per = metrics["per_noise"][noise]
        base = per["baseline_errors"]
        shown = [b for b in SHOWN if b in base]
        lines += [f"## Label noise sigma = {noise}", "", "### Error against context length", ""]
        header = ["n"] + [OBJECTIVE_NAMES.get(o, o) for o in per["objectives"]] + shown
        rows = []
        for n in cols:
            row = [n] + [format_ci(r["errors_ci"][n]) for r in per["objectives"].values()]
            row += [base[b][n] for b in shown]
            rows.append(row)
        lines += [table(header, rows)]
        for objective, r in per["objectives"].items():
            name = OBJECTIVE_NAMES.get(objective, objective)
            lines += [f"### {name}: which baseline is it closest to?", "",
                      "Closest baseline by prediction distance at each n, and the mean cosine of the model's implicit "
                      "weights (d y_hat_n / d x_(n+1), autodiff) with each linear baseline's:", ""]
            cos_names = [b for b in ("least_squares", "ridge", "gd_1", "gd_2", "gd_5", "averaging") if b in r["cosine"]]
            rows = [[n, r["closest"][n]["baseline"], r["closest"][n]["distance"]]
                    + [r["cosine"][b][n] for b in cos_names] for n in cols]
            lines += [table(["n", "closest", "distance"] + [f"cos {b}" for b in cos_names], rows)]
            gd = [b for b in r["distance"] if b.startswith("gd_")]
            if gd:
                best_gd = [min(gd, key=lambda b: r["distance"][b][n]) for n in range(n_ctx + 1)]
                lines.append("Nearest fixed number of GD steps at each n (by distance): "
                             + ", ".join(f"n={n}: {best_gd[n]} ({r['distance'][best_gd[n]][n]:.3g}; least squares "
                                         f"{r['distance']['least_squares'][n]:.3g})" for n in cols) + ".")
            lines += ["", f"Order sensitivity (relative spread of the query prediction over {config.n_orderings} "
                          f"orderings of the demonstrations): {format_ci(r['order_spread'])}; baselines: "
                      + ", ".join(f"{b} {fmt(v, 3)}" for b, v in per["baseline_order_spread"].items()) + ".", ""]
    lines += _answer(metrics, cols)
    figures = _figures(out, metrics, config)
    lines += ["## Figures", ""]
    for name, (file, caption) in figures.items():
        lines += [f"![{name}]({file})", "", f"*{caption}*", ""]
    lines += [f"Total time: {metrics['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _answer(metrics: dict[str, Any], cols: list[int]) -> list[str]:
    """The study's answer in numbers: at each n, what each objective's model is closest to, and whether that
    changes between the objectives."""
    lines = ["## The answer, per context length", ""]
    for noise in metrics["noises"]:
        objs = metrics["per_noise"][noise]["objectives"]
        if len(objs) < 2:
            continue
        names = list(objs)
        changes = [n for n in range(metrics["n_context"] + 1)
                   if objs[names[0]]["closest"][n]["baseline"] != objs[names[1]]["closest"][n]["baseline"]]
        lines.append(f"- sigma = {noise}: the closest baseline differs between the objectives at n = "
                     f"{changes if changes else 'no n'}; " + "; ".join(
                         f"{OBJECTIVE_NAMES.get(o, o)} at n = {cols[-1]}: {objs[o]['closest'][cols[-1]]['baseline']}"
                         for o in names) + ".")
    return lines + [""]


def _figures(out: Path, metrics: dict[str, Any], config) -> dict[str, tuple[str, str]]:
    figs: dict[str, tuple[str, str]] = {}
    for noise in metrics["noises"]:
        per = metrics["per_noise"][noise]
        xs = np.arange(metrics["n_context"] + 1)
        series = {}
        for objective, r in per["objectives"].items():
            series[OBJECTIVE_NAMES.get(objective, objective)] = (xs, np.array([s["errors"] for s in r["per_seed"]]).T)
        for b in SHOWN:
            if b in per["baseline_errors"]:
                series[b] = (xs, np.asarray(per["baseline_errors"][b]))
        for logy in (False, True):
            file = f"errors_noise{noise}{'_log' if logy else ''}.png"
            figs[file[:-4]] = (plotting.curves_with_bands(out / file, series, xlabel="context length n",
                                                          ylabel="half-MSE of the prediction of y_(n+1)",
                                                          title=f"sigma = {noise}", logy=logy).name,
                               f"Error against context length, sigma = {noise}{' (log scale)' if logy else ''}: the "
                               "trained models (mean over seeds, band min to max) and the baselines.")
    arrays = load_arrays(out, "arrays")
    losses = {key.split("/", 1)[1]: v for key, v in arrays.items() if key.startswith("losses/")}
    if losses:
        figs["training"] = (plotting.model_loss_curves(out / "training.png", losses, title="training loss"),
                            "Training loss per step (first seed, moving average), per objective and noise level.")
    return figs
