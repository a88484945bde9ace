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
from iclgd_synth.critiques.dual import HEADLINE_METRICS, variant_label
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
    head = metrics.get("headline", {}).get("icl_vs_ft", {})
    first = next(iter(head), None)
    if first is not None:
        for comp, ci in head[first]["simaou"].items():
            vals[comp] = ci["mean"]
            errs[comp] = (ci["hi"] - ci["mean"]) if np.isfinite(ci["hi"]) else 0.0
        figs["simaou"] = (plotting.bar_chart(out / "simaou.png", vals, errors=errs,
                                             ylabel="SimAOU (paper: normalised; mean over tasks, seeds)",
                                             title="SimAOU of ICL against fine-tuning and its nulls"),
                          f"SimAOU (normalised attention outputs) of ICL against fine-tuning ({variant_label(first)}), "
                          f"the untrained model under the same protocol and the nulls; error bars: 95% interval over "
                          f"{n_seeds} seed{'s' * (n_seeds != 1)} (none with one seed).")
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
        "**Implementation checks and findings.** Sections 1 and 3.1 are *implementation checks*: they hold by "
        "construction (the dual form is an algebraic rewriting of linear attention; the hand GD layer is built so "
        "that Delta W_ICL is the GD step; the momentum relations (a1), (a2), (b) compare two codings of one formula). "
        "They show the code is right, not that a claim of the paper is true. Sections 2 and 3.2 are *findings*: "
        "measured on trained models, each beside nulls that a competent learner unrelated to fine-tuning would pass, "
        "and the same protocol on an untrained model.", "",
        f"Tasks: d = {task.dim}, N = {task.n_context}, x ~ {task.x_dist} (half-width {task.x_range}), noise "
        f"{task.noise}; {config.eval_tasks} evaluation tasks, {config.tune_tasks} tuning tasks. Models trained for "
        f"{t.n_steps} steps of {t.batch_size} tasks (AdamW lr {t.lr}, clip {t.clip_norm}), same data for all, "
        f"{_seeds_text(metrics)}. Evaluation in float64. Numbers of trained models are means over seeds (counts are "
        "summed over seeds; reconstruction errors are the largest over seeds); 95% intervals over seeds are listed "
        "under \"Means over seeds\".", "",
        "## 1. The dual form (implementation check: true by construction)", "",
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
    lines += _icl_vs_ft_section(metrics, config)
    lines += _momentum_section(config, metrics)
    lines += _ci_section(metrics, n_seeds)
    lines += ["## Figures", ""]
    for file, caption in figures.values():
        lines += [f"![{Path(file).stem}]({file})", "", f"*{caption}*", ""]
    lines += [f"Total time: {metrics['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _headline_table(cell: dict[str, Any], n_seeds: int) -> str:
    """One variant's headline numbers: per metric, FT and each comparator as mean [95% interval], with the paired
    difference FT - comparator over seeds."""
    rows = []
    for metric, words in HEADLINE_METRICS:
        for comp, ci in cell[metric].items():
            diff = ci.get("ft_minus")
            d_txt = ""
            if diff is not None and np.isfinite(diff.get("mean", np.nan)):
                d_txt = (f"{fmt(diff['mean'], 3)} [{fmt(diff['lo'], 3)}, {fmt(diff['hi'], 3)}], p {fmt(diff['p'], 2)}"
                         if n_seeds > 1 else fmt(diff["mean"], 3))
            rows.append([words if comp == "FT" else "", comp, format_ci(ci, 3), d_txt])
    return table(["metric", "ICL against", f"mean [95% CI] ({n_seeds} seed{'s' * (n_seeds != 1)})",
                  "FT minus this, paired over seeds [95% CI], p"], rows)


def _verdicts(cell: dict[str, Any]) -> list[str]:
    """Per metric: the nulls and controls whose interval of FT - null lies above 0 (FT beats them), and those it does
    not beat (measured, from the paired tests)."""
    out = []
    for metric, words in HEADLINE_METRICS:
        beats, ties = [], []
        for comp, ci in cell[metric].items():
            diff = ci.get("ft_minus")
            if comp in ("FT", "ICL improves (all tasks)") or diff is None:
                continue
            (beats if np.isfinite(diff.get("lo", np.nan)) and diff["lo"] > 0 else ties).append(comp)
        out.append(f"- {words}: FT is above {', '.join(beats) or 'none'}; not above {', '.join(ties) or 'none'}.")
    return out


def _lr_text(lr: float, config) -> str:
    """The tuned fine-tuning step size, flagged when it is the largest of the grid (the optimum may lie beyond)."""
    grid = config.lr_grid() if hasattr(config, "lr_grid") else None
    edge = grid is not None and np.isclose(lr, float(np.max(grid)))
    return f"FT lr {fmt(lr)}" + (" (the largest of the tuning grid)" if edge else "")


def _icl_vs_ft_section(metrics: dict[str, Any], config=None) -> list[str]:
    ft = metrics["icl_vs_ft"]
    n_seeds = metrics.get("n_seeds", 1)
    head = metrics.get("headline", {})
    lines = ["## 2. ICL vs fine-tuning (findings)", "",
             f"Model: {ft['model']} (its loss with demonstrations: {fmt(ft['icl_model_loss'])}). Fine-tuning of W_K "
             "and W_V of the zero-shot copy (the query alone), the demonstrations as lone queries, step size tuned on "
             "separate tasks, in two protocols: full-batch GD for 1 or more steps (this testbed's earlier setting), "
             "and the paper's: one SGD step per demonstration, in demonstration order, batch 1, K and V only.", "",
             "Definitions. SimAOU as the paper defines it: the attention outputs h (the query's attention update) "
             "are normalised to unit length first, then cos(h^_ICL - h^_ZSL, h^_FT - h^_ZSL); the unnormalised "
             "cosine is listed beside it. Kendall: per task, ICL's |attention score| against |FT influence| (first-"
             "order change of the zero-shot prediction from a step on demonstration i), and the signed contribution "
             "of each demonstration against the signed influence (per output channel). Rec2FTP: of the tasks where "
             "FT lowers the query's error below zero-shot's, the share where ICL does too.", "",
             "Nulls and controls (FT replaced by): *random direction*, FT's update norm in a random direction; "
             "*other task's FT*, the copy fine-tuned on another task; *other task's ICL*, the model's ICL with "
             "another task's demonstrations (an unrelated improver of a poor zero-shot prediction); *oracle (y_q)*, "
             "an update that sets the read-out to the true label; *ridge* and *GD, 1 step*, explicit learners tuned "
             "on separate tasks, unrelated to the model's weights (update: the zero-shot output with the read-out "
             "set to their prediction; influence: leave-one-out change of their prediction); *shuffled*, FT's "
             "influences permuted within a task; *untrained model*, the whole protocol on an initialised copy; "
             "*selection-corrected expected*, the Rec2FTP that ICL would get if its improvements were independent "
             "of FT's given the zero-shot error (quantile strata of |zero-shot error|). A metric says something "
             "about FT only where FT beats the competent learners and the untrained control, not just the random "
             "direction.", ""]
    if metrics.get("learners"):
        lines += ["Explicit learners (tuned on the tuning tasks): " + "; ".join(
            f"{k}: " + ", ".join(f"{a} {fmt(b)}" for a, b in v.items() if a != "kind")
            for k, v in metrics["learners"].items()) + ".", ""]
    losses = metrics.get("ci", {}).get("icl_model_loss", {}).get("values", [])
    if len(losses) > 1:
        zsl = next(iter(ft["by_steps"].values()))["loss"]["zsl"]
        stuck = [s for s, v in zip(metrics.get("seeds", []), losses) if v > 0.9 * zsl]
        lines += ["Per seed, the model's ICL loss: " + ", ".join(f"seed {s} {fmt(v)}" for s, v in
                                                                 zip(metrics.get("seeds", []), losses))
                  + f" (zero-shot loss {fmt(zsl)}). "
                  + (f"Seed{'s' * (len(stuck) > 1)} {', '.join(map(str, stuck))} stayed near the zero-shot loss "
                     "(the model did not learn in context at this training budget), which widens the intervals "
                     "below; the per-seed values are in metrics.json (`headline`)."
                     if stuck else "Every seed learned in context (ICL loss below 90% of the zero-shot loss)."), ""]
    for st, cell in head.get("icl_vs_ft", {}).items():
        r = ft["by_steps"][st]
        un = metrics.get("icl_vs_ft_untrained", {}).get("by_steps", {}).get(st)
        lines += [f"### {variant_label(st)}", "",
                  f"{_lr_text(r['lr'], config)}; query loss zero-shot {fmt(r['loss']['zsl'])}, FT {fmt(r['loss']['ft'])}"
                  + (f" ({r['n_diverged']['ft']} tasks diverged, left out)" if r["n_diverged"]["ft"] else "")
                  + f", ICL {fmt(r['loss']['icl'])}" + (f"; untrained model: ICL {fmt(un['loss']['icl'])}, FT "
                                                         f"{fmt(un['loss']['ft'])}" if un else "") + ".", "",
                  _headline_table(cell, n_seeds)]
        ye = cell["y_energy_fraction"]
        share = min(ye["icl"]["mean"], ye["ft"]["mean"])
        lines += ["Share of the update's energy in the y entry (unnormalised h - h_ZSL): ICL "
                  f"{format_ci(ye['icl'], 4)}, FT {format_ci(ye['ft'], 4)}. "
                  + ("Nearly all of both changes sits in the one y entry, so the unnormalised SimAOU is close to "
                     "2 P(ICL and FT move the prediction the same way) - 1, a sign test: hence the oracle and the "
                     "explicit learners as nulls, and the vector-output model below."
                     if share > 0.9 else
                     "With one output channel, the closer these shares are to 1, the closer the unnormalised SimAOU "
                     "is to a sign test of the prediction change (2 P(same direction) - 1)."), ""]
        lines += ["Paired verdicts over seeds (FT - null, 95% interval above 0):", ""] + _verdicts(cell) + [""]
    vec = metrics.get("icl_vs_ft_vector")
    if vec:
        lines += [f"### Vector outputs (d_out = {vec['out_dim']})", "",
                  f"Model: {vec['model']}, trained like the others on tasks with {vec['out_dim']} outputs; the same "
                  "protocol and nulls (Kendall per output channel, averaged; Rec2FTP on the error norm).", ""]
        for st, cell in head.get("icl_vs_ft_vector", {}).items():
            ye = cell["y_energy_fraction"]
            lines += [f"#### {variant_label(st)}", "", _headline_table(cell, n_seeds),
                      f"Share of the update's energy in the y entries: ICL {format_ci(ye['icl'], 4)}, FT "
                      f"{format_ci(ye['ft'], 4)}.", "", "Paired verdicts:", ""] + _verdicts(cell) + [""]
    hc = ft["hand_control"]
    lines += ["### Known-answer control (implementation check)", "",
              "The hand GD layer with its adapter fine-tuned by one step of its eta is ICL exactly, so the metrics "
              f"must read 1: SimAOU {fmt(hc['simaou']['mean'])} (over {hc['simaou']['n']} tasks; random direction "
              f"{fmt(hc['nulls']['random direction']['simaou']['mean'])}), Kendall signed "
              f"{fmt(hc['kendall_signed']['mean'])} (shuffled {fmt(hc['nulls']['shuffled']['kendall_signed']['mean'])}"
              f"), Rec2FTP {fmt(hc['rec2ftp']['rec2ftp'])} (of {hc['rec2ftp']['n_ft_improves']}), loss ICL "
              f"{fmt(hc['loss']['icl'])} = loss FT {fmt(hc['loss']['ft'])}.", ""]
    r0 = next(iter(ft["by_steps"].values()))
    ml = metrics.get("simam_delta_multilayer")
    lines += ["### Attention maps: Dai's SimAM before and after fine-tuning, and SimAM_delta", "",
              "The only key that ICL, ZSL and FT share is the query itself (ZSL and FT see the query alone), so the "
              "map is the query's score on itself; with one key a per-task cosine is a sign, so each SimAM is one "
              "cosine across tasks. SimAM before = cos(m_ICL, m_ZSL), after = cos(m_ICL, m_FT): the paper reports "
              "after > before. At layer 1 of any model m_ICL = m_ZSL exactly (the score depends only on the token "
              "entering the layer, (x_q, 0) in both runs), so SimAM before is 1 by construction and fine-tuning can "
              f"only lower it (measured on the 1-layer model: max |m_ICL - m_ZSL| = "
              f"{fmt(r0['max_abs_map_change_icl_vs_zsl'])}; FT changes the score by up to "
              f"{fmt(r0['max_abs_map_change_ft_vs_zsl'])}), and SimAM_delta = cos(m_ICL - m_ZSL, m_FT - m_ZSL) is "
              "undefined. From layer 2 on the earlier layers have changed the query token using the demonstrations "
              "and both are defined.", ""]
    rows = [[variant_label(st), fmt(r["simam"]["before"]), fmt(r["simam"]["after"]),
             fmt(r["simam"]["after_random_direction"])] for st, r in ft["by_steps"].items()]
    lines += ["1-layer model (means over seeds):", "",
              table(["fine-tuning", "SimAM before (ICL vs ZSL)", "SimAM after (ICL vs FT)",
                     "after, random-direction FT"], rows)]
    if ml:
        cis = metrics.get("ci", {}).get("simam_delta_multilayer", {})
        rows = []
        for s, r in ml["by_steps"].items():
            c = cis.get(s, {})
            for layer in range(ml["n_layers"]):
                def ci_of(k, c=c, r=r, layer=layer):
                    return format_ci(c[k][layer], 3) if k in c else fmt(r[k][layer])
                rows.append([variant_label(s), fmt(r["lr"]), f"{fmt(r['ft_query_loss'])} ({r['ft_diverged']})",
                             layer + 1, fmt(r["max_abs_map_change_icl_vs_zsl"][layer]),
                             ci_of("simam_before"), ci_of("simam_after"), fmt(r["simam_after_random_direction"][layer]),
                             ci_of("simam_delta"), fmt(r["simam_delta_random_direction"][layer]), ci_of("simaou"),
                             fmt(r["simaou_random_direction"][layer])])
        lines += [f"Model: {ml['model']}; fine-tuning of W_K, W_V of every layer (standard), step size tuned. "
                  "(SimAOU here is the causal study's unnormalised per-layer SimAOU.) A cosine across tasks is "
                  "dominated by the tasks with the largest scores: where fine-tuning blows up on some test tasks (FT "
                  "query loss far above the zero-shot one), its SimAM and SimAM_delta say nothing.", "",
                  table(["fine-tuning", "FT lr", "FT query loss (tasks diverged)", "layer", "max |m_ICL - m_ZSL|", "SimAM before", "SimAM after",
                         "SimAM after, random dir.", "SimAM_delta", "SimAM_delta random dir.", "SimAOU",
                         "SimAOU random dir."], rows)]
    else:
        lines += ["(No multi-layer model in this run: `multilayer_depth = 0`.)", ""]
    lines += ["Notes:", "",
              "- The zero-shot model here is weak by design (a lone token attending to itself computes a cubic in "
              "x_q), so almost any learner improves on it: Rec2FTP must be read against the selection-corrected "
              "rate and the unrelated improvers, not against ICL's unconditional rate.",
              "- With normalised outputs, a null whose change is large against the zero-shot output shares the "
              "-h^_ZSL component with ICL's change, which can lift its SimAOU above 0; the nulls are measured, not "
              "assumed to be 0.", ""]
    return lines


def _momentum_section(config, metrics: dict[str, Any]) -> list[str]:
    me = metrics["momentum_equivalence"]
    mt = metrics["momentum_training"]
    return ["## 3. Momentum attention", "",
            "**What the paper's momentum attention is.** It adds sum_i beta^(N-i) P W_V e_i to the query's output: "
            "decayed values *without their keys*, a term that does not depend on the query input x_q. Relation (a2) "
            "below shows that with the hand GD weights this is one GD step on an affine model whose bias is fitted "
            "with decayed demonstration weights: a query-independent bias, not momentum (nothing carries a velocity "
            "from one update to the next). The heavy-ball layers (b) are a genuine construction of GD with momentum "
            "(K layers = K heavy-ball steps, equal to MomentumGD), but a different one: extra token channels and an "
            "extra head per output, not the paper's momentum attention. The dual-form variant (a1) re-weights the "
            "demonstrations' meta-gradients (a weighted GD step), which is heavy ball only in the dual view where "
            "every gradient is taken at W0.", "",
            "### 3.1 Implementation checks (true by construction)", "",
            "Each relation compares two codings of the same formula, so it holds by construction and checks the code; "
            "it is not evidence that attention performs momentum GD. "
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
            "### 3.2 Findings: momentum attention trained", "",
            "Trained on the ICL objective with the same data and the same number of steps (test loss per seed in "
            "\"Means over seeds\"):", "",
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
        lines.append(f"- {variant_label(s)}: " + "; ".join(f"{k} {format_ci(v)}" for k, v in c.items()))
    for s, c in ci.get("simam_delta_multilayer", {}).items():
        for k, per_layer in c.items():
            lines.append(f"- {k}, {variant_label(s)}, per layer: "
                         + "; ".join(f"layer {i + 1} {format_ci(v)}" for i, v in enumerate(per_layer)))
    for label, v in ci["momentum_test_loss"].items():
        lines.append(f"- test loss of {label}: {format_ci(v)}")
    return lines + [""]
