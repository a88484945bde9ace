"""Report and figures of the ``preconditioned`` study (:mod:`iclgd_synth.studies.preconditioned`), from its metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iclgd_synth import plotting
from iclgd_synth.intervals import format_ci
from iclgd_synth.reports.tables import table
from iclgd_synth.studies.protocol import load_arrays


def render(config, metrics: dict[str, Any], out: Path) -> str:
    out = Path(out)
    per = metrics["per_kappa"]
    t = config.train
    lines = [f"# {metrics.get('study', 'preconditioned')}", "", metrics.get("description", ""), "",
             f"Tasks: d = {t.task.dim}, N = {t.task.n_context}, x ~ N(0, Sigma) with eigenvalues log-spaced over the "
             f"condition number kappa (trace d, random rotation, cov_seed {t.task.cov_seed}), w ~ N(0, "
             f"{t.task.w_scale}^2 I), noise {t.task.noise}. Training: 1-layer LSA, {t.n_steps} steps of "
             f"{t.batch_size} tasks, lr {t.lr}, seeds {list(t.seeds)}. G is the trained model's effective "
             "preconditioner (its W_K^T W_Q input block times its P W_V label entry, times N); G* the exact "
             "population optimum; losses are half-MSE. Intervals are 95% Student-t over seeds.", "",
             "## The trained preconditioner against G*", "",
             table(["kappa", "cos(G, G*)", "relative error", f"steps to cos >= {config.converged_cos:g}",
                    "converged seeds"],
                   [[v["condition_number"], format_ci(v["ci"]["cos"]), format_ci(v["ci"]["rel_err"]),
                     format_ci(v["steps_to_converge"], 3), f"{v['n_converged']} of {len(v['per_seed'])}"]
                    for v in per.values()]),
             "## Losses: trained model, exact optimum, plain GD", "",
             "Population losses are exact (`iclgd_synth.theory`); sampled ones are on "
             f"{config.eval_tasks} held-out tasks.", "",
             table(["kappa", "optimum G* (population)", "best scalar eta I = plain GD (population)",
                    "GD's shortfall", "trained G (population)", "trained model (sampled)", "G* (sampled)"],
                   [[v["condition_number"], v["loss_star"], v["scalar_gd_loss"], v["scalar_gd_shortfall"],
                     format_ci(v["ci"]["population_loss_of_g"]), format_ci(v["ci"]["sampled_loss"]),
                     v["sampled_optimum_loss"]] for v in per.values()])]
    figures = _figures(out, metrics)
    lines += ["## Figures", ""]
    for name, (file, caption) in figures.items():
        lines += [f"![{name}]({file})", "", f"*{caption}*", ""]
    lines += [f"Total time: {metrics['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _figures(out: Path, metrics: dict[str, Any]) -> dict[str, tuple[str, str]]:
    per = metrics["per_kappa"]
    figs: dict[str, tuple[str, str]] = {}
    for key, label, caption in (("cos", "cos(G, G*)", "Cosine between the trained preconditioner and G*"),
                                ("rel_err", "||G - G*|| / ||G*||", "Relative error of the trained preconditioner"),
                                ("population_loss", "population half-MSE of G", "Exact population loss of the "
                                                                                 "trained preconditioner")):
        series = {}
        for k, v in per.items():
            hist = v["history"]
            if hist:
                series[f"kappa {k}"] = (np.array([h["step"] for h in hist]),
                                        np.array([h[key] for h in hist], np.float64))
        if series:
            name = plotting.curves_with_bands(out / f"{key}.png", series, xlabel="training step", ylabel=label,
                                              logy=key != "cos").name
            figs[key] = (name, f"{caption} over training, per condition number (mean over seeds, band: min to max).")
    arrays = load_arrays(out, "preconditioners")
    mats = {}
    for k in per:
        g_star = arrays.get(f"g_star/kappa{k}")
        first = sorted(a for a in arrays if a.startswith(f"g/kappa{k}/"))
        if g_star is not None and first:
            mats[f"G* (kappa {k})"] = g_star
            mats[f"trained G (kappa {k})"] = arrays[first[0]]
    if mats:
        figs["preconditioners"] = (plotting.weight_heatmaps(out / "preconditioners.png", mats).name,
                                   "G* and the first seed's trained G per condition number.")
    return figs
