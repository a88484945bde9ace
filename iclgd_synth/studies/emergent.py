"""Emergent ICL: GPT-style regression Transformers trained on every position, and whether they still look like GD.

"Do pretrained Transformers learn in-context by gradient descent?" points out that the "ICL is GD" evidence comes from
models trained on the in-context objective (the query only, (x, y) tokens, no embedding), while in-context learning
in real models *emerges* from next-token training of models with an embedding, positions, softmax attention and MLPs
(the testbeds of "What can Transformers learn in-context? A case study of simple function classes" and "Pretraining
task diversity and the emergence of non-Bayesian in-context learning for regression").

This study trains the same GPT-style model (:mod:`iclgd_synth.gpt`) under both objectives, for every seed and every
label-noise level, and evaluates at every context length n = 0..N against the baselines of
:mod:`iclgd_synth.learners.prefix` (least squares, ridge at the Bayes lambda, K-step GD with eta tuned per n, zero,
averaging, nearest neighbours): the error curve, which baseline the model is closest to at each n (prediction
distance, P6's mean squared difference divided by d), the cosine of its implicit weights d y_hat_n / d x_{n+1}
(:func:`iclgd_synth.metrics.position_sensitivities`) with each baseline's, and its order sensitivity (spread of the
query prediction over orderings of the demonstrations, as in the ``order`` study). Science only; the report is
:mod:`iclgd_synth.reports.emergent`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from iclgd_synth import metrics as M
from iclgd_synth.critiques.order import order_spread, ordered_predictions, random_orderings
from iclgd_synth.gpt import GPTConfig, gpt_forward
from iclgd_synth.intervals import mean_ci
from iclgd_synth.learners.prefix import per_position_half_mse, prefix_baselines
from iclgd_synth.similarity import cosine_rows
from iclgd_synth.studies.protocol import Run, Study
from iclgd_synth.tasks import TaskConfig, sample
from iclgd_synth.train import OBJECTIVES, TrainConfig, train
from iclgd_synth.validation import check_float, check_int

TUNE_SEED, EVAL_SEED, ORDER_SEED = 1_000_003, 2_000_003, 3_000_003


@dataclasses.dataclass(frozen=True)
class EmergentConfig:
    """GPT-style models trained under the next-token and the ICL objective, evaluated at every context length.

    Attributes:
      train: training settings (``train.model`` a :class:`~iclgd_synth.gpt.GPTConfig`; ``train.objective`` is
        replaced by each entry of ``objectives`` and ``train.task.noise`` by each entry of ``noises``). The default is
        the CPU preset: d = 5, N = 10, a 2-block width-32 model with 4 heads, Adam with warm-up and cosine decay.
      objectives: the objectives trained, each on the same model and data. Default ("next_token", "icl").
      noises: label-noise standard deviations sigma; ridge at lambda = sigma^2 / tau^2 is the Bayes predictor, least
        squares at sigma = 0. Default (0.0, 0.5).
      gd_steps: the K of the K-step GD baselines (eta tuned per context length). Default (1, 2, 5).
      tune_tasks: tasks on which GD's step sizes are tuned (separate from evaluation). Default 2000.
      eval_tasks: held-out tasks for every error and distance. Default 2000.
      order_tasks: tasks for the order sensitivity. Default 300.
      n_orderings: orderings of the demonstrations per task. Default 10.
    """

    train: TrainConfig = TrainConfig(
        task=TaskConfig(dim=5, n_context=10, x_dist="normal"),
        model=GPTConfig(dim=5, n_context=10, d_model=32, n_layers=2, n_heads=4), objective="next_token",
        batch_size=128, n_steps=4000, lr=1e-3, schedule="warmup_cosine", warmup_steps=400, clip_norm=1.0,
        seeds=(0, 1), chunk_steps=200, checkpoint_every=1000)
    objectives: tuple[str, ...] = ("next_token", "icl")
    noises: tuple[float, ...] = (0.0, 0.5)
    gd_steps: tuple[int, ...] = (1, 2, 5)
    tune_tasks: int = 2000
    eval_tasks: int = 2000
    order_tasks: int = 300
    n_orderings: int = 10

    def __post_init__(self):
        if not isinstance(self.train.model, GPTConfig):
            raise ValueError("train.model must be a GPTConfig (the GPT-style model this study is about)")
        object.__setattr__(self, "objectives", tuple(self.objectives))
        object.__setattr__(self, "noises", tuple(float(s) for s in self.noises))
        object.__setattr__(self, "gd_steps", tuple(self.gd_steps))
        if not self.objectives or any(o not in OBJECTIVES for o in self.objectives):
            raise ValueError(f"objectives must be a non-empty subset of {OBJECTIVES}, got {self.objectives}")
        if not self.noises:
            raise ValueError("noises must name at least one label-noise level >= 0")
        for s in self.noises:
            check_float("noises[i]", s, min_value=0.0)
        for k in self.gd_steps:
            check_int("gd_steps[i]", k, min_value=1)
        check_int("tune_tasks", self.tune_tasks, min_value=1)
        check_int("eval_tasks", self.eval_tasks, min_value=1)
        check_int("order_tasks", self.order_tasks, min_value=1)
        check_int("n_orderings", self.n_orderings, min_value=2)

    def replace(self, **changes) -> "EmergentConfig":
        return dataclasses.replace(self, **changes)

    def quick(self) -> "EmergentConfig":
        t = self.train.replace(n_steps=min(self.train.n_steps, 200), warmup_steps=min(self.train.warmup_steps, 20),
                               batch_size=min(self.train.batch_size, 64), chunk_steps=50, checkpoint_every=100,
                               seeds=self.train.seeds[:1])
        return dataclasses.replace(self, train=t, noises=self.noises[:1], gd_steps=self.gd_steps[:1],
                                   tune_tasks=300, eval_tasks=300, order_tasks=50, n_orderings=4)


def _distance(a: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
    """Per column, the mean over tasks of (a - b)^2 / d ("Pretraining task diversity ...")."""
    return np.mean((a - b) ** 2, axis=0) / d


def _column_cosines(s_model: np.ndarray, s_base: np.ndarray) -> list[float]:
    """Per column, the mean over tasks of the cosine of the sensitivities (undefined rows left out)."""
    out = []
    for n in range(s_model.shape[1]):
        c = cosine_rows(s_model[:, n], s_base[:, n])
        out.append(float(np.nanmean(c)) if np.isfinite(c).any() else float("nan"))
    return out


def compute(config: EmergentConfig, run: Run) -> dict[str, Any]:
    d = config.train.task.dim
    results: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for noise in config.noises:
        task = config.train.task.replace(noise=noise)
        tune_batch = sample(jax.random.PRNGKey(TUNE_SEED), task, config.tune_tasks)
        eval_batch = sample(jax.random.PRNGKey(EVAL_SEED), task, config.eval_tasks)
        order_batch = eval_batch.slice(0, min(config.order_tasks, config.eval_tasks))
        perms = random_orderings(jax.random.PRNGKey(ORDER_SEED), order_batch.batch_size, task.n_context,
                                 config.n_orderings)
        baselines = prefix_baselines(task, tune_batch, gd_steps=config.gd_steps)
        base_pred = {name: np.asarray(b(eval_batch), np.float64) for name, b in baselines.items()}
        base_sens = {name: np.asarray(M.position_sensitivities(b, eval_batch), np.float64)
                     for name, b in baselines.items() if name not in ("zero", "nearest_neighbours")}
        base_err = {name: [float(v) for v in per_position_half_mse(p, eval_batch)] for name, p in base_pred.items()}
        base_order = {name: order_spread(ordered_predictions(b.query, order_batch, perms))["relative"]
                      for name, b in baselines.items() if name != "zero"}
        per_noise: dict[str, Any] = {"noise": noise, "baseline_errors": base_err, "baseline_order_spread": base_order,
                                     "gd_etas": {name: [float(e) for e in np.ravel(b.eta)]
                                                 for name, b in baselines.items() if name.startswith("gd_")},
                                     "objectives": {}}
        for objective in config.objectives:
            cfg = config.train.replace(task=task, objective=objective)
            result = train(cfg, run.dir / f"ckpt_{objective}_noise{noise:g}", progress=run.progress)
            arrays[f"losses/{objective}/noise{noise:g}"] = np.asarray(result.losses)
            seeds = []
            for i in range(len(cfg.seeds)):
                params = result.seed_params(i)
                pred = np.asarray(gpt_forward(params, eval_batch), np.float64)
                sens = np.asarray(M.position_sensitivities(lambda b, _p=params: gpt_forward(_p, b), eval_batch),
                                  np.float64)
                dist = {name: [float(v) for v in _distance(pred, p, d)] for name, p in base_pred.items()}
                seeds.append({
                    "errors": [float(v) for v in per_position_half_mse(pred, eval_batch)],
                    "distance": dist,
                    "cosine": {name: _column_cosines(sens, s) for name, s in base_sens.items()},
                    "order_spread": order_spread(ordered_predictions(params, order_batch, perms))["relative"],
                })
            per_noise["objectives"][objective] = _combine(seeds, list(base_pred))
            per_noise["objectives"][objective]["train_seconds"] = result.train_seconds
        results[f"{noise:g}"] = per_noise
    run.save_arrays("arrays", **arrays)
    return {"noises": [f"{s:g}" for s in config.noises], "n_context": config.train.task.n_context,
            "per_noise": results}


def _combine(seeds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Means over seeds per column (with a 95% interval for the errors), the closest baseline per column, and the
    per-seed values."""
    n_cols = len(seeds[0]["errors"])

    def mean_cols(rows):
        return [float(np.nanmean([r[j] for r in rows])) if np.isfinite([r[j] for r in rows]).any() else float("nan")
                for j in range(n_cols)]

    errors_ci = [mean_ci([s["errors"][j] for s in seeds]) for j in range(n_cols)]
    distance = {name: mean_cols([s["distance"][name] for s in seeds]) for name in names}
    cos_names = list(seeds[0]["cosine"])
    cosine = {name: mean_cols([s["cosine"][name] for s in seeds]) for name in cos_names}
    closest = []
    for j in range(n_cols):
        cands = {name: distance[name][j] for name in names}
        best = min(cands, key=cands.get)
        closest.append({"baseline": best, "distance": cands[best]})
    return {"errors": [c["mean"] for c in errors_ci], "errors_ci": errors_ci, "distance": distance,
            "cosine": cosine, "closest": closest, "order_spread": mean_ci([s["order_spread"] for s in seeds]),
            "n_seeds": len(seeds), "per_seed": seeds}


def _render(config, metrics, run_dir):
    from iclgd_synth.reports.emergent import render

    return render(config, metrics, run_dir)


EMERGENT = Study(
    "emergent", "GPT-style regression Transformers trained on every position (next-token) and on the query alone (ICL "
    "objective), compared at every context length with least squares, ridge, tuned K-step GD and simple baselines.",
    EmergentConfig(), compute, _render)

#: The paper-sized preset for accelerators ("What can Transformers learn in-context?": d = 20, N = 40, 12 layers,
#: width 256, 8 heads, Adam lr 1e-4, batch 64); the same code, run on a GPU/TPU (``iclgd run emergent-paper``).
EMERGENT_PAPER = Study(
    "emergent-paper", "The emergent study at the size of the GPT-style testbeds (d = 20, N = 40, 12 layers, width 256, "
    "8 heads): for accelerators.",
    EmergentConfig(train=TrainConfig(
        task=TaskConfig(dim=20, n_context=40, x_dist="normal"),
        model=GPTConfig(dim=20, n_context=40, d_model=256, n_layers=12, n_heads=8), objective="next_token",
        batch_size=64, n_steps=100_000, lr=1e-4, schedule="warmup_cosine", warmup_steps=2000, clip_norm=1.0,
        seeds=(0, 1, 2), chunk_steps=500, checkpoint_every=5000), eval_tasks=5000, tune_tasks=5000),
    compute, _render)
