"""Train Transformers on the in-context objective and compare them with tuned GD, GD++ and the hand construction.

The reference paper's core analysis ("Transformers learn in-context by gradient descent", sections 3-4): a trained
1-layer linear self-attention model should match one step of tuned GD (same loss, model cos ~ 1, its W_K^T W_Q ~ a
multiple of diag(I, 0) and P W_V nonzero only in the [y, y] entry); deeper trained models beat plain K-step GD and
approach GD++. Every model of a study is trained with the same data and optimiser settings, for every seed of
``train.seeds`` (vmapped); headline numbers are means over seeds with 95% intervals (``ci``).

Science only: :func:`compute` returns the metrics and saves the arrays the figures need; the report and figures are
rendered by :mod:`iclgd_synth.reports.gd_comparison`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from iclgd_synth import metrics as M
from iclgd_synth.background import Jobs
from iclgd_synth.constructions import gd_params, gdpp_params
from iclgd_synth.intervals import mean_ci
from iclgd_synth.learners import GD, GDPlusPlus, LeastSquares, tune_gd, tune_gdpp
from iclgd_synth.model import ModelConfig, TransformerParams
from iclgd_synth.studies.protocol import History, Run, Study
from iclgd_synth.tasks import TASK_PRESETS, sample
from iclgd_synth.train import TrainConfig, train
from iclgd_synth.validation import check_int

TUNE_SEED, EVAL_SEED = 1_000_003, 2_000_003
#: Scalar per-model metrics reported as a mean over seeds with a 95% interval.
#: Held-out tasks used for the per-layer mechanics of multi-layer models (autodiff per layer, spectra per task).
PER_LAYER_TASKS = 1000
SEED_METRICS = ("trained_loss", "preds_diff", "model_cos", "model_diff", "preds_diff_gdpp", "model_cos_gdpp",
                "model_diff_gdpp", "kq_cos", "pv_cos", "beta", "interpolated_loss")


@dataclasses.dataclass(frozen=True)
class GDComparisonConfig:
    """Models trained on one task distribution and compared with GD-type learners.

    Attributes:
      train: training settings; ``train.model`` is the main model, trained for every seed in ``train.seeds``.
      model_label: name of the main model in metrics and figures. Default "lsa".
      extra_models: further (label, ModelConfig) pairs trained with the same settings (e.g. a 2-head variant).
        Default ().
      baseline_steps: K, the number of GD (and GD++) steps in the baselines. Default 1.
      gdpp: also tune and compare GD++ with K steps. Default False.
      tune_tasks: tasks used to tune the baselines' step sizes (separate from evaluation). Default 10000.
      eval_tasks: held-out tasks for every reported loss and metric, the metrics over training and the OOD sweeps.
        Default 10000.
      ood: run the out-of-distribution sweeps. Default True.
      llm_weights: real LLM sources (``"smollm2"``, ``"minilm"`` or paths) whose attention-weight statistics are
        compared with the hand-constructed (D = d + 1) and the first seed's trained weights, in a ``weights/``
        sub-folder and a report section; skipped with a note when the optional ``llm`` extra is missing or a source
        cannot be read. Default ().
      llm_max_layers: read only the first this-many layers of each LLM; None reads all. Default None.
    """

    train: TrainConfig = TrainConfig()
    model_label: str = "lsa"
    extra_models: tuple[tuple[str, ModelConfig], ...] = ()
    baseline_steps: int = 1
    gdpp: bool = False
    tune_tasks: int = 10000
    eval_tasks: int = 10000
    ood: bool = True
    llm_weights: tuple[str, ...] = ()
    llm_max_layers: int | None = dataclasses.field(default=None)

    def __post_init__(self):
        check_int("baseline_steps", self.baseline_steps, min_value=1)
        check_int("tune_tasks", self.tune_tasks, min_value=1)
        check_int("eval_tasks", self.eval_tasks, min_value=1)
        if self.llm_max_layers is not None:
            check_int("llm_max_layers", self.llm_max_layers, min_value=1)
        object.__setattr__(self, "llm_weights", tuple(self.llm_weights))

    @property
    def models(self) -> tuple[tuple[str, ModelConfig], ...]:
        return ((self.model_label, self.train.model),) + tuple(self.extra_models)

    def replace(self, **changes) -> "GDComparisonConfig":
        return dataclasses.replace(self, **changes)

    def quick(self) -> "GDComparisonConfig":
        """A CI-sized version: few steps, small batches, few tasks (same code path)."""
        t = self.train.replace(n_steps=min(self.train.n_steps, 300), batch_size=min(self.train.batch_size, 512),
                               chunk_steps=100, checkpoint_every=100)
        return dataclasses.replace(self, train=t, tune_tasks=1000, eval_tasks=1000, llm_weights=())


def _is_plain_lsa(m: ModelConfig) -> bool:
    return m.attention == "linear" and not (m.layer_norm or m.mlp or m.causal or m.include_query or m.normalize)


def compute(config: GDComparisonConfig, run: Run) -> dict[str, Any]:
    """Tune the baselines, train every model for every seed, evaluate; returns the metrics (see the report)."""
    out = run.dir
    # The weight comparison's figures are drawn by a worker process (when the command line allows one; see
    # iclgd_synth.background), started now so that its imports overlap training.
    jobs = Jobs(preload=("iclgd_synth.weights.figures",) if config.llm_weights else ())
    task, k = config.train.task, config.baseline_steps
    d, n = task.dim, task.n_context
    tune_batch = sample(jax.random.PRNGKey(TUNE_SEED), task, config.tune_tasks)
    eval_batch = sample(jax.random.PRNGKey(EVAL_SEED), task, config.eval_tasks)

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
    if config.gdpp:
        tpp = tune_gdpp(tune_batch, k)
        gdpp = GDPlusPlus(eta=tpp.params["eta"], gamma=tpp.params["gamma"], steps=k)
        hand_pp = gdpp_params(d, gdpp.eta, gdpp.gamma, n_layers=k, n_context=n)
        predictors[f"GD++ ({k} steps)"] = gdpp
        baselines.update(gdpp_eta=gdpp.eta, gdpp_gamma=gdpp.gamma, gdpp_loss=M.loss(gdpp, eval_batch),
                         hand_gdpp_loss=M.loss(hand_pp, eval_batch))
    hand_layers = {"hand GD construction": M.per_layer_losses(hand, eval_batch)} if k > 1 else {}
    if gdpp is not None:
        from iclgd_synth import implicit_weights as IW

        x = np.asarray(eval_batch.x[:PER_LAYER_TASKS], np.float64)
        baselines["gdpp_condition_median"] = [float(v) for v in np.median(
            IW.gdpp_conditioning(x, np.full(k, gdpp.gamma)), axis=1)]
    if k > 1 and hand_pp is not None:
        hand_layers["hand GD++ construction"] = M.per_layer_losses(hand_pp, eval_batch)

    results: dict[str, Any] = {}
    results_params: dict[str, list] = {}
    arrays: dict[str, np.ndarray] = {}
    first_params: dict[str, TransformerParams] = {}
    for label, model_cfg in config.models:
        cfg = config.train.replace(model=model_cfg)
        history = History(out / f"history_{label}.jsonl")

        def on_chunk(step, params_S, _hist=history):
            p0 = jax.tree.map(lambda a: a[0], params_S)
            _hist.append({"step": step, **_training_metrics(p0, gd, gdpp, eval_batch)})

        result = train(cfg, out / f"ckpt_{label}", progress=run.progress, on_chunk=on_chunk)
        history = history.finish(cfg.n_steps)
        per_seed = [_evaluate_model(result.seed_params(i), model_cfg, gd, hand, gdpp, eval_batch, d)
                    for i in range(len(cfg.seeds))]
        r = _mean_over_seeds(per_seed)
        r.update(trained_loss_per_seed=[s["trained_loss"] for s in per_seed], seeds=list(cfg.seeds),
                 train_seconds=result.train_seconds, tasks_per_second=result.tasks_per_second,
                 resumed_from_step=result.resumed_from, final_train_loss=float(np.mean(result.losses[:, -50:])),
                 history=history)
        r["ci"] = {key: mean_ci([s[key] for s in per_seed]) for key in SEED_METRICS if key in per_seed[0]}
        results[label] = r
        params = result.seed_params(0)
        results_params[label] = [result.seed_params(i) for i in range(len(cfg.seeds))]
        first_params[label] = params
        predictors[f"trained {label}"] = params
        arrays[f"losses/{label}"] = np.asarray(result.losses)
        arrays.update(_heatmap_arrays(label, params, hand, hand_pp, d))
    run.save_arrays("arrays", **arrays)

    first = config.models[0][0]
    # Before the out-of-distribution sweeps, so that the worker draws its figures while they run.
    llm = (_llm_comparison(config, first_params[first], out / "weights", run.progress, jobs)
           if config.llm_weights else None)
    ood = {}
    if config.ood:
        ood_predictors = {**predictors, "least squares": LeastSquares()}
        for sweep in M.OOD_SWEEPS:
            ood[sweep] = M.ood_sweep(ood_predictors, task, sweep, n_tasks=config.eval_tasks)
    exact = _exact_optimum(config, tuned.eta, eval_batch, first_result_params=results_params[first])
    jobs.wait()
    return {**baselines, **{k_: v for k_, v in results[first].items() if k_ != "history"},
            "models": results, "hand_per_layer_losses": hand_layers, "ood": ood, "llm_weights": llm, "exact": exact,
            "input_second_moment": M.input_second_moment(task)}


def _exact_optimum(config: GDComparisonConfig, tuned_eta: float, eval_batch, *, first_result_params: list
                   ) -> dict[str, Any]:
    """The population optimum of K-step GD for the task law (exact where :mod:`iclgd_synth.theory` has a closed form)
    beside the sampled figures: the trained model's loss relative to it (with the sampling error of the estimate),
    the population excess of the step size tuned on separate tasks, and what tuning on the evaluation sample itself
    does: its population excess, and how far it lowers the sampled loss below eta*'s on the same tasks (a bias)."""
    from iclgd_synth import theory

    task, k = config.train.task, config.baseline_steps
    try:
        eta_star, loss_star = theory.optimal_eta(task, k), theory.optimal_gd_loss(task, k)
    except ValueError as e:
        return {"skipped": str(e)}
    out: dict[str, Any] = {"steps": k, "eta_star": eta_star, "loss_star": loss_star,
                           "tuned_eta_population_loss": float(theory.gd_population_loss(task, tuned_eta, k))}
    out["tuned_eta_excess"] = out["tuned_eta_population_loss"] - loss_star
    in_sample = tune_gd(eval_batch, k)
    out.update(eval_tuned_eta=in_sample.eta, eval_tuned_sampled_loss=in_sample.loss,
               eval_tuned_population_loss=float(theory.gd_population_loss(task, in_sample.eta, k)))
    out["eval_tuned_excess"] = out["eval_tuned_population_loss"] - loss_star
    # Tuning on the evaluation tasks lowers their sampled loss below what eta* gets on the same tasks (<= 0).
    out["eval_tuned_sampled_loss_at_eta_star"] = M.loss(GD(eta=eta_star, steps=k), eval_batch)
    out["eval_tuning_bias"] = in_sample.loss - out["eval_tuned_sampled_loss_at_eta_star"]
    if k == 1:
        out["preconditioner_loss_star"] = theory.optimal_preconditioner_loss(task)
    y = np.asarray(eval_batch.y_query, np.float64)
    per_task_SxB = np.stack([0.5 * (np.asarray(p(eval_batch), np.float64) - y) ** 2 for p in first_result_params])
    gaps = per_task_SxB.mean(axis=1) - loss_star
    # Sampling error of the held-out estimate: from the per-task losses (averaged over seeds, which share the tasks).
    pooled = per_task_SxB.mean(axis=0)
    out["trained_minus_optimum"] = float(gaps.mean())
    out["trained_minus_optimum_se"] = float(pooled.std(ddof=1) / np.sqrt(pooled.size))
    out["trained_minus_optimum_ci"] = mean_ci(gaps)
    return out


def _mean_over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Scalars averaged over seeds, per-layer loss lists averaged element-wise (one seed: the value itself)."""
    out: dict[str, Any] = {}
    for key, v in per_seed[0].items():
        vals = [s[key] for s in per_seed]
        out[key] = (vals[0] if len(vals) == 1 else
                    [float(x) for x in np.mean(np.asarray(vals, np.float64), axis=0)] if isinstance(v, list) else
                    float(np.mean(vals)))
    return out


def _llm_comparison(config: GDComparisonConfig, trained: TransformerParams, out: Path, progress: bool,
                    jobs: Jobs | None = None) -> dict:
    """Weight statistics of the hand and trained weights against real LLM weights (optional ``llm`` extra).

    Runs after training, so a missing package or file, or a checkpoint it cannot read (bad layout, head count:
    ValueError), is recorded as skipped with the message instead of ending the study. The figures are drawn by
    ``jobs`` (None: here, before returning).
    """
    try:
        from iclgd_synth.weights.report import weights_report

        d = config.train.task.dim + config.train.task.out_dim
        rep = weights_report(list(config.llm_weights), out, trained, trained_note="this run's trained model",
                             hand=(("gd", d), ("gdpp", d)), max_layers=config.llm_max_layers, progress=progress,
                             jobs=jobs)
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
                         "model_diff": cmp_gd["model_diff"], "trained_loss": M.loss(params, batch)}
    if gdpp is not None:
        c = M.compare(params, gdpp, batch)
        r.update(preds_diff_gdpp=c["preds_diff"], model_cos_gdpp=c["model_cos"], model_diff_gdpp=c["model_diff"])
    if model_cfg.n_layers > 1:
        r["per_layer_losses"] = M.per_layer_losses(params, batch)
        if _is_plain_lsa(model_cfg) and model_cfg.layout == "concat":
            r.update(_per_layer_mechanics(params, gd, gdpp, batch.slice(0, min(batch.batch_size, PER_LAYER_TASKS))))
    if _is_plain_lsa(model_cfg) and model_cfg.n_heads == 1 and model_cfg.n_layers == 1:
        r.update(M.weight_alignment(params, hand, d))
        r["interpolated_loss"] = M.loss(M.interpolate(params, hand, d), batch)
    return r


def _per_layer_mechanics(params, gd, gdpp, batch) -> dict[str, list[float]]:
    """Per layer application: the model's implicit weights (d y_hat_l / d x_q, by autodiff) against the GD and GD++
    iterates and least squares, and what the layer does to the conditioning of its context inputs (median condition
    number of X_l^T X_l; the GD++ form X <- X - gamma X X^T X fitted to the update, with the fraction it explains)."""
    from iclgd_synth import implicit_weights as IW

    cmp = IW.compare_layers(params, batch, eta=gd.eta, gamma=None if gdpp is None else gdpp.gamma)
    out = {f"layer_{key}": [float(v) for v in vals] for key, vals in cmp.items() if key != "norm_ls"}
    out["layer_condition_median"] = [float(v) for v in np.median(IW.token_conditioning(params, batch), axis=1)]
    fit = IW.fit_gdpp_gammas(params, batch)
    out.update(layer_gdpp_gamma_fit=[float(v) for v in fit["gamma"]], layer_gdpp_r2=[float(v) for v in fit["r2"]])
    return out


def _heatmap_arrays(label, params, hand, hand_pp, d) -> dict[str, np.ndarray]:
    """Trained (each layer) and hand products, rescaled by beta as :func:`metrics.weight_alignment` does, for the
    weight heat maps. A trained layer whose beta is ~0 (or not finite) cannot be rescaled; it is kept raw and its
    key says so. Only single-head linear models have these products."""
    layer = params.layers[0]
    if "w_q" not in layer or layer["w_q"].shape[0] != 1:
        return {}
    mats: dict[str, np.ndarray] = {}
    for i in range(len(params.layers)):
        kq, pv, beta = M.rescaled_products(params, d, i)
        if np.isfinite(beta) and abs(beta) > 1e-8:
            mats[f"trained L{i + 1} W_K^T W_Q / beta"] = np.asarray(kq)
            mats[f"trained L{i + 1} beta P W_V"] = np.asarray(pv)
        else:
            kq, pv = M.effective_products(params, i)
            mats[f"trained L{i + 1} W_K^T W_Q (raw)"] = np.asarray(kq)
            mats[f"trained L{i + 1} P W_V (raw)"] = np.asarray(pv)
        mats[f"beta L{i + 1}"] = np.asarray(beta)
    kq_h, pv_h, _ = M.rescaled_products(hand, d)
    mats["GD construction W_K^T W_Q / beta"] = np.asarray(kq_h)
    mats["GD construction beta P W_V"] = np.asarray(pv_h)
    if hand_pp is not None:
        mats["GD++ construction beta P W_V"] = np.asarray(M.rescaled_products(hand_pp, d)[1])
    return {f"weights/{label}/{name}": m for name, m in mats.items()}


def _render(config, metrics, run_dir):
    from iclgd_synth.reports.gd_comparison import render

    return render(config, metrics, run_dir)


def _preset(name: str, description: str, model: ModelConfig, label: str, *, n_steps: int = 5000, lr: float = 1e-3,
            **fields) -> Study:
    train_cfg = TrainConfig(task=TASK_PRESETS["vonoswald"], model=model, n_steps=n_steps, lr=lr)
    return Study(name, description, GDComparisonConfig(train=train_cfg, model_label=label, **fields), compute,
                 _render)


_LSA = ModelConfig(dim=10)

VONOSWALD = _preset(
    "vonoswald", "A 1-layer linear self-attention model trained on in-context regression against one step of tuned "
    "gradient descent and the hand-constructed weights that implement it.", _LSA, "lsa",
    llm_weights=("smollm2", "minilm"))
RECURRENT = _preset(
    "recurrent", "A recurrent 2-layer LSA (one set of weights applied twice) against 2 steps of tuned GD and GD++.",
    _LSA.replace(n_layers=2, recurrent=True), "lsa_recurrent2", baseline_steps=2, gdpp=True)
DEEP = _preset(
    "deep", "A deep 5-layer LSA (separate weights per layer, token values clipped to [-10, 10]) against 5 steps of "
    "tuned GD and GD++.", _LSA.replace(n_layers=5, clip=10.0), "lsa_deep5", n_steps=20000, lr=5e-4,
    baseline_steps=5, gdpp=True)
SOFTMAX = _preset(
    "softmax", "Softmax attention with one and with two heads against one step of tuned GD: one head cannot express "
    "the linear GD update, two heads can approximate it.", _LSA.replace(attention="softmax"), "softmax_1head",
    extra_models=(("softmax_2heads", _LSA.replace(attention="softmax", n_heads=2)),))
LAYERNORM = _preset(
    "layernorm", "LSA with pre-LayerNorm against one step of tuned GD, in and out of distribution.",
    _LSA.replace(layer_norm=True), "lsa_layernorm")
MLP = _preset("mlp", "LSA followed by a ReLU MLP block against one step of tuned GD.", _LSA.replace(mlp=True),
              "lsa_mlp")
