"""Report and figures of the ``transience`` study (:mod:`iclgd_synth.studies.transience`), from its metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iclgd_synth import plotting
from iclgd_synth.intervals import format_ci
from iclgd_synth.reports.tables import fmt, table


def _ci(c: dict[str, Any] | None, digits: int = 3) -> str:
    return "n/a" if c is None else format_ci(c, digits)


def _paired(p: dict[str, Any]) -> str:
    if not np.isfinite(p.get("mean", float("nan"))):
        return "n/a"
    ci = "" if not np.isfinite(p["lo"]) else f" [{p['lo']:.3g}, {p['hi']:.3g}]"
    pv = "" if not np.isfinite(p.get("p", float("nan"))) else f", p = {p['p']:.2g}"
    d = "" if not np.isfinite(p.get("effect_size", float("nan"))) else f", d = {p['effect_size']:+.2g}"
    return f"{p['mean']:+.3g}{ci}{pv}{d}"


def render(config, metrics: dict[str, Any], out: Path) -> str:
    out = Path(out)
    t = config.train
    m = t.model
    th = config.thresholds
    lines = [f"# {metrics.get('study', 'transience')}", "", metrics.get("description", ""), "",
             f"Tasks: d = {t.task.dim}, N = {t.task.n_context}, x ~ {t.task.x_dist}, w ~ N(0, {t.task.w_scale}^2 I), "
             f"label noise sigma = {t.task.noise} (variance {t.task.noise ** 2:g}); nested pools M in "
             f"{metrics['pool_sizes']} (pool seed {t.task.pool_seed}). Model: GPT-style, {m.n_layers} blocks, width "
             f"{m.d_model}, {m.n_heads} heads, {m.attention} attention; {t.objective} objective. Training: "
             f"{t.n_steps} steps of {t.batch_size} tasks, AdamW lr {t.lr} ({t.schedule}"
             f"{f', warm-up {t.warmup_steps}' if t.warmup_steps else ''}), clip {t.clip_norm}, weight decay in "
             f"{metrics['weight_decays']}, seeds {metrics['seeds']}; all runs of one M train as one compiled program "
             "(sweep machinery).",
             "",
             f"Every {config.eval_every} steps each model is evaluated at every context length n = 0..N on "
             f"{config.eval_tasks} fixed fresh tasks and {config.eval_tasks} fixed tasks from its pool: its half-MSE "
             "and its prediction distance (mean squared difference / d, averaged over n) to ridge at the Bayes lambda "
             "sigma^2 / tau^2 and to dMMSE over its pool. Ridge-ness r = d_dMMSE / (d_ridge + d_dMMSE) on fresh "
             f"tasks (1 = ridge, 0 = dMMSE); ICL gain (L_dMMSE - L) / (L_dMMSE - L_ridge) on fresh tasks (0 at "
             "the loss of dMMSE, the Bayes predictor under the pool prior; 1 at ridge's). Curves are "
             f"smoothed over {th.smooth} evaluations. Definitions of this study (not the papers'): t* is the step of "
             f"the lowest fresh-task loss; ICL *emerged* when the gain at t* is >= {th.emerged:g}; *transient* when it "
             f"emerged and, from t* to the end, the loss rose by >= {th.faded:g} x (L_dMMSE - L_ridge) while the "
             "distance to dMMSE fell and the distance to ridge rose (the pattern of the papers); the final state is "
             f"ridge / dMMSE / between at final r >= {0.5 + th.side:g} / <= {0.5 - th.side:g} / else. Intervals are "
             "95% Student-t over seeds.", ""]
    lines += ["## The two Bayes predictors on the evaluation tasks", "",
              "Half-MSE averaged over n; D(ridge, dMMSE) is their distance, the scale of the model's distances.", ""]
    rows = []
    for ms in map(str, metrics["pool_sizes"]):
        r = metrics["reference"][ms]
        rows.append([ms, r["ridge_loss_fresh"], r["dmmse_loss_fresh"], r["ridge_loss_pool"], r["dmmse_loss_pool"],
                     r["ridge_dmmse_fresh"], r["ridge_dmmse_pool"], r["zero_ridge_fresh"]])
    lines += [table(["M", "ridge, fresh", "dMMSE, fresh", "ridge, pool", "dMMSE, pool", "D(ridge, dMMSE) fresh",
                     "D pool", "D(zero, ridge) fresh"], rows)]
    lines += ["## Each pool size and weight decay", ""]
    rows = []
    for c in metrics["cells"]:
        states = ", ".join(f"{k} {v}" for k, v in c["final_states"].items())
        rows.append([c["pool_size"], fmt(c["weight_decay"]), f"{c['emerged']}/{c['n_seeds']}",
                     f"{c['transient']}/{c['n_seeds']}", _ci(c["t_star"]), _ci(c["peak_gain"]), _ci(c["final_gain"]),
                     _ci(c["peak_ridgeness"]), _ci(c["final_ridgeness"]), states, _ci(c["min_loss"]),
                     _ci(c["final_loss"]), _ci(c["final_loss_pool"])])
    lines += [table(["M", "weight decay", "ICL emerged", "transient", "t* (step)", "ICL gain at t*", "final gain",
                     "peak r", "final r", "final state", "min fresh loss", "final fresh loss", "final pool loss"],
                    rows)]
    lines += _answers(metrics)
    figures = _figures(out, metrics, config)
    lines += ["## Figures", ""]
    for name, (file, caption) in figures.items():
        lines += [f"![{name}]({file})", "", f"*{caption}*", ""]
    lines += [f"Training time (all groups, compilation included): {metrics['train_seconds']:.1f} s; total "
              f"{metrics['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _answers(metrics: dict[str, Any]) -> list[str]:
    lines = ["## Answers", ""]
    for w, th in metrics["threshold"].items():
        if th["ridge_from"] is None:
            where = f"no M of the grid ends on the ridge side for most seeds (largest tried {metrics['pool_sizes'][-1]})"
        elif th["not_ridge_at"] is None:
            where = f"every M of the grid ends on the ridge side (smallest tried {metrics['pool_sizes'][0]})"
        else:
            where = f"between M = {th['not_ridge_at']} (not ridge) and M = {th['ridge_from']} (ridge from there on)"
        transient = [c for c in metrics["cells"] if fmt(c["weight_decay"]) == fmt(float(w)) and c["transient"]]
        tr = "; ".join(f"M = {c['pool_size']}: {c['transient']}/{c['n_seeds']} seeds, t* = "
                       f"{_ci(c['t_star_transient'])}" for c in transient) or "none"
        lines.append(f"- weight decay {w}: threshold (final state) {where}. Transient runs: {tr}.")
        pl = metrics["power_law"][w]
        if pl["pooled"] is not None:
            p = pl["pooled"]
            ci = f" [{p['lo']:.3g}, {p['hi']:.3g}]" if np.isfinite(p["lo"]) else " (2 points: no interval)"
            seed = f"; per seed {format_ci(pl['per_seed'], 3)}" if pl["per_seed"] is not None else ""
            lines.append(f"  t*(M) ~ {p['prefactor']:.3g} M^{p['exponent']:.3g}{ci} over {p['n']} transient runs"
                         f"{seed} (the literature: about M^0.47 at the papers' size).")
        else:
            lines.append("  t*(M): fewer than two transient pool sizes, no power law fitted.")
    comp = metrics["weight_decay_comparison"]
    if comp:
        lines += ["", "Weight decay against the first value, paired over seeds (difference with 95% interval, "
                      "p-value, effect size d = mean / sd of the paired differences): final ridge-ness and final ICL "
                      "gain (positive: more ICL kept), final fresh-task loss, final pool loss (positive: the cost on "
                      "the pool).", ""]
        rows = [[r["pool_size"], fmt(r["weight_decay"]), f"{r['transient']} vs {r['reference_transient']}",
                 f"{r['ridge_side']} vs {r['reference_ridge_side']}", _paired(r["final_ridgeness"]),
                 _paired(r["final_gain"]), _paired(r["final_loss"]), _paired(r["final_loss_pool"])] for r in comp]
        lines += [table(["M", "weight decay", "transient (vs ref.)", "ridge side at the end (vs ref.)",
                         "delta final r", "delta final gain", "delta fresh loss", "delta pool loss"], rows)]
    return lines + [""]


def _figures(out: Path, metrics: dict[str, Any], config) -> dict[str, tuple[str, str]]:
    figs: dict[str, tuple[str, str]] = {}
    runs = metrics["runs"]
    for w in metrics["weight_decays"]:
        fig_name = f"distances_wd{w:g}"
        mine = [r for r in runs if r["weight_decay"] == w]
        file = _panels(out / f"{fig_name}.png", mine, metrics["pool_sizes"], metrics["reference"],
                       f"weight decay {w:g}: to ridge (solid), to dMMSE (dashed)", "ridge_fresh", "dmmse_fresh",
                       (("ridge_dmmse_fresh", "grey"),), "distance (fresh tasks)")
        figs[fig_name] = (file, f"Weight decay {w:g}: per pool size M, the distance to ridge (solid) and to dMMSE "
                                "(dashed) on fresh tasks over training, one line per seed; dotted: D(ridge, dMMSE).")
        fig_name = f"losses_wd{w:g}"
        file = _panels(out / f"{fig_name}.png", mine, metrics["pool_sizes"], metrics["reference"],
                       f"weight decay {w:g}: fresh tasks (solid), pool tasks (dashed)", "loss_fresh", "loss_pool",
                       (("ridge_loss_fresh", "C0"), ("dmmse_loss_fresh", "C3")), "half-MSE")
        figs[fig_name] = (file, f"Weight decay {w:g}: per pool size M, the loss on fresh tasks (solid) and on pool "
                                "tasks (dashed) over training, one line per seed; dotted: ridge's (blue) and dMMSE's "
                                "(red) fresh-task losses. The pattern of transient ICL: the fresh-task loss falls well "
                                "below dMMSE's, then rises again (the definitions above say how far).")
    xs = np.log2(np.asarray(metrics["pool_sizes"], np.float64))
    series = {}
    for w in metrics["weight_decays"]:
        ys = [[r["final_ridgeness"] for r in sorted(runs, key=lambda r: r["seed"]) if r["pool_size"] == m and
               r["weight_decay"] == w] for m in metrics["pool_sizes"]]
        n = min(len(y) for y in ys)
        if n:
            series[f"final r, weight decay {w:g}"] = (xs, np.asarray([y[:n] for y in ys]))
            series[f"peak r, weight decay {w:g}"] = (xs, np.asarray(
                [[r["peak_ridgeness"] for r in sorted(runs, key=lambda r: r["seed"]) if r["pool_size"] == m and
                  r["weight_decay"] == w][:n] for m in metrics["pool_sizes"]]))
    if series:
        figs["final_state"] = (plotting.curves_with_bands(
            out / "final_state.png", series, xlabel="log2 M", ylabel="ridge-ness r (1 ridge, 0 dMMSE)",
            title="the final state over M (band: min-max over seeds)").name,
            "Final and peak ridge-ness against log2 M per weight decay: the task-diversity threshold is where the final "
            "r crosses to the ridge side; a gap between peak and final r is a drift towards dMMSE (transience "
            "itself is read on the loss, see the definitions).")
    tstar = {}
    for w in metrics["weight_decays"]:
        pts = [(r["pool_size"], r["t_star"]) for r in runs if r["weight_decay"] == w and r["transient"]]
        if pts:
            tstar[f"weight decay {w:g}"] = pts
    if tstar:
        figs["t_star"] = (_t_star_figure(out / "t_star.png", tstar, metrics["power_law"]),
                          "t* (step of the lowest fresh-task loss) of the transient runs against M, with the "
                          "fitted power law where there are two or more transient M.")
    return figs


def _panels(path: Path, runs: list[dict[str, Any]], pool_sizes, reference, title: str, solid: str, dashed: str,
            hlines: tuple[tuple[str, str], ...], ylabel: str) -> str:
    """One panel per pool size: ``solid`` and ``dashed`` curves per seed, reference levels as dotted lines."""
    import matplotlib.pyplot as plt

    n = len(pool_sizes)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, m in zip(axes.ravel(), pool_sizes):
        for r in sorted((r for r in runs if r["pool_size"] == m), key=lambda r: r["seed"]):
            x = np.asarray(r["steps"])
            ax.plot(x, r["curve"][solid], color="C0", lw=1)
            ax.plot(x, r["curve"][dashed], color="C3", lw=1, ls="--")
        for key, color in hlines:
            ax.axhline(reference[str(m)][key], color=color, ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"M = {m}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0, 0].set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return plotting.save_figure(fig, path).name


def _t_star_figure(path: Path, tstar: dict[str, list], power_law: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, pts) in enumerate(tstar.items()):
        ms, ts = np.asarray(pts, np.float64).T
        ax.scatter(ms, ts, color=f"C{i}", s=18, label=name)
        fit = power_law[name.split()[-1]]["pooled"]
        if fit is not None:
            grid = np.geomspace(ms.min(), ms.max(), 50)
            ax.plot(grid, fit["prefactor"] * grid ** fit["exponent"], color=f"C{i}", lw=1,
                    label=f"{fit['prefactor']:.3g} M^{fit['exponent']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("pool size M")
    ax.set_ylabel("t* (step)")
    ax.legend(fontsize=7)
    return plotting.save_figure(fig, path).name
