"""Report and figures of the order-sensitivity study (:mod:`iclgd_synth.studies.order`), from its metrics.

Nothing here trains or samples: :func:`render` reads the metrics dict and the saved training curves of a run
directory, writes the PNG figures there and returns the Markdown report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from iclgd_synth import plotting
from iclgd_synth.reports.tables import fmt, table
from iclgd_synth.studies.protocol import load_arrays


def render(config, metrics: dict[str, Any], out: Path) -> str:
    figures = _figures(Path(out), config, metrics)
    return _report(config, metrics, figures)


def _with_ci(value: Any, ci: Mapping[str, Any] | None) -> Any:
    """``value`` as a number, or 'mean [lo, hi]' when it has a 95% interval (2+ seeds)."""
    if ci is None or ci.get("n", 0) < 2 or not np.isfinite(ci.get("lo", float("nan"))):
        return value
    return f"{fmt(ci['mean'])} [{fmt(ci['lo'])}, {fmt(ci['hi'])}]"


def _cell(row: Mapping[str, Any], key: str) -> Any:
    return _with_ci(row[key], row.get("ci", {}).get(key))


def _half_width(row: Mapping[str, Any], key: str) -> float:
    ci = row.get("ci", {}).get(key)
    if ci is None or not np.isfinite(ci.get("lo", float("nan"))):
        return 0.0
    return 0.5 * (ci["hi"] - ci["lo"])


def _figures(out: Path, config, metrics: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Write the PNG figures; returns name -> (file name, caption)."""
    rows = metrics["predictors"]
    n_seeds = metrics.get("n_seeds", 1)
    figs = {"spread": (plotting.bar_chart(
        out / "spread.png", {k: v["relative_spread"] for k, v in rows.items()},
        errors={k: _half_width(v, "relative_spread") for k, v in rows.items()},
        ylabel="relative spread across orderings", log=True, floor=1e-17,
        title=f"Order sensitivity: {config.n_orderings} orderings of N = {config.train.task.n_context} "
              "demonstrations (float64; floor 1e-17)"),
        "Relative spread of every predictor across orderings (log scale, floored at 1e-17)"
        + (f"; trained models: mean over {n_seeds} seeds with 95% interval bars." if n_seeds > 1 else "."))}
    sw = metrics["sweep"]
    if sw["predictors"]:
        figs["sweep"] = (plotting.line_chart(
            out / "spread_vs_n.png", sw["n_context"], {k: v["relative_spread"] for k, v in sw["predictors"].items()},
            xlabel="N (demonstrations)", ylabel="relative spread", logy=True, logx=True, floor=1e-17,
            title="Order sensitivity against the number of demonstrations"),
            "Relative spread against N for the explicit learners (re-tuned at every N) and the causal hand models.")
    refs = metrics["references"]
    if refs:
        names = list(rows)
        mat = np.array([[metrics["correlations"][r][n]["mean"] for r in refs] for n in names], np.float64)
        figs["correlation"] = (plotting.heatmap(
            out / "order_correlation.png", mat, names, refs,
            title="Correlation of order effects with causal models (n/a: invariant)"),
            "Mean per-task correlation of order effects with each order-sensitive causal model"
            + (" (trained models: mean over seeds)." if n_seeds > 1 else "."))
    arrays = load_arrays(out, "arrays")
    curves = {k[len("losses/"):]: v for k, v in arrays.items() if k.startswith("losses/")}
    if curves:
        figs["training"] = (plotting.model_loss_curves(out / "training.png", curves,
                                                       title="Training loss of the trained models (first seed)"),
                            "Training loss per step of every trained model (first seed, moving average).")
    return figs


def _report(config, metrics: dict[str, Any], figures: Mapping[str, tuple[str, str]]) -> str:
    tr = config.train
    t = tr.task
    rows = metrics["predictors"]
    n_seeds = metrics.get("n_seeds", len(tr.seeds))
    seeds = metrics.get("seeds", list(tr.seeds))
    seed_text = (f"Every trained model was trained and evaluated for each of {n_seeds} seeds {seeds}; its numbers are "
                 "means over seeds with a 95% Student-t interval in brackets. The explicit learners and hand "
                 "models do not depend on the training seed (one evaluation)." if n_seeds > 1 else
                 f"Trained models: 1 seed ({seeds[0]}), so no interval across seeds; use --seeds to get one.")
    lines = [
        "# Order sensitivity of in-context learning and of explicit learners", "",
        metrics.get("description", ""), "",
        "Claim tested (\"Do pretrained Transformers Learn In-Context by Gradient Descent?\"): full-batch GD is exactly "
        "invariant to the order of the demonstrations, while ICL in a causal model, online SGD and Adam are not; an "
        "algorithm equivalent to ICL should react to reordering the way ICL does.", "",
        f"Tasks: d = {t.dim}, N = {t.n_context}, x ~ {t.x_dist} (half-width {t.x_range}), w ~ N(0, I), noise "
        f"{t.noise}. {config.n_tasks} test tasks, each under the same {config.n_orderings} random orderings for "
        f"every predictor. Step sizes tuned on {config.tune_tasks} other tasks (in their given order). Models trained "
        f"for {tr.n_steps} steps of {tr.batch_size} tasks (AdamW lr {tr.lr}). Evaluation in float64. {seed_text}", "",
        "Definitions: *spread* = mean over tasks of the standard deviation (ddof = 0) of the prediction across "
        "orderings; *relative spread* = spread / std across tasks of the per-task mean prediction; *order "
        "correlation* = per-task Pearson correlation between two predictors' deviation vectors (prediction minus "
        "per-task mean, one entry per ordering), averaged over tasks where both move (n/a if one is invariant).", "",
        "## Spread across orderings", "",
        table(["predictor", "loss (mean over orderings)", "spread", "relative spread", "max per-task spread",
               "hyper-parameters"],
              [[name, _cell(r, "loss"), _cell(r, "spread"), _cell(r, "relative_spread"),
                _cell(r, "max_task_spread"), ", ".join(f"{k} = {fmt(r[k])}" for k in ("eta", "gamma", "lr") if k in r)]
               for name, r in rows.items()]),
        "## Checks (measured)", "",
        *(["A claim about a trained model holds when it holds for every seed; its relative spread is the mean over "
           "seeds.", ""] if n_seeds > 1 else []),
        table(["claim", "predictor", "relative spread", "holds"],
              [[c, v["predictor"], v["relative_spread"], v["holds"]] for c, v in metrics["checks"].items()]),
    ]
    refs = metrics["references"]
    if refs:
        corr = metrics["correlations"]
        lines += ["## Which learner's order effects look like a causal model's?", "",
                  "Mean per-task correlation of order effects (rows: predictor; columns: causal reference model). "
                  "A learner equivalent to the causal model would score 1." + (
                      " Where a trained model is involved: mean over seeds [95% interval]." if n_seeds > 1 else ""),
                  "",
                  table(["predictor"] + refs,
                        [[n] + [_with_ci(corr[r][n]["mean"], corr[r][n].get("ci")) for r in refs] for n in rows])]
        best = {}
        for r in refs:
            cand = {n: corr[r][n]["mean"] for n in rows
                    if n != r and np.isfinite(corr[r][n]["mean"]) and "trained" not in n and not n.startswith("hand")}
            if cand:
                b = max(cand, key=cand.get)
                best[r] = (b, cand[b])
        if best:
            lines += ["Best-correlated explicit learner per causal model: " + "; ".join(
                f"{r}: {b} ({fmt(v)})" for r, (b, v) in best.items()) + ".", ""]
    sw = metrics["sweep"]
    if sw["predictors"]:
        lines += ["## Sweep over the number of demonstrations", "",
                  "Relative spread (learners re-tuned at every N; the trained models are only evaluated at their "
                  "training N).", "",
                  table(["predictor"] + [f"N = {v}" for v in sw["n_context"]],
                        [[name] + e["relative_spread"] for name, e in sw["predictors"].items()])]
    lines += ["## Notes", "",
              "- The 1-layer causal models (hand-constructed or trained) are order-invariant: the query is the last "
              "token and sees all keys. Order effects in causal models come from the context tokens' prefix-sum "
              "updates, read by the query from layer 2 on.",
              "- The non-causal trained LSA is invariant by construction (its layer sums over the demonstrations); "
              "its measured spread is float64 rounding.",
              "- The causal hand models are the K-step GD weights run with a causal mask; from 2 layers on they are "
              "no longer K-step GD, so their eta is tuned for the causal model itself (column hyper-parameters; "
              "non-causal K-step GD's eta for comparison: " + ", ".join(
                  f"K = {k}: {fmt(v)}" for k, v in metrics["hand_eta_noncausal_gd"].items()) + ").",
              "- Step sizes of SGD and Adam are tuned in the tasks' given order; a different order is a different "
              "run of the same algorithm, which is what the spread measures.", "",
              "## Figures", ""]
    for name, (file, caption) in figures.items():
        lines += [f"![{name}]({file})", "", f"*{caption}*", ""]
    lines += [f"Total time: {metrics['total_seconds']:.1f} s (tuning {metrics['tune_seconds']:.1f} s).", ""]
    return "\n".join(lines)
