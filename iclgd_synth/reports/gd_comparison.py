"""Report and figures of the training studies (:mod:`iclgd_synth.studies.gd_comparison`), from their metrics.

Nothing here trains or samples: :func:`render` reads the metrics dict and the saved arrays of a run directory, writes
the PNG figures there and returns the Markdown report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iclgd_synth import metrics as M
from iclgd_synth import plotting
from iclgd_synth.intervals import format_ci
from iclgd_synth.reports.expectations import expectation_table
from iclgd_synth.reports.tables import table
from iclgd_synth.studies.protocol import load_arrays

OOD_CAPTION = ("Out-of-distribution losses: inputs scaled, task weights scaled, other input laws (each rescaled to "
               "the training law's second moment E[x_j^2]), context labels replaced.")


def render(config, metrics: dict[str, Any], out: Path) -> str:
    figures = _figures(Path(out), config, metrics)
    return _report(config, metrics, figures)


def _figures(out: Path, config, metrics: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Write the PNG figures; returns name -> (file name, caption)."""
    arrays = load_arrays(out, "arrays")
    figs: dict[str, tuple[str, str]] = {}
    k = config.baseline_steps
    name = metrics.get("study", "study")
    base = {f"tuned GD, {k} step{'s' * (k > 1)}": metrics["gd_loss"]}
    if "gdpp_loss" in metrics:
        base[f"tuned GD++, {k} steps"] = metrics["gdpp_loss"]
    for label, r in metrics["models"].items():
        if f"losses/{label}" in arrays:
            figs[f"loss_{label}"] = (plotting.loss_curves(out / f"loss_{label}.png", arrays[f"losses/{label}"], base,
                                                          title=f"{name}: {label}").name,
                                     f"Training loss of {label} per step (mean over seeds, smoothed) against the "
                                     "tuned baselines' held-out losses.")
        hist = r.get("history") or []
        if hist:
            keys = [c for c in hist[0] if c != "step"]
            figs[f"metrics_{label}"] = (plotting.metrics_over_training(
                out / f"metrics_{label}.png", [h["step"] for h in hist], {c: [h[c] for h in hist] for c in keys},
                title=f"{label} vs tuned GD over training").name,
                f"{label} (first seed) against the tuned baselines over training, on the held-out tasks.")
        prefix = f"weights/{label}/"
        mats = {key[len(prefix):]: v for key, v in arrays.items() if key.startswith(prefix)}
        if mats:
            betas = [f"L{key.split('L')[-1]} {float(v):.4g}" for key, v in mats.items() if key.startswith("beta L")]
            mats = {key: v for key, v in mats.items() if not key.startswith("beta L")}
            figs[f"weights_{label}"] = (plotting.weight_heatmaps(
                out / f"weights_{label}.png", mats,
                title="rescaled by beta (mean diagonal of the x-block of W_K^T W_Q): "
                      "W_K^T W_Q / beta, beta P W_V").name,
                f"W_K^T W_Q and P W_V of the trained {label} (first seed) and of the hand construction, each rescaled "
                "by its beta (the mean diagonal of the x-block of its W_K^T W_Q): W_K^T W_Q / beta and beta P W_V, "
                "which leaves the model unchanged and is what the alignment cosines compare; a layer whose beta is "
                "about 0 is shown raw. Trained betas: " + ", ".join(betas) + ".")
        if "per_layer_losses" in r:
            curves = {f"trained {label}": r["per_layer_losses"], **metrics.get("hand_per_layer_losses", {})}
            figs[f"layers_{label}"] = (plotting.per_layer_losses(out / f"layers_{label}.png", curves).name,
                                       f"Held-out loss of the read-out after each layer application of {label}, "
                                       "against the hand constructions (after K layers: K steps of GD / GD++).")
    if metrics.get("ood"):
        figs["ood"] = (plotting.ood_curves(out / "ood.png", metrics["ood"]).name, OOD_CAPTION)
    return figs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _per_layer_text(r: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Implicit weights and input conditioning per layer application (first seed's model if one seed, else means)."""
    k = len(r["layer_cos_gd"])
    gdpp_cond = metrics.get("gdpp_condition_median")
    header = ["layer", "cos GD", "rel. err GD"] + (["cos GD++", "rel. err GD++"] if "layer_cos_gdpp" in r else []) + \
        ["cos LS", "median cond(X^T X), model"] + (["same, tuned GD++"] if gdpp_cond else []) + \
        ["fitted GD++ gamma (R^2)"]
    rows = [["input", "", ""] + (["", ""] if "layer_cos_gdpp" in r else []) + ["", r["layer_condition_median"][0]]
            + ([gdpp_cond[0]] if gdpp_cond else []) + [""]]
    for i in range(k):
        row = [i + 1, r["layer_cos_gd"][i], r["layer_relerr_gd"][i]]
        if "layer_cos_gdpp" in r:
            row += [r["layer_cos_gdpp"][i], r["layer_relerr_gdpp"][i]]
        row += [r["layer_cos_ls"][i], r["layer_condition_median"][i + 1]]
        if gdpp_cond:
            row.append(gdpp_cond[i + 1])
        row.append(f"{r['layer_gdpp_gamma_fit'][i]:.3g} ({r['layer_gdpp_r2'][i]:.2f})")
        rows.append(row)
    return ("The model's implicit weights after each layer application (d y_hat_l / d x_q by autodiff, exact; mean "
            "cosine and relative error over tasks) against the GD and GD++ iterates of the same index and least "
            "squares, and the median condition number of the context inputs' X^T X as the layer leaves them (GD++ "
            "maps each eigenvalue lambda to lambda (1 - gamma lambda)^2). Means over seeds.\n\n" + table(header, rows))


def _exact_section(exact: dict[str, Any] | None) -> list[str]:
    """The population optimum beside the sampled figures (:func:`iclgd_synth.studies.gd_comparison._exact_optimum`)."""
    if not exact:
        return []
    if "skipped" in exact:
        return ["## Exact population optimum", "", f"Not available for this task law: {exact['skipped']}", ""]
    k = exact["steps"]
    lines = ["## Exact population optimum", "",
             f"Exact population half-MSE of {k}-step GD from the task law (`iclgd_synth.theory`), beside the sampled "
             "figures above:", "",
             "| quantity | value |", "|---|---|",
             f"| population-optimal eta* | {exact['eta_star']:.6g} |",
             f"| population loss at eta* | {exact['loss_star']:.6g} |",
             f"| population loss at the eta tuned on separate tasks | {exact['tuned_eta_population_loss']:.6g} "
             f"(excess {exact['tuned_eta_excess']:.3g}) |",
             f"| eta tuned on the evaluation tasks themselves | {exact['eval_tuned_eta']:.6g}: population loss "
             f"{exact['eval_tuned_population_loss']:.6g} (excess {exact['eval_tuned_excess']:.3g}); its sampled loss "
             f"{exact['eval_tuned_sampled_loss']:.6g} is {-exact['eval_tuning_bias']:.3g} below eta*'s on the same "
             f"tasks ({exact['eval_tuned_sampled_loss_at_eta_star']:.6g}): the bias of tuning in-sample |",
             f"| trained model minus the optimum (held-out estimate) | {exact['trained_minus_optimum']:+.4g} "
             f"+- {1.96 * exact['trained_minus_optimum_se']:.2g} (95%, sampling error of the held-out tasks) |"]
    if "preconditioner_loss_star" in exact:
        lines.append(f"| best one-step preconditioned GD, any G (population) | "
                     f"{exact['preconditioner_loss_star']:.6g} |")
    return lines + [""]


def _report(config, metrics: dict, figures: dict[str, tuple[str, str]]) -> str:
    t = config.train
    k = config.baseline_steps
    results = metrics["models"]
    name = metrics.get("study", "study")
    n_seeds = len(t.seeds)
    lines = [f"# {name}", "", metrics.get("description", ""), "",
             f"Tasks: d = {t.task.dim}, N = {t.task.n_context}, x ~ {t.task.x_dist} (half-width {t.task.x_range}), "
             f"w ~ N(0, {t.task.w_scale}^2 I), noise {t.task.noise}. Training: {t.n_steps} steps of {t.batch_size} "
             f"tasks, AdamW lr {t.lr}, betas ({t.b1}, {t.b2}), clip {t.clip_norm}, seeds {list(t.seeds)} "
             f"({n_seeds} seed{'s' * (n_seeds != 1)}). All losses are half-MSE on the query of {config.eval_tasks} "
             f"held-out tasks; step sizes were tuned on {config.tune_tasks} other tasks. Numbers of trained models are "
             "means over seeds with a 95% Student-t interval in brackets (no interval with one seed).", ""]
    table = expectation_table(name, metrics)
    if table:
        lines += ["## Expected (reference paper) vs measured", "",
                  "What the reference paper (*Transformers learn in-context by gradient descent*) leads us to expect, "
                  "what this run measured, and whether it is met. The reference numbers are for the full preset "
                  "(d = N = 10, x ~ U(-0.5, 0.5), the preset's training length): a `--quick` run trains too briefly "
                  "for the trained-model rows. \"tolerance ours\" marks where the paper is qualitative and the "
                  "threshold is this project's reading of it.", "", table]
    lines += ["## Baselines", "",
              "| learner | loss | hyper-parameters |", "|---|---|---|",
              f"| tuned GD, {k} step(s) | {_fmt(metrics['gd_loss'])} | eta = {_fmt(metrics['gd_eta'])} |",
              f"| hand-constructed LSA (GD) | {_fmt(metrics['hand_loss'])} | same eta |"]
    if "gdpp_loss" in metrics:
        lines += [f"| tuned GD++, {k} step(s) | {_fmt(metrics['gdpp_loss'])} | eta = {_fmt(metrics['gdpp_eta'])}, "
                  f"gamma = {_fmt(metrics['gdpp_gamma'])} |",
                  f"| hand-constructed LSA (GD++) | {_fmt(metrics['hand_gdpp_loss'])} | same |"]
    lines += [f"| least squares | {_fmt(metrics['least_squares_loss'])} | |",
              f"| zero predictor | {_fmt(metrics['zero_loss'])} | |", ""]
    lines += _exact_section(metrics.get("exact"))
    lines += ["## Trained models", ""]
    cols = ["trained_loss", "preds_diff", "model_cos", "model_diff"]
    if "gdpp_loss" in metrics:
        cols += ["preds_diff_gdpp", "model_cos_gdpp"]
    cols += ["kq_cos", "pv_cos", "beta", "interpolated_loss", "train_seconds", "tasks_per_second"]
    cols = [c for c in cols if any(c in r for r in results.values())]
    lines.append(M.metric_table({lbl: r for lbl, r in results.items()}, cols))
    lines += ["", "Means over seeds with 95% intervals:", ""]
    for lbl, r in results.items():
        cis = r.get("ci", {})
        lines.append(f"- {lbl}: " + "; ".join(f"{key} {format_ci(ci)}" for key, ci in cis.items()))
    rel = "Loss relative to tuned GD: " + ", ".join(
        f"{lbl} {r['trained_loss'] / metrics['gd_loss']:.3f}" for lbl, r in results.items())
    if "gdpp_loss" in metrics:
        rel += "; relative to tuned GD++: " + ", ".join(
            f"{lbl} {r['trained_loss'] / metrics['gdpp_loss']:.3f}" for lbl, r in results.items())
    lines += ["", rel + ".", ""]
    for lbl, r in results.items():
        if "per_layer_losses" in r:
            lines.append(f"Per-layer losses of {lbl}: " + ", ".join(f"{v:.4g}" for v in r["per_layer_losses"]))
    for lbl, r in results.items():
        if "layer_cos_gd" in r:
            lines += ["", f"### {lbl} layer by layer", "", _per_layer_text(r, metrics), ""]
    if metrics.get("ood"):
        lines += ["", "## Out of distribution", "",
                  f"Losses on {config.eval_tasks} tasks per point. **{M.X_DIST_SWEEP}**: each input law is rescaled "
                  f"(x_scale) so that its per-coordinate second moment E[x_j^2] equals the training law's "
                  f"({metrics['input_second_moment']:.4g}); the sweep measures the law's shape, not its scale (the "
                  "x_scale sweep does that). The exponential law keeps its nonzero mean.", ""]
        for sweep, sw in metrics["ood"].items():
            rows = {pname: {str(v): l for v, l in zip(sw["values"], ls)} for pname, ls in sw["losses"].items()}
            lines += [f"**{sweep}**", "", M.metric_table(rows, [str(v) for v in sw["values"]])]
    llm = metrics.get("llm_weights")
    if llm:
        lines += ["", "## Do these weights look like real LLM weights?", ""]
        if "skipped" in llm:
            lines.append(f"Skipped: {llm['skipped']}")
        else:
            limit = (f" Only the first {config.llm_max_layers} layer(s) of each LLM were read."
                     if config.llm_max_layers is not None else "")
            lines += ["Attention-weight statistics of the hand-constructed and trained weights against the layers and "
                      "heads of real LLMs (a value is inside when it lies between the LLM's 1st and 99th percentile). "
                      f"Full tables and figures: [{llm['report']}]({llm['report']}).{limit}", "",
                      llm["summary_markdown"]]
    lines += ["", "## Figures", ""]
    for fname, (file, caption) in figures.items():
        lines += [f"![{fname}]({file})", "", f"*{caption}*", ""]
    lines += [f"Total time: {metrics['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)
