"""Train Transformers on the in-context objective and compare them with tuned GD, GD++ and the hand construction.

The reference paper's core analysis ("Transformers learn in-context by gradient descent", sections 3-4): a trained
1-layer linear self-attention model should match one step of tuned GD (same loss, model cos ~ 1, its W_K^T W_Q ~ a
multiple of diag(I, 0) and P W_V nonzero only in the [y, y] entry); deeper trained models beat plain K-step GD and
approach GD++. Every model of a study is trained with the same data and optimiser settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from iclgd_synth import metrics as M
from iclgd_synth import plotting
from iclgd_synth.constructions import gd_params, gdpp_params
from iclgd_synth.learners import GD, GDPlusPlus, LeastSquares, tune_gd, tune_gdpp
from iclgd_synth.model import ModelConfig, TransformerParams
from iclgd_synth.studies.expectations import expectation_table
from iclgd_synth.studies.rundir import finish_run, is_finished, read_json, run_directory, write_json, write_text_atomic
from iclgd_synth.tasks import sample
from iclgd_synth.train import TrainConfig, train
from iclgd_synth.validation import check_int

TUNE_SEED, EVAL_SEED = 1_000_003, 2_000_003


@dataclasses.dataclass(frozen=True)
class GDComparisonStudy:
    """A study: models trained on one task distribution and compared with GD-type learners.

    Attributes:
      name: run-directory prefix and CLI name.
      description: one line for the report and ``iclgd run --list``.
      train: training settings shared by all models (its ``model`` field is replaced by each entry of ``models``);
        its ``eval_batch`` is the number of held-out tasks for all reported losses and metrics (:attr:`eval_tasks`).
      models: (label, ModelConfig) pairs to train.
      baseline_steps: K, the number of GD (and GD++) steps in the baselines. Default 1.
      gdpp: also tune and compare GD++ with K steps. Default False.
      tune_tasks: tasks used to tune the baselines' step sizes (separate from evaluation). Default 10000.
      ood: run the out-of-distribution sweeps. Default True.
      llm_weights: real LLM sources (``"smollm2"``, ``"minilm"`` or paths) whose attention-weight statistics are
        compared with the hand-constructed (D = d + 1) and the first trained model's weights, in a ``weights/``
        sub-folder and a report section; skipped with a note when the optional ``llm`` extra is missing or a
        source cannot be read. Default ().
      llm_max_layers: read only the first this-many layers of each LLM (quick looks, tests); None reads all.
        Default None.

    The metrics recorded over training and the OOD sweeps use ``eval_tasks`` tasks too (one batch shape, so each
    predictor is compiled once).
    """

    name: str
    description: str
    train: TrainConfig
    models: tuple[tuple[str, ModelConfig], ...]
    baseline_steps: int = 1
    gdpp: bool = False
    tune_tasks: int = 10000
    ood: bool = True
    llm_weights: tuple[str, ...] = ()
    llm_max_layers: int | None = None

    def __post_init__(self):
        if self.llm_max_layers is not None:
            check_int("llm_max_layers", self.llm_max_layers, min_value=1)

    @property
    def eval_tasks(self) -> int:
        """Held-out tasks for every reported loss and metric: ``train.eval_batch``."""
        return self.train.eval_batch

    def quick(self) -> "GDComparisonStudy":
        """A CI-sized version: few steps, small batches, few tasks (same code path)."""
        t = self.train.replace(n_steps=min(self.train.n_steps, 300), batch_size=min(self.train.batch_size, 512),
                               chunk_steps=100, checkpoint_every=100, eval_batch=1000)
        return dataclasses.replace(self, train=t, tune_tasks=1000, llm_weights=())

    def config_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "train": self.train.to_dict(),
             "models": [[label, dataclasses.asdict(m)] for label, m in self.models],
             "baseline_steps": self.baseline_steps, "gdpp": self.gdpp, "tune_tasks": self.tune_tasks,
             "eval_tasks": self.eval_tasks, "ood": self.ood, "llm_weights": list(self.llm_weights)}
        if self.llm_max_layers is not None:  # only when set, so the presets keep their run-directory hashes
            d["llm_max_layers"] = self.llm_max_layers
        return d


def _is_plain_lsa(m: ModelConfig) -> bool:
    return m.attention == "linear" and not (m.layer_norm or m.mlp or m.causal or m.include_query or m.normalize)


def run(study: GDComparisonStudy, root: str = "runs", *, force: bool = False, progress: bool = True) -> Path:
    """Run ``study`` into its run directory and return the directory (reused when finished, unless ``force``)."""
    out = run_directory(root, study.name, study.config_dict())
    if is_finished(out) and not force:
        print(f"{study.name}: finished run found in {out} (use --force to recompute)")
        return out
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", study.config_dict())
    t_start = time.perf_counter()
    task, k = study.train.task, study.baseline_steps
    d, n = task.dim, task.n_context
    tune_batch = sample(jax.random.PRNGKey(TUNE_SEED), task, study.tune_tasks)
    eval_batch = sample(jax.random.PRNGKey(EVAL_SEED), task, study.eval_tasks)
    metric_batch = eval_batch

    # Baselines, tuned on their own tasks.
    t0 = time.perf_counter()
    tuned = tune_gd(tune_batch, k)
    tune_seconds = time.perf_counter() - t0
    gd = GD(eta=tuned.eta, steps=k)
    predictors: dict[str, Any] = {f"GD ({k} step{'s' * (k > 1)})": gd}
    hand = gd_params(d, tuned.eta, n_layers=k, n_context=n)
    baselines: dict[str, Any] = {"gd_eta": tuned.eta, "gd_loss": M.loss(gd, eval_batch),
                                 "hand_loss": M.loss(hand, eval_batch), "gd_tune_seconds": tune_seconds,
                                 "least_squares_loss": M.loss(LeastSquares(), eval_batch),
                                 "zero_loss": float(0.5 * np.mean(np.asarray(eval_batch.y_query) ** 2))}
    gdpp = hand_pp = None
    if study.gdpp:
        tpp = tune_gdpp(tune_batch, k)
        gdpp = GDPlusPlus(eta=tpp.params["eta"], gamma=tpp.params["gamma"], steps=k)
        hand_pp = gdpp_params(d, gdpp.eta, gdpp.gamma, n_layers=k, n_context=n)
        predictors[f"GD++ ({k} steps)"] = gdpp
        baselines.update(gdpp_eta=gdpp.eta, gdpp_gamma=gdpp.gamma, gdpp_loss=M.loss(gdpp, eval_batch),
                         hand_gdpp_loss=M.loss(hand_pp, eval_batch))

    results: dict[str, Any] = {}
    trained: dict[str, TransformerParams] = {}
    losses: dict[str, np.ndarray] = {}
    for label, model_cfg in study.models:
        cfg = study.train.replace(model=model_cfg)
        history_path = out / f"history_{label}.jsonl"
        history = _read_history(history_path)

        def on_chunk(step, params_S, _label=label, _hist=history, _path=history_path):
            p0 = jax.tree.map(lambda a: a[0], params_S)
            row = {"step": step, **_training_metrics(p0, gd, gdpp, metric_batch)}
            _hist.append(row)
            with open(_path, "a") as f:
                f.write(json.dumps(row) + "\n")

        result = train(cfg, out / f"ckpt_{label}", progress=progress, on_chunk=on_chunk)
        _truncate_history(history_path, history, cfg.n_steps)
        params = result.seed_params(0)
        trained[label], losses[label] = params, result.losses
        r = _evaluate_model(params, model_cfg, gd, hand, gdpp, eval_batch, d)
        seed_losses = [M.loss(result.seed_params(i), eval_batch) for i in range(len(cfg.seeds))]
        r.update(trained_loss=float(np.mean(seed_losses)), trained_loss_per_seed=seed_losses,
                 train_seconds=result.train_seconds, tasks_per_second=result.tasks_per_second,
                 resumed_from_step=result.resumed_from, final_train_loss=float(np.mean(result.losses[:, -50:])),
                 history=history)
        results[label] = r
        predictors[f"trained {label}"] = params

    ood = {}
    if study.ood:
        ood_predictors = {**predictors, "least squares": LeastSquares()}
        for sweep in M.OOD_SWEEPS:
            ood[sweep] = M.ood_sweep(ood_predictors, task, sweep, n_tasks=study.eval_tasks)

    first = study.models[0][0]
    llm = _llm_comparison(study, trained[first], out / "weights", progress) if study.llm_weights else None
    metrics = {**baselines, **{k_: v for k_, v in results[first].items() if k_ != "history"},
               "models": {lbl: {k_: v for k_, v in r.items() if k_ != "history"} for lbl, r in results.items()},
               "ood": ood, "llm_weights": llm, "total_seconds": time.perf_counter() - t_start}
    figures = _figures(out, study, baselines, results, trained, hand, hand_pp, losses, ood, d, eval_batch)
    return finish_run(out, study.name, _report(study, metrics, results, figures), metrics)


def _llm_comparison(study: GDComparisonStudy, trained: TransformerParams, out: Path, progress: bool) -> dict:
    """Weight statistics of the hand and trained weights against real LLM weights (optional ``llm`` extra).

    Runs after training, so a missing package or file, or a checkpoint it cannot read (bad layout, head count:
    ValueError), is recorded as skipped with the message instead of ending the study.
    """
    try:
        from iclgd_synth.weights.report import weights_report

        d = study.train.task.dim + study.train.task.out_dim
        rep = weights_report(list(study.llm_weights), out, trained, trained_note="this run's trained model",
                             hand=(("gd", d), ("gdpp", d)), max_layers=study.llm_max_layers, progress=progress)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
        return {"skipped": f"{type(e).__name__}: {e}"}
    return {"inside_counts": rep["inside_counts"], "summary_markdown": rep["summary_markdown"],
            "seconds": rep["seconds"], "report": "weights/report.md"}


def _training_metrics(params, gd, gdpp, batch) -> dict[str, float]:
    row = {"loss": M.loss(params, batch), "preds_diff_gd": M.preds_diff(params, gd, batch),
           "model_cos_gd": M.model_cos(params, gd, batch)}
    if gdpp is not None:
        row.update(preds_diff_gdpp=M.preds_diff(params, gdpp, batch), model_cos_gdpp=M.model_cos(params, gdpp, batch))
    return row


def _evaluate_model(params, model_cfg, gd, hand, gdpp, batch, d) -> dict[str, Any]:
    cmp_gd = M.compare(params, gd, batch)
    r: dict[str, Any] = {"preds_diff": cmp_gd["preds_diff"], "model_cos": cmp_gd["model_cos"],
                         "model_diff": cmp_gd["model_diff"]}
    if gdpp is not None:
        c = M.compare(params, gdpp, batch)
        r.update(preds_diff_gdpp=c["preds_diff"], model_cos_gdpp=c["model_cos"], model_diff_gdpp=c["model_diff"])
    if model_cfg.n_layers > 1:
        r["per_layer_losses"] = M.per_layer_losses(params, batch)
    if _is_plain_lsa(model_cfg) and model_cfg.n_heads == 1 and model_cfg.n_layers == 1:
        r.update(M.weight_alignment(params, hand, d))
        r["interpolated_loss"] = M.loss(M.interpolate(params, hand, d), batch)
    return r


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption
            break
    return rows


def _truncate_history(path: Path, history: list[dict], n_steps: int) -> None:
    """Keep one row per step, in order (a resumed run may have recorded steps after its last checkpoint twice)."""
    by_step = {row["step"]: row for row in history if row["step"] <= n_steps}
    history[:] = [by_step[s] for s in sorted(by_step)]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in history))


def _figures(out, study, baselines, results, trained, hand, hand_pp, losses, ood, d, eval_batch
             ) -> dict[str, tuple[str, str]]:
    """Write the PNG figures; returns name -> (file name, caption)."""
    figs: dict[str, tuple[str, str]] = {}
    k = study.baseline_steps
    base = {f"tuned GD, {k} step{'s' * (k > 1)}": baselines["gd_loss"]}
    if "gdpp_loss" in baselines:
        base[f"tuned GD++, {k} steps"] = baselines["gdpp_loss"]
    for label, l in losses.items():
        figs[f"loss_{label}"] = (plotting.loss_curves(out / f"loss_{label}.png", l, base,
                                                      title=f"{study.name}: {label}").name,
                                 f"Training loss of {label} per step (mean over seeds, smoothed) against the tuned "
                                 "baselines' held-out losses.")
        hist = results[label]["history"]
        if hist:
            keys = [c for c in hist[0] if c != "step"]
            figs[f"metrics_{label}"] = (plotting.metrics_over_training(
                out / f"metrics_{label}.png", [h["step"] for h in hist], {c: [h[c] for h in hist] for c in keys},
                title=f"{label} vs tuned GD over training").name,
                f"{label} (first seed) against the tuned baselines over training, on the held-out tasks.")
        params = trained[label]
        layer = params.layers[0]
        if "w_q" in layer and layer["w_q"].shape[0] == 1:
            mats, betas = _rescaled_heatmap_matrices(params, hand, hand_pp, d)
            figs[f"weights_{label}"] = (plotting.weight_heatmaps(
                out / f"weights_{label}.png", mats,
                title="rescaled by beta (mean diagonal of the x-block of W_K^T W_Q): "
                      "W_K^T W_Q / beta, beta P W_V").name,
                f"W_K^T W_Q and P W_V of the trained {label} and of the hand construction, each rescaled by its beta "
                "(the mean diagonal of the x-block of its W_K^T W_Q): W_K^T W_Q / beta and beta P W_V, which leaves "
                "the model unchanged and is what the alignment cosines compare. Trained betas: "
                + ", ".join(betas) + ".")
        if "per_layer_losses" in results[label]:
            curves = {f"trained {label}": results[label]["per_layer_losses"]}
            curves["hand GD construction"] = M.per_layer_losses(hand, eval_batch)
            if hand_pp is not None:
                curves["hand GD++ construction"] = M.per_layer_losses(hand_pp, eval_batch)
            figs[f"layers_{label}"] = (plotting.per_layer_losses(out / f"layers_{label}.png", curves).name,
                                       f"Held-out loss of the read-out after each layer application of {label}, "
                                       "against the hand constructions (after K layers: K steps of GD / GD++).")
    if ood:
        figs["ood"] = (plotting.ood_curves(out / "ood.png", ood).name,
                       "Out-of-distribution losses: inputs scaled, task weights scaled, other input laws (each "
                       "rescaled to the training law's second moment E[x_j^2]), context labels replaced.")
    return figs


def _rescaled_heatmap_matrices(params, hand, hand_pp, d) -> tuple[dict[str, np.ndarray], list[str]]:
    """Trained (each layer) and hand products, rescaled by beta as :func:`metrics.weight_alignment` does.

    A trained layer whose beta is ~0 (or not finite) cannot be rescaled; it is shown raw and labelled so.
    """
    mats: dict[str, np.ndarray] = {}
    betas = []
    for i in range(len(params.layers)):
        kq, pv, beta = M.rescaled_products(params, d, i)
        if np.isfinite(beta) and abs(beta) > 1e-8:
            mats[f"trained L{i + 1} W_K^T W_Q / beta"] = np.asarray(kq)
            mats[f"trained L{i + 1} beta P W_V"] = np.asarray(pv)
            betas.append(f"L{i + 1} {beta:.4g}")
        else:
            kq, pv = M.effective_products(params, i)
            mats[f"trained L{i + 1} W_K^T W_Q (raw)"] = np.asarray(kq)
            mats[f"trained L{i + 1} P W_V (raw)"] = np.asarray(pv)
            betas.append(f"L{i + 1} {beta:.3g} (too small to rescale: shown raw)")
    kq_h, pv_h, _ = M.rescaled_products(hand, d)
    mats["GD construction W_K^T W_Q / beta"] = np.asarray(kq_h)
    mats["GD construction beta P W_V"] = np.asarray(pv_h)
    if hand_pp is not None:
        mats["GD++ construction beta P W_V"] = np.asarray(M.rescaled_products(hand_pp, d)[1])
    return mats, betas


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _report(study: GDComparisonStudy, metrics: dict, results: dict, figures: dict[str, tuple[str, str]]) -> str:
    t = study.train
    k = study.baseline_steps
    lines = [f"# {study.name}", "", study.description, "",
             f"Tasks: d = {t.task.dim}, N = {t.task.n_context}, x ~ {t.task.x_dist} (half-width {t.task.x_range}), "
             f"w ~ N(0, {t.task.w_scale}^2 I), noise {t.task.noise}. Training: {t.n_steps} steps of {t.batch_size} "
             f"tasks, AdamW lr {t.lr}, betas ({t.b1}, {t.b2}), clip {t.clip_norm}, seeds {list(t.seeds)}. "
             f"All losses are half-MSE on the query of {study.eval_tasks} held-out tasks; step sizes were tuned on "
             f"{study.tune_tasks} other tasks.", ""]
    table = expectation_table(study.name, metrics)
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
              f"| zero predictor | {_fmt(metrics['zero_loss'])} | |", "", "## Trained models", ""]
    cols = ["trained_loss", "preds_diff", "model_cos", "model_diff"]
    if "gdpp_loss" in metrics:
        cols += ["preds_diff_gdpp", "model_cos_gdpp"]
    cols += ["kq_cos", "pv_cos", "beta", "interpolated_loss", "train_seconds", "tasks_per_second"]
    cols = [c for c in cols if any(c in r for r in results.values())]
    lines.append(M.metric_table({lbl: r for lbl, r in results.items()}, cols))
    rel = "Loss relative to tuned GD: " + ", ".join(
        f"{lbl} {r['trained_loss'] / metrics['gd_loss']:.3f}" for lbl, r in results.items())
    if "gdpp_loss" in metrics:
        rel += "; relative to tuned GD++: " + ", ".join(
            f"{lbl} {r['trained_loss'] / metrics['gdpp_loss']:.3f}" for lbl, r in results.items())
    lines.append(rel + ".")
    lines.append("")
    for lbl, r in results.items():
        if "per_layer_losses" in r:
            lines.append(f"Per-layer losses of {lbl}: " + ", ".join(f"{v:.4g}" for v in r["per_layer_losses"]))
    if metrics.get("ood"):
        lines += ["", "## Out of distribution", "",
                  f"Losses on {study.eval_tasks} tasks per point. **{M.X_DIST_SWEEP}**: each input law is rescaled "
                  f"(x_scale) so that its per-coordinate second moment E[x_j^2] equals the training law's "
                  f"({M.input_second_moment(t.task):.4g}); the sweep measures the law's shape, not its scale (the "
                  "x_scale sweep does that). The exponential law keeps its nonzero mean.", ""]
        for sweep, sw in metrics["ood"].items():
            rows = {name: {str(v): l for v, l in zip(sw["values"], ls)} for name, ls in sw["losses"].items()}
            lines += [f"**{sweep}**", "", M.metric_table(rows, [str(v) for v in sw["values"]])]
    llm = metrics.get("llm_weights")
    if llm:
        lines += ["", "## Do these weights look like real LLM weights?", ""]
        if "skipped" in llm:
            lines.append(f"Skipped: {llm['skipped']}")
        else:
            limit = (f" Only the first {study.llm_max_layers} layer(s) of each LLM were read."
                     if study.llm_max_layers is not None else "")
            lines += ["Attention-weight statistics of the hand-constructed and trained weights against the layers and "
                      "heads of real LLMs (a value is inside when it lies between the LLM's 1st and 99th percentile). "
                      f"Full tables and figures: [{llm['report']}]({llm['report']}).{limit}", "",
                      llm["summary_markdown"]]
    lines += ["", "## Figures", ""]
    for name, (file, caption) in figures.items():
        lines += [f"![{name}]({file})", "", f"*{caption}*", ""]
    lines += [f"Total time: {metrics['total_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def load_metrics(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "metrics.json")
