"""Report and figures of the ``dual`` study (:mod:`iclgd_synth.studies.dual`), from its metrics.

Nothing here trains or samples: :func:`render` reads the metrics dict and the arrays saved in the run directory,
writes the PNG figures there and returns the Markdown report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iclgd_synth import plotting
from iclgd_synth.intervals import format_ci
from iclgd_synth.reports.tables import fmt, table
from iclgd_synth.studies.protocol import load_arrays


def render(config, metrics: dict[str, Any], out: Path) -> str:
    figures = _figures(Path(out), metrics)
    return _report(config, metrics, figures)


def _figures(out: Path, metrics: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Write the PNG figures; returns name -> (file name, caption)."""
    arrays = load_arrays(out, "arrays")
    n_seeds = metrics.get("n_seeds", 1)
    figs: dict[str, tuple[str, str]] = {}
    mats = {key[len("dual_form/"):]: v for key, v in arrays.items() if key.startswith("dual_form/")}
    if mats:
        figs["dual_form"] = (plotting.weight_heatmaps(
            out / "dual_form.png", mats, title="Dual form at the query (rows: updated channel, columns: query "
                                               "channel; last row/column = y)").name,
            "Delta W_ICL of the hand GD layer beside eta * grad L(W0) in its (y, x) block, the trained LSA's Delta "
            "W_ICL and the query-as-key LSA's W_ZSL, on evaluation task 0 (trained models: first seed).")
    models = metrics["momentum_training"]["models"]
    curves = {label: np.asarray(arrays[f"losses/{label}"]).mean(axis=0) for label in models
              if f"losses/{label}" in arrays}
    if curves:
        figs["momentum_training"] = (plotting.model_loss_curves(
            out / "momentum_training.png", curves, title="Vanilla vs momentum attention, same data and steps",
            baselines={"tuned GD, 1 step": metrics["momentum_training"]["hand"]["hand GD (1 step)"]}),
            f"Training loss per step (mean over {n_seeds} seed{'s' * (n_seeds != 1)}, smoothed) of every trained "
            "model against one step of tuned GD (held-out loss).")
    vals, errs = {}, {}
    cis = metrics.get("ci", {}).get("icl_vs_ft", {})
    for s, r in metrics["icl_vs_ft"]["by_steps"].items():
        for key, lab in (("simaou", "FT"), ("simaou_random_direction", "random dir."),
                         ("simaou_other_task_ft", "other task's FT")):
            name = f"{lab}, {s} step{'s' * (int(s) > 1)}"
            vals[name] = r[key]["mean"]
            ci = cis.get(s, {}).get(key)
            errs[name] = (ci["hi"] - ci["mean"]) if n_seeds > 1 and ci and np.isfinite(ci["hi"]) else r[key]["sem"]
    spread = ("95% interval over seeds" if n_seeds > 1 else "standard error over tasks")
    figs["simaou"] = (plotting.bar_chart(out / "simaou.png", vals, errors=errs, ylabel="SimAOU (mean over tasks" + (", seeds)" if n_seeds > 1 else ")"),
                                         title="SimAOU of ICL against fine-tuning and its baselines"),
                      f"SimAOU of ICL against fine-tuning, a random direction of the same norm and another task's "
                      f"fine-tuned copy; error bars: {spread}.")
    return figs


def _seeds_text(metrics: dict[str, Any]) -> str:
    n = metrics.get("n_seeds", 1)
    return f"seeds {metrics.get('seeds', [])} ({n} seed{'s' * (n != 1)})"


def _report(config, metrics: dict[str, Any], figures: dict[str, tuple[str, str]]) -> str:
    t = config.train
    task = t.task
    n_seeds = metrics.get("n_seeds", 1)
    dfm = metrics["dual_form"]
    lines = [
        "# The dual form of attention, ICL vs fine-tuning, and momentum attention", "",
        "Claims tested (\"Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as "
        "Meta-Optimizers\"): linear attention over demonstrations is a zero-shot model plus implicit weights "
        "Delta W_ICL built like a gradient update (the dual form); ICL behaves like fine-tuning (SimAOU, attention "
        "maps, Kendall, Rec2FTP); momentum attention is the analogue of GD with momentum.", "",
        f"Tasks: d = {task.dim}, N = {task.n_context}, x ~ {task.x_dist} (half-width {task.x_range}), noise "
        f"{task.noise}; {config.eval_tasks} evaluation tasks, {config.tune_tasks} tuning tasks. Models trained for "
        f"{t.n_steps} steps of {t.batch_size} tasks (AdamW lr {t.lr}, clip {t.clip_norm}), same data for all, "
        f"{_seeds_text(metrics)}. Evaluation in float64. Numbers of trained models are means over seeds (counts are "
        "summed over seeds; reconstruction errors are the largest over seeds); 95% intervals over seeds are listed "
        "under \"Means over seeds\".", "",
        "## 1. The dual form", "",
        "Definition (module `iclgd_synth.dual_form`): the query's attention update = (W_ZSL + Delta W_ICL) e_q + b, "
        "Delta W_ICL = sum_h P_h W_V,h (sum over demonstrations of c_i e_i e_i^T) W_K,h^T W_Q,h, W_ZSL the query's "
        "own term when the query is a key, b the momentum-values term.", "",
        table(["check", "measured"], [
            ["hand GD layer: max |Delta W_ICL[y, x] - eta grad L(W0)| (float64)", dfm["hand_block_vs_meta_gradient"]],
            ["hand GD layer: max |entry outside that block|", dfm["hand_off_block_max"]],
            ["scale of eta grad L(W0) (max |entry|)", dfm["meta_gradient_scale"]],
        ] + [[f"{k}: max relative error of (W_ZSL + Delta W_ICL) e_q + b vs the layer's output", v]
             for k, v in dfm["relative_reconstruction_error"].items()]),
        "For the hand construction Delta W_ICL is exactly eta times the in-context loss gradient at W0 in the "
        "(y, x) block (the read-out is minus the y-entry, so the prediction is the GD step's), zero elsewhere.", "",
    ]
    ex = metrics["dual_form_export"]
    lines += ["### Exported dual form", "",
              f"`{ex['file']}` (NumPy archive) holds, for {ex['n_tasks']} evaluation tasks (`tasks/x`, `tasks/y`, "
              "`tasks/x_query`, `tasks/y_query`), per model `model{i}` (label in `model{i}/label`; trained models of "
              f"seed {ex.get('seed', 0)}) and layer application l = 1..K: `model{{i}}/layer{{l}}/w_zsl` and "
              "`.../delta_w_icl` (B, D, D, acting on the query token), `.../query` (B, D, the query token entering "
              "the layer: the one they act on), `.../bias`, the per-head form (`w_zsl_heads`, `delta_w_icl_heads`, "
              "`q_heads`) and `.../query_update`, the layer's own change of the query from the forward pass, so that "
              "(w_zsl + delta_w_icl) @ query + bias = query_update can be checked from the file:", "",
              table(["model", "key", "layers", "max relative error of the reconstruction"],
                    [[label, v["key"], v["layers"], v["max_relative_error"]] for label, v in ex["models"].items()])]
    lines += _icl_vs_ft_section(metrics)
    lines += _momentum_section(config, metrics)
    lines += _ci_section(metrics, n_seeds)
    lines += ["## Figures", ""]
    for file, caption in figures.values():
        lines += [f"![{Path(file).stem}]({file})", "", f"*{caption}*", ""]
    lines += [f"Total time: {metrics['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _icl_vs_ft_section(metrics: dict[str, Any]) -> list[str]:
    ft = metrics["icl_vs_ft"]
    lines = ["## 2. ICL vs fine-tuning", "",
             f"Model: {ft['model']} (its loss with demonstrations: {fmt(ft['icl_model_loss'])}). Fine-tuning: "
             "full-batch GD on W_K and W_V of the zero-shot copy, the demonstrations as lone queries; step size "
             "tuned on separate tasks. Counts (diverged, of n) are over tasks and seeds.", ""]
    rows = []
    for s, r in ft["by_steps"].items():
        ft_loss = fmt(r["loss"]["ft"]) + (f" ({r['n_diverged']['ft']} diverged, left out)"
                                          if r["n_diverged"]["ft"] else "")
        rows.append([s, r["lr"], r["loss"]["zsl"], ft_loss, r["loss"]["icl"],
                     f"{fmt(r['simaou']['mean'])} ± {fmt(r['simaou']['sem'], 2)}",
                     fmt(r["simaou_random_direction"]["mean"]), fmt(r["simaou_other_task_ft"]["mean"]),
                     f"{fmt(r['kendall_abs']['mean'])} (shuffled {fmt(r['kendall_abs_shuffled']['mean'])})",
                     f"{fmt(r['kendall_signed']['mean'])} (shuffled {fmt(r['kendall_signed_shuffled']['mean'])})",
                     f"{fmt(r['rec2ftp']['rec2ftp'])} (of {r['rec2ftp']['n_ft_improves']})",
                     fmt(r["rec2ftp"]["icl_improves_rate"]), fmt(r["rec2ftp_random_direction"]["rec2ftp"])])
    lines += [table(["FT steps", "FT lr", "loss ZSL", "loss FT", "loss ICL", "SimAOU (± s.e. over tasks)",
                     "SimAOU random dir.", "SimAOU other task's FT", "Kendall |score| vs |influence|",
                     "Kendall signed", "Rec2FTP", "ICL improves (all tasks)", "Rec2FTP random-dir. FT"], rows)]
    hc = ft["hand_control"]
    lines += ["Known-answer control (hand GD layer, adapter fine-tuned by one step of its eta, which is ICL exactly): "
              f"SimAOU {fmt(hc['simaou']['mean'])} (over {hc['simaou']['n']} tasks; random direction "
              f"{fmt(hc['simaou_random_direction']['mean'])}), Kendall signed {fmt(hc['kendall_signed']['mean'])} "
              f"(shuffled {fmt(hc['kendall_signed_shuffled']['mean'])}), Rec2FTP {fmt(hc['rec2ftp']['rec2ftp'])} "
              f"(of {hc['rec2ftp']['n_ft_improves']}), loss ICL {fmt(hc['loss']['icl'])} = loss FT "
              f"{fmt(hc['loss']['ft'])}. Expected: 1, 1, 1 and equal losses.", ""]
    r0 = next(iter(ft["by_steps"].values()))
    ml = metrics.get("simam_delta_multilayer")
    lines += ["### SimAM_delta", "",
              "SimAM_delta = cos(m_ICL - m_ZSL, m_FT - m_ZSL) on the query's score on itself, the only key ICL, ZSL "
              "and FT share. At layer 1 of any model it is undefined: the score depends only on the token entering "
              "the layer, which is (x_q, 0) with and without demonstrations, so m_ICL - m_ZSL = 0 (measured on the "
              f"1-layer model: max |m_ICL - m_ZSL| = {fmt(r0['max_abs_map_change_icl_vs_zsl'])}, while FT changes "
              f"the score by up to {fmt(r0['max_abs_map_change_ft_vs_zsl'])}). A 1-layer model therefore has no "
              "SimAM_delta. From layer 2 on, the demonstrations have changed the query token through the earlier "
              "layers, and SimAM_delta is defined; it is one cosine across tasks of the scalar changes (a per-task "
              "cosine of scalars is only a sign).", ""]
    if ml:
        rows = []
        for s, r in ml["by_steps"].items():
            for layer in range(ml["n_layers"]):
                rows.append([s, r["lr"], layer + 1, r["max_abs_map_change_icl_vs_zsl"][layer],
                             r["simam_delta"][layer], r["simam_delta_random_direction"][layer], r["simaou"][layer],
                             r["simaou_random_direction"][layer]])
        lines += [f"Model: {ml['model']}; fine-tuning of W_K, W_V of every layer (standard), step size tuned.", "",
                  table(["FT steps", "FT lr", "layer", "max |m_ICL - m_ZSL|", "SimAM_delta",
                         "SimAM_delta random dir.", "SimAOU", "SimAOU random dir."], rows)]
    else:
        lines += ["(No multi-layer model in this run: `multilayer_depth = 0`.)", ""]
    lines += ["Notes:", "",
              "- The zero-shot model here is weak by design (a lone token attending to itself computes a cubic in "
              "x_q); fine-tuning W_K, W_V of that copy is the testbed's version of the paper's fine-tuning. "
              "Rec2FTP must be read against ICL's unconditional improvement rate.",
              "- Kendall's tau compares ICL's linear attention scores (which can be negative; hence |score|) with "
              "first-order per-demonstration influences of FT; the shuffled baseline is ~0 by construction.", ""]
    return lines


def _momentum_section(config, metrics: dict[str, Any]) -> list[str]:
    me = metrics["momentum_equivalence"]
    mt = metrics["momentum_training"]
    return ["## 3. Momentum attention", "",
            "Exact relations (module `iclgd_synth.critiques.momentum`; conditions in its docstring), max abs error "
            f"over random sizes (per seed: {config.equivalence_trials}) in float64 (prediction scale up to "
            f"{fmt(me['scale'])}):", "",
            table(["relation", "max abs error"], [
                ["(a1) dual momentum attention = one GD step with demonstration weights 1 + beta + ... + "
                 "beta^(N-i)", me["a1_weighted_gd"]],
                ["(a1) = heavy ball over the demonstrations with gradients at W0 (+ a momentum-only query step)",
                 me["a1_heavy_ball_at_w0"]],
                ["(a2) the paper's momentum attention = GD step on (W, b), the bias weighting demo i by "
                 "beta^(N-i)", me["a2_affine_gd"]],
            ] + [[f"(b) {k} heavy-ball layers = MomentumGD, {k} step{'s' * (int(k) > 1)}", v]
                 for k, v in me["b_heavy_ball_layers"].items()]),
            f"Demonstration weights of dual momentum at beta = {config.beta} (first to last): "
            + ", ".join(f"{w:.3g}" for w in mt["dual_weights"]) + ".", "",
            "Trained on the ICL objective with the same data and the same number of steps:", "",
            table(["model", "final training loss (last 50 steps)", "test loss", "train seconds (all seeds)"],
                  [[k, v["final_train_loss"], v["test_loss"], v["train_seconds"]] for k, v in mt["models"].items()]),
            "Hand-constructed references:", "",
            table(["model", "test loss"], [[k, v] for k, v in mt["hand"].items()]),
            "The paper's momentum term adds decayed values whatever the query, a bias that does not depend on x_q: "
            "on zero-mean regression tasks it can only add error unless the model learns values that cancel it. "
            "The dual-form momentum re-weights demonstrations (earlier ones more), which full-batch GD has no "
            "reason to want for exchangeable demonstrations.", ""]


def _ci_section(metrics: dict[str, Any], n_seeds: int) -> list[str]:
    ci = metrics.get("ci")
    if not ci:
        return []
    lines = ["## Means over seeds", "",
             f"Headline numbers as means over {n_seeds} seed{'s' * (n_seeds != 1)} with a 95% Student-t interval "
             "(no interval with one seed); SimAOU and Kendall are each seed's mean over tasks.", "",
             f"- ICL model loss: {format_ci(ci['icl_model_loss'])}"]
    for s, c in ci["icl_vs_ft"].items():
        lines.append(f"- {s} FT step{'s' * (int(s) > 1)}: " + "; ".join(f"{k} {format_ci(v)}" for k, v in c.items()))
    for s, c in ci.get("simam_delta_multilayer", {}).items():
        for k, per_layer in c.items():
            lines.append(f"- {k}, {s} FT step{'s' * (int(s) > 1)}, per layer: "
                         + "; ".join(f"layer {i + 1} {format_ci(v)}" for i, v in enumerate(per_layer)))
    for label, v in ci["momentum_test_loss"].items():
        lines.append(f"- test loss of {label}: {format_ci(v)}")
    return lines + [""]
