"""Transience: in-context learning that emerges and then gives way to memorising a finite task pool.

"The transient nature of emergent in-context learning in Transformers" finds that in-context learning can appear and
then fade as training goes on, and that L2 regularisation can keep it. The regression analogue ("Pretraining task
diversity and the emergence of non-Bayesian in-context learning for regression"; "Dynamics of transient structure in
in-context linear regression transformers") trains on a pool of M tasks: on the pool the Bayes predictor is dMMSE (a
posterior over the M memorised tasks), on fresh tasks it is ridge (learning from the context). Below a task-diversity
threshold the model ends near dMMSE; at intermediate M it first approaches ridge and then drifts to dMMSE.

This study trains the GPT-style model (:mod:`iclgd_synth.gpt`, next-token objective) on nested pools (the pool of
size M is the first M tasks of every larger pool) for every M x weight decay x seed, as ONE sweep
(:mod:`iclgd_synth.sweep`: the runs of one M -- every weight decay and seed -- are one compiled program, weight
decay being per-run optimiser state; the pools differ in shape, so each M is its own program). Every ``eval_every``
steps every model is evaluated at every context length on fixed fresh tasks and fixed pool tasks
(:func:`iclgd_synth.transience.evaluate_rows`): its loss and its prediction distance to ridge (Bayes lambda) and to
dMMSE over its pool. Each run's curves are read by :func:`iclgd_synth.transience.summarize_curve` (t*, the ICL gain
at t* and at the end, peak and final ridge-ness, emerged / transient, final state); across runs: the map of the
final state over M (the threshold), t*(M) with a power-law fit and its interval over seeds, and the weight-decay
comparison (paired over seeds).

Checks that hold by construction (implementation checks, tested): the pools are nested; dMMSE is exact (a chunked
log-sum-exp equal to the direct posterior) and finite at M = 2^15; a predictor's distance to itself is 0. Everything
about trained models is a finding, reported with its seeds. Resume: each M's group checkpoints through the sweep
machinery, its evaluations are appended to ``history/<group>.jsonl`` as they are made, and a finished group's results
are kept in ``groups/<group>.json`` (a rerun skips it). Science only; the report is
:mod:`iclgd_synth.reports.transience`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from iclgd_synth.config import NO_HASH
from iclgd_synth.gpt import GPTConfig
from iclgd_synth.intervals import mean_ci, paired_test
from iclgd_synth.storage import read_json, write_json
from iclgd_synth.studies.protocol import History, Run, Study
from iclgd_synth.tasks import TaskConfig
from iclgd_synth.train import TrainConfig
from iclgd_synth.transience import ROW_METRICS, CurveThresholds, fit_power_law, summarize_curve
from iclgd_synth.validation import check_float, check_int

#: Largest pool accepted (dMMSE is tested exact and finite up to 2^15; larger works the same, with more memory).
MAX_POOL = 2**20


@dataclasses.dataclass(frozen=True)
class TransienceConfig:
    """GPT-style models trained on finite task pools of several sizes and weight decays, evaluated over training.

    Attributes:
      train: training settings; ``train.task.pool_size`` is replaced by each entry of ``pool_sizes`` and
        ``train.weight_decay`` by each entry of ``weight_decays``; ``train.seeds`` are the seeds of every (M, weight
        decay); ``train.model`` is a :class:`~iclgd_synth.gpt.GPTConfig`; ``train.task.noise`` > 0 (sigma, the label
        noise standard deviation). The default is the CPU preset: d = 3, N = 16, sigma = 0.5, 2 blocks of width 32
        with 2 heads, 8000 steps of 128 tasks, AdamW lr 2e-3 after a 500-step linear warm-up (then constant: the
        drift to dMMSE is late training), clip 1, seeds (0, 1); 19 min 35 s on the 2-core development CPU, one run in
        eight transient (M = 8, seed 0; README). Why N = 16: at N = 8 these small models learn, within ~1000 steps,
        an estimator about as far from ridge as the best-scaled one-step GD (X^T y . x_q), which is equidistant from
        ridge and dMMSE at M = 16..64. Why this learning rate: at 3e-3 constant (the previous preset) the same model
        trained on fresh tasks sat on a plateau for 3000 steps (fresh loss 1.21; zero predictor 1.56, ridge 0.39);
        at 1e-3 it reached 0.55, at 2e-3 after the warm-up 0.48.
      pool_sizes: the pool sizes M (different integers in [1, 2^20], ascending). Default (4, 8, 16, 32).
      weight_decays: AdamW decoupled weight decays (different numbers >= 0). Default (0.0,) (the CPU preset fits
        the 30-minute budget with one; ``--set 'weight_decays=(0,0.1)'`` compares, at twice the time).
      eval_every: steps between evaluations (the training chunk; the curves' resolution), >= 1. Default 250.
      eval_tasks: fresh tasks, and as many pool tasks, in every evaluation (fixed over training). Default 1000.
      thresholds: how each run's curves are read (:class:`~iclgd_synth.transience.CurveThresholds`).
      dmmse_chunk: pool members per step of dMMSE's running log-sum-exp (memory only; not part of the hash).
        Default 256.
    """

    train: TrainConfig = TrainConfig(
        task=TaskConfig(dim=3, n_context=16, x_dist="normal", noise=0.5, pool_size=1),
        model=GPTConfig(dim=3, n_context=16, d_model=32, n_layers=2, n_heads=2), objective="next_token",
        batch_size=128, n_steps=8000, lr=2e-3, schedule="warmup_constant", warmup_steps=500, clip_norm=1.0,
        seeds=(0, 1), chunk_steps=250, checkpoint_every=1000)
    pool_sizes: tuple[int, ...] = (4, 8, 16, 32)
    weight_decays: tuple[float, ...] = (0.0,)
    eval_every: int = 250
    eval_tasks: int = 1000
    thresholds: CurveThresholds = CurveThresholds()
    dmmse_chunk: int = dataclasses.field(default=256, metadata=NO_HASH)

    def __post_init__(self):
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be an iclgd_synth.TrainConfig, got {type(self.train).__name__}")
        if not isinstance(self.train.model, GPTConfig):
            raise ValueError("train.model must be a GPTConfig (the GPT-style model, which predicts at every context "
                             "length)")
        if self.train.task.noise <= 0:
            raise ValueError(f"train.task.noise must be > 0 (dMMSE's posterior divides by sigma^2; the Bayes ridge "
                             f"lambda is sigma^2 / tau^2), got {self.train.task.noise}")
        object.__setattr__(self, "pool_sizes", tuple(self.pool_sizes))
        object.__setattr__(self, "weight_decays", tuple(float(w) for w in self.weight_decays))
        if not self.pool_sizes:
            raise ValueError("pool_sizes must name at least one pool size M in [1, 2^20]")
        for m in self.pool_sizes:
            check_int("pool_sizes[i]", m, min_value=1, max_value=MAX_POOL)
        if list(self.pool_sizes) != sorted(set(self.pool_sizes)):
            raise ValueError(f"pool_sizes must be different and ascending, got {list(self.pool_sizes)}")
        if not self.weight_decays:
            raise ValueError("weight_decays must name at least one weight decay >= 0")
        for w in self.weight_decays:
            check_float("weight_decays[i]", w, min_value=0.0)
        if len(set(self.weight_decays)) != len(self.weight_decays):
            raise ValueError(f"weight_decays must be different, got {list(self.weight_decays)}")
        check_int("eval_every", self.eval_every, min_value=1, max_value=self.train.n_steps)
        check_int("eval_tasks", self.eval_tasks, min_value=1)
        check_int("dmmse_chunk", self.dmmse_chunk, min_value=1)
        if not isinstance(self.thresholds, CurveThresholds):
            raise TypeError(f"thresholds must be an iclgd_synth.transience.CurveThresholds, got "
                            f"{type(self.thresholds).__name__}")

    def replace(self, **changes) -> "TransienceConfig":
        return dataclasses.replace(self, **changes)

    def quick(self) -> "TransienceConfig":
        n = min(self.train.n_steps, 100)
        t = self.train.replace(n_steps=n, batch_size=min(self.train.batch_size, 32), chunk_steps=50,
                               checkpoint_every=50, seeds=self.train.seeds[:2],
                               warmup_steps=min(self.train.warmup_steps, n // 10))
        return dataclasses.replace(self, train=t, pool_sizes=self.pool_sizes[:2], weight_decays=self.weight_decays[:2],
                                   eval_every=min(self.eval_every, 50), eval_tasks=min(self.eval_tasks, 128))


def _plan(config: TransienceConfig):
    from iclgd_synth.sweep import expand

    # The evaluation cadence is the training chunk: the sweep calls back after every chunk.
    base = config.replace(train=config.train.replace(chunk_steps=config.eval_every))
    grid = [("train.task.pool_size", list(config.pool_sizes)), ("train.weight_decay", list(config.weight_decays))]
    return expand(base, grid, config.train.seeds, eval_tasks=config.eval_tasks)


def compute(config: TransienceConfig, run: Run) -> dict[str, Any]:
    from iclgd_synth.sweep import group_id, group_runs

    plan = _plan(config)
    groups = group_runs(plan.runs)
    (run.dir / "groups").mkdir(exist_ok=True)
    (run.dir / "history").mkdir(exist_ok=True)
    n_steps = config.train.n_steps
    bar = _progress_bar(run, len(groups) * n_steps)
    results = []
    try:
        for gi, runs in enumerate(groups):
            gid = group_id(runs)
            path = run.dir / "groups" / f"{gid}.json"
            if not path.exists():
                write_json(path, _train_and_evaluate(config, runs, run.dir, gid, bar, gi * n_steps))
            elif bar is not None:
                bar.update(gi * n_steps + n_steps - bar.n)
            results.append(read_json(path))
    finally:
        if bar is not None:
            bar.close()
    return _analyse(config, results, run)


def _progress_bar(run: Run, total: int):
    if not run.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="transience", unit="step", dynamic_ncols=True, miniters=1)


def _train_and_evaluate(config: TransienceConfig, runs, run_dir: Path, gid: str, bar, offset: int) -> dict[str, Any]:
    """Train one group (one pool size: every weight decay and seed), evaluating after every chunk; its results."""
    import jax

    from iclgd_synth.gpt import gpt_forward
    from iclgd_synth.sweep import group_key, init_rows, run_rows, train_group
    from iclgd_synth.transience import evaluate_rows, make_evaluation

    task = runs[0].train.task
    m = int(task.pool_size)
    label = f"M = {m} ({len(runs)} runs)"
    if bar is not None:
        bar.set_postfix_str(f"{label}: dMMSE over the pool, compiling...")
    evaluation = make_evaluation(task, config.eval_tasks, dmmse_chunk=config.dmmse_chunk)
    history = History(run_dir / "history" / f"{gid}.jsonl")

    def record(step, params_R):
        rows = evaluate_rows(gpt_forward, params_R, evaluation)
        history.append({"step": int(step), **{k: v[:len(runs)].tolist() for k, v in rows.items()}})

    if not any(row["step"] == 0 for row in history.rows):  # the initial models (drawn from the seeds alone)
        key, _ = group_key(runs[0].train)
        params0, _, _ = init_rows(key, [r.seed for r in runs], [r.train.lr for r in runs],
                                  [r.train.weight_decay for r in runs])
        record(0, jax.tree.map(np.asarray, params0))

    def on_chunk(step):
        if bar is not None:
            bar.update(offset + step - bar.n)
            bar.set_postfix_str(f"{label}: step {step}/{runs[0].train.n_steps}")

    ckpt = run_dir / "groups" / gid / "checkpoint.msgpack"
    result = train_group(runs, eval_tasks=config.eval_tasks, checkpoint=ckpt, on_chunk=on_chunk, on_params=record)
    rows = history.finish(runs[0].train.n_steps)
    out = {"pool_size": m, "group": gid,
           "runs": [{"run_id": r.run_id, "seed": r.seed, "weight_decay": float(r.train.weight_decay)} for r in runs],
           "steps": [row["step"] for row in rows],
           "curves": {k: [row[k] for row in rows] for k in ROW_METRICS},  # (T, R, N + 1)
           "reference": {k: v.tolist() for k, v in evaluation.reference().items()},
           "training": [{k: row[k] for k in ("final_train_loss", "diverged_at", "curve", "group_seconds")}
                        for row in run_rows(runs, result)]}
    shutil.rmtree(ckpt.parent, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------------ analysis


def _analyse(config: TransienceConfig, results: list[dict[str, Any]], run: Run) -> dict[str, Any]:
    """Per run: the curves averaged over positions and their reading; per (M, weight decay): means over seeds; across
    M: the threshold and t*(M)'s power law; across weight decays: paired comparisons with the first one."""
    arrays: dict[str, np.ndarray] = {}
    per_run: list[dict[str, Any]] = []
    references: dict[str, dict[str, Any]] = {}
    seconds = 0.0
    for g in results:
        m = g["pool_size"]
        ref = {k: np.asarray(v, np.float64) for k, v in g["reference"].items()}
        references[str(m)] = {k: float(v.mean()) for k, v in ref.items()}
        steps = np.asarray(g["steps"], np.int64)
        curves = {k: np.asarray(v, np.float64) for k, v in g["curves"].items()}  # (T, R, P)
        arrays[f"M{m}/steps"] = steps
        for k, v in curves.items():
            arrays[f"M{m}/{k}"] = v
        seconds += float(g["training"][0]["group_seconds"]) if g["training"] else 0.0
        for i, r in enumerate(g["runs"]):
            avg = {k: v[:, i].mean(-1) for k, v in curves.items()}  # position-averaged, (T,)
            reading = summarize_curve(steps, avg["loss_fresh"], avg["ridge_fresh"], avg["dmmse_fresh"],
                                      references[str(m)]["ridge_loss_fresh"], references[str(m)]["dmmse_loss_fresh"],
                                      config.thresholds)
            per_run.append({"pool_size": m, "weight_decay": r["weight_decay"], "seed": r["seed"],
                            "index": i, **reading,
                            "final_loss_pool": float(avg["loss_pool"][-1]),
                            "final_d_ridge_pool": float(avg["ridge_pool"][-1]),
                            "final_d_dmmse_pool": float(avg["dmmse_pool"][-1]),
                            "final_train_loss": g["training"][i]["final_train_loss"],
                            "diverged_at": g["training"][i]["diverged_at"],
                            "curve": {k: [float(x) for x in v] for k, v in avg.items()}, "steps": steps.tolist()})
    run.save_arrays("curves", **arrays)
    cells = _cells(config, per_run)
    return {"pool_sizes": list(config.pool_sizes), "weight_decays": list(config.weight_decays),
            "seeds": list(config.train.seeds), "n_context": config.train.task.n_context,
            "dim": config.train.task.dim, "reference": references, "runs": per_run, "cells": cells,
            "threshold": {f"{w:g}": _threshold(config, cells, w) for w in config.weight_decays},
            "power_law": {f"{w:g}": _power_law(config, per_run, w) for w in config.weight_decays},
            "weight_decay_comparison": _wd_comparison(config, per_run),
            "train_seconds": seconds}


def _select(per_run, m, w):
    return sorted([r for r in per_run if r["pool_size"] == m and r["weight_decay"] == w], key=lambda r: r["seed"])


def _cells(config: TransienceConfig, per_run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (M, weight decay): counts and means with 95% intervals over seeds."""
    cells = []
    for w in config.weight_decays:
        for m in config.pool_sizes:
            rs = _select(per_run, m, w)
            if not rs:
                continue
            states = [r["final_state"] for r in rs]
            cell = {"pool_size": m, "weight_decay": w, "n_seeds": len(rs),
                    "emerged": sum(r["emerged"] for r in rs), "transient": sum(r["transient"] for r in rs),
                    "interior_minimum": sum(r["interior_minimum"] for r in rs),
                    "final_states": {s: states.count(s) for s in dict.fromkeys(states)},
                    "majority_state": max(dict.fromkeys(states), key=states.count)}
            for k in ("t_star", "peak_gain", "final_gain", "rise", "peak_ridgeness", "final_ridgeness", "min_loss",
                      "final_loss", "final_loss_pool", "final_d_ridge", "final_d_dmmse", "peak_d_ridge"):
                cell[k] = mean_ci([r[k] for r in rs])
            cell["t_star_transient"] = mean_ci([r["t_star"] for r in rs if r["transient"]]) if cell["transient"] \
                else None
            cells.append(cell)
    return cells


def _threshold(config: TransienceConfig, cells, w: float) -> dict[str, Any]:
    """The smallest M from which every larger M of the grid ends on the ridge side for most seeds (None when the
    largest does not), and the largest M below it."""
    ms = [c["pool_size"] for c in cells if c["weight_decay"] == w]
    ridge = {c["pool_size"]: c["final_states"].get("ridge", 0) * 2 > c["n_seeds"] for c in cells
             if c["weight_decay"] == w}
    above = None
    for m in reversed(ms):
        if not ridge[m]:
            break
        above = m
    below = max([m for m in ms if above is None or m < above], default=None)
    return {"ridge_from": above, "not_ridge_at": below}


def _power_law(config: TransienceConfig, per_run, w: float) -> dict[str, Any]:
    """t*(M) over the transient runs: a pooled log-log fit (interval from its residuals) and, for seeds transient at
    two or more M, one fit per seed with the mean exponent's 95% interval over those seeds."""
    pts = [(r["pool_size"], r["t_star"], r["seed"]) for r in per_run if r["weight_decay"] == w and r["transient"]]
    out: dict[str, Any] = {"points": [[m, t, s] for m, t, s in pts], "pooled": None, "per_seed": None}
    if len({m for m, _, _ in pts}) >= 2:
        out["pooled"] = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
    exps = []
    for s in config.train.seeds:
        mine = [(m, t) for m, t, seed in pts if seed == s]
        if len({m for m, _ in mine}) >= 2:
            exps.append(fit_power_law([p[0] for p in mine], [p[1] for p in mine])["exponent"])
    if exps:
        out["per_seed"] = mean_ci(exps)
    return out


def _wd_comparison(config: TransienceConfig, per_run) -> list[dict[str, Any]]:
    """Each weight decay against the first one, per M, paired over seeds: final ridge-ness, final fresh-task loss,
    final pool loss (the cost), transient counts."""
    if len(config.weight_decays) < 2:
        return []
    ref_w = config.weight_decays[0]
    out = []
    for w in config.weight_decays[1:]:
        for m in config.pool_sizes:
            a, b = _select(per_run, m, w), _select(per_run, m, ref_w)
            seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
            a = [r for r in a if r["seed"] in seeds]
            b = [r for r in b if r["seed"] in seeds]
            if not seeds:
                continue
            row = {"pool_size": m, "weight_decay": w, "reference_weight_decay": ref_w, "n_seeds": len(seeds),
                   "transient": sum(r["transient"] for r in a), "reference_transient": sum(r["transient"] for r in b),
                   "ridge_side": sum(r["final_state"] == "ridge" for r in a),
                   "reference_ridge_side": sum(r["final_state"] == "ridge" for r in b)}
            for k in ("final_ridgeness", "final_gain", "final_loss", "final_loss_pool"):
                row[k] = paired_test([r[k] for r in a], [r[k] for r in b])
            out.append(row)
    return out


def _render(config, metrics, run_dir):
    from iclgd_synth.reports.transience import render

    return render(config, metrics, run_dir)


TRANSIENCE = Study(
    "transience", "GPT-style models trained on nested finite task pools (M x weight decay x seeds, one sweep), "
    "evaluated over training on fresh and pool tasks against ridge (fresh-task Bayes) and dMMSE (pool Bayes): "
    "transient ICL, the task-diversity threshold, t*(M) and what weight decay changes.",
    TransienceConfig(), compute, _render)

#: The papers' size ("Pretraining task diversity ...": d = 8, N = 16, noise variance 0.25, 8 layers of width 128 with
#: 2 heads, Adam lr 1e-3 with warm-up, 500k steps of 256 tasks; M = 2^0 .. 2^15) as overrides of the registered
#: study, so that ``iclgd report`` re-renders it: ``iclgd run transience --set ...`` with these, or
#: ``experiments/transience.py --paper``. For accelerators.
PAPER_OVERRIDES: tuple[str, ...] = (
    "train.task.dim=8", "train.task.n_context=16", "train.task.noise=0.5",
    "train.model.dim=8", "train.model.n_context=16", "train.model.d_model=128", "train.model.n_layers=8",
    "train.model.n_heads=2", "train.batch_size=256", "train.n_steps=500000", "train.lr=1e-3",
    "train.schedule=warmup_cosine", "train.warmup_steps=5000", "train.checkpoint_every=10000",
    "pool_sizes=(" + ",".join(str(2**k) for k in range(16)) + ")", "weight_decays=(0,0.01,0.1)",
    "eval_every=5000", "eval_tasks=2000", "train.seeds=(0,1,2)")
