"""Transient in-context learning with a finite task pool: the two Bayes predictors, distances to them, and what a
training curve says about them.

With tasks drawn from a finite pool {w_1, ..., w_M} (:func:`iclgd_synth.tasks.task_pool`) and Gaussian label noise,
two predictors are Bayes-optimal for two different task laws ("Pretraining task diversity and the emergence of
non-Bayesian in-context learning for regression"):

- ridge at lambda = sigma^2 / tau^2 (:class:`~iclgd_synth.learners.prefix.PrefixRidge`) for fresh tasks w ~ N(0,
  tau^2 I): it learns the task from the context;
- dMMSE (:class:`~iclgd_synth.learners.prefix.PrefixDMMSE`), the posterior mean over the pool, for pool tasks: it
  picks among memorised tasks (log-sum-exp over the pool in chunks, so M = 2^15 stays finite and exact).

A model's prediction distance to a predictor is, per context length n, the mean over tasks of the squared difference
of their predictions of y_(n+1) (summed over outputs) divided by d; averaged over n = 0..N it is the scalar of the
papers. :func:`make_evaluation` fixes the evaluation tasks (fresh tasks, and tasks drawn from the pool) and both
predictors' predictions on them once; :func:`evaluate_rows` gives every model of a stack (leading run axis R) its
per-position losses and distances on both in one compiled call.

:func:`summarize_curve` reads one run's curves over training (fresh-task loss, distances to ridge and dMMSE on fresh
tasks) into the study's quantities: t* (the evaluation step of the lowest fresh-task loss, smoothed), the ICL gain
(L_dMMSE - L) / (L_dMMSE - L_ridge) on fresh tasks at t* and at the end, the ridge-ness r = d_dMMSE / (d_ridge +
d_dMMSE) (1 at ridge, 0 at dMMSE, 1/2 equidistant) at its peak and at the end, whether ICL emerged and whether it
faded as the papers describe (the loss rising after t* while the model moves from ridge towards dMMSE; the thresholds
are this package's definitions, stated in :class:`CurveThresholds`, not the papers'). :func:`fit_power_law` fits
t* = a M^b by least squares in log-log.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.learners.prefix import PrefixDMMSE, PrefixRidge, bayes_ridge_lambda, prefix_targets
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, TaskConfig, sample, task_pool
from iclgd_synth.validation import check_float, check_int

#: Keys of the evaluation tasks: fresh tasks and pool tasks (independent of every training stream).
FRESH_SEED, POOL_SEED = 4_000_037, 4_000_039
#: The per-position quantities :func:`evaluate_rows` returns, each (R, N + 1).
ROW_METRICS = ("loss_fresh", "loss_pool", "ridge_fresh", "dmmse_fresh", "ridge_pool", "dmmse_pool")


def prediction_distance(pred_a: Any, pred_b: Any, dim: int) -> Array:
    """Per column, the mean over tasks of the squared difference of two predictions (summed over outputs) divided by
    ``dim``: (N + 1,) for predictions (B, N + 1) or (B, N + 1, d_out). Pure and jit-friendly."""
    a, b = jnp.asarray(pred_a), jnp.asarray(pred_b)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"pred_a and pred_b must both have shape (B, N + 1) or (B, N + 1, d_out), got {a.shape} and "
                         f"{b.shape}")
    sq = (a - b) ** 2
    return jnp.mean(sq if sq.ndim == 2 else sq.sum(-1), axis=0) / dim


@flax.struct.dataclass
class TransienceEvaluation:
    """Fixed evaluation tasks and the two Bayes predictors' predictions on them (a pytree: pass it to jitted code).

    Attributes:
      fresh, pool: tasks with fresh weights w ~ N(0, tau^2 I), and tasks drawn from the training pool (``w`` None).
      ridge_fresh, dmmse_fresh, ridge_pool, dmmse_pool: predictions at every prefix, (B, N + 1) (or (B, N + 1, O)).
      dim: d (static).
    """

    fresh: TaskBatch
    pool: TaskBatch
    ridge_fresh: Array
    dmmse_fresh: Array
    ridge_pool: Array
    dmmse_pool: Array
    dim: int = flax.struct.field(pytree_node=False, default=1)

    def reference(self) -> dict[str, np.ndarray]:
        """Per position (N + 1,): the half-MSE of ridge and dMMSE on both task sets and their distance to each other
        (the scale of the model's distances: a model at dMMSE is this far from ridge)."""
        out = {}
        for where in ("fresh", "pool"):
            batch = getattr(self, where)
            target = prefix_targets(batch)
            for name in ("ridge", "dmmse"):
                pred = getattr(self, f"{name}_{where}")
                out[f"{name}_loss_{where}"] = np.asarray(_half_mse(pred, target))
            out[f"ridge_dmmse_{where}"] = np.asarray(prediction_distance(getattr(self, f"ridge_{where}"),
                                                                         getattr(self, f"dmmse_{where}"), self.dim))
            out[f"zero_ridge_{where}"] = np.asarray(prediction_distance(
                jnp.zeros_like(getattr(self, f"ridge_{where}")), getattr(self, f"ridge_{where}"), self.dim))
        return out


def _half_mse(pred: Array, target: Array) -> Array:
    sq = (pred - target) ** 2
    return 0.5 * jnp.mean(sq if sq.ndim == 2 else sq.sum(-1), axis=0)


def make_evaluation(task: TaskConfig, n_tasks: int, *, dmmse_chunk: int = 256) -> TransienceEvaluation:
    """The evaluation of models trained on ``task`` (which must have a pool and label noise): ``n_tasks`` fresh tasks
    (the same for every pool size) and ``n_tasks`` tasks drawn from ``task``'s pool, and the predictions of ridge at
    the Bayes lambda and of dMMSE over the pool on both."""
    if not isinstance(task, TaskConfig):
        raise TypeError(f"task must be an iclgd_synth.TaskConfig, got {type(task).__name__}")
    if task.pool_size is None:
        raise ValueError("task.pool_size must be set (an integer >= 1): dMMSE is the posterior over the pool")
    if task.noise <= 0:
        raise ValueError(f"task.noise must be > 0 for dMMSE and the Bayes ridge (got {task.noise}); the pool posterior "
                         "divides by sigma^2")
    n_tasks = check_int("n_tasks", n_tasks, min_value=1)
    fresh = sample(jax.random.PRNGKey(FRESH_SEED), task.replace(pool_size=None), n_tasks).replace(w=None)
    pool = sample(jax.random.PRNGKey(POOL_SEED), task, n_tasks).replace(w=None)
    ridge = PrefixRidge(lam=bayes_ridge_lambda(task))
    dmmse = PrefixDMMSE(pool=task_pool(task), noise=task.noise, chunk=check_int("dmmse_chunk", dmmse_chunk,
                                                                                min_value=1))
    return TransienceEvaluation(fresh=fresh, pool=pool, ridge_fresh=ridge(fresh), dmmse_fresh=dmmse(fresh),
                                ridge_pool=ridge(pool), dmmse_pool=dmmse(pool), dim=task.dim)


def evaluate_rows(forward: Callable[[Any, TaskBatch], Array], params_R: Any,
                  evaluation: TransienceEvaluation) -> dict[str, np.ndarray]:
    """Per-position metrics (:data:`ROW_METRICS`, each (R, N + 1) NumPy) of every model of a stack ``params_R``
    (leading run axis R): the half-MSE on fresh and on pool tasks, and the prediction distance to ridge and to dMMSE
    on both. ``forward(params, batch) -> (B, N + 1)`` predicts every prefix (e.g.
    :func:`iclgd_synth.gpt.gpt_forward`); one compiled program per forward function and shapes."""
    if not isinstance(evaluation, TransienceEvaluation):
        raise TypeError(f"evaluation must come from make_evaluation, got {type(evaluation).__name__}")
    out = _evaluate_fn(forward)(params_R, evaluation)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


@functools.lru_cache(maxsize=16)
def _evaluate_fn(forward):
    def one(params, ev: TransienceEvaluation):
        out = {}
        for where in ("fresh", "pool"):
            batch = getattr(ev, where)
            pred = forward(params, batch)
            out[f"loss_{where}"] = _half_mse(pred, prefix_targets(batch).astype(pred.dtype))
            for name in ("ridge", "dmmse"):
                out[f"{name}_{where}"] = prediction_distance(pred, getattr(ev, f"{name}_{where}").astype(pred.dtype),
                                                             ev.dim)
        return out

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


@dataclasses.dataclass(frozen=True)
class CurveThresholds:
    """How a run's curves are read (this package's definitions; the papers show the curves without thresholds).

    The readings follow the pattern the issue and the papers describe -- the fresh-task loss has an interior minimum
    at t*, after which the distance to ridge rises while the distance to dMMSE falls -- on curves smoothed by a
    centred moving average over ``smooth`` evaluations (one noisy evaluation neither makes nor hides a minimum). The
    scale is the gap between the two Bayes predictors on fresh tasks, G = L_dMMSE - L_ridge (position-averaged
    half-MSE): the ICL gain of a model with fresh-task loss L is (L_dMMSE - L) / G (0 at the loss of dMMSE, the Bayes
    predictor under the pool prior; 1 at ridge's, the Bayes predictor of fresh tasks).

    Attributes:
      emerged: ICL counts as emerged when the ICL gain at t* is at least this (the model predicts fresh tasks better
        than the pool's Bayes predictor, by this fraction of the way to ridge); in (0, 1]. Default 0.25.
      faded: a run whose ICL emerged is transient when its smoothed fresh-task loss rises by at least this times G from
        t* to the end of training while its distance to dMMSE falls and its distance to ridge rises over the same
        stretch; in (0, 1]. Default 0.1.
      side: the final state, read on the ridge-ness r = d_dMMSE / (d_ridge + d_dMMSE) (fresh tasks; 1 at ridge, 0 at
        dMMSE) averaged over the last ``smooth`` evaluations: "ridge" when r >= 1/2 + side, "dMMSE" when
        r <= 1/2 - side, else "between"; in [0, 0.5]. Default 0.05.
      smooth: evaluations in the moving averages of the loss, the distances and r; odd, >= 1; 1 = none. Default 3.
    """

    emerged: float = 0.25
    faded: float = 0.1
    side: float = 0.05
    smooth: int = 3

    def __post_init__(self):
        check_float("emerged", self.emerged, min_value=0.0, max_value=1.0, strict_min=True)
        check_float("faded", self.faded, min_value=0.0, max_value=1.0, strict_min=True)
        check_float("side", self.side, min_value=0.0, max_value=0.5)
        if check_int("smooth", self.smooth, min_value=1) % 2 == 0:
            raise ValueError(f"smooth must be an odd integer >= 1 (a centred window), got {self.smooth}")


def smoothed(values: Any, window: int) -> np.ndarray:
    """Centred moving average over ``window`` (odd) points, the window shrinking symmetrically near the ends (the
    first point is kept), except the last point: the mean of the last ``window`` points (the state at the end of
    training, averaged over the final evaluations)."""
    v = np.asarray(values, np.float64)
    h = window // 2
    out = np.array([v[max(0, i - min(h, i, len(v) - 1 - i)):i + min(h, i, len(v) - 1 - i) + 1].mean()
                    for i in range(len(v))])
    if len(v):
        out[-1] = v[-min(window, len(v)):].mean()
    return out


def ridgeness(d_ridge: Any, d_dmmse: Any) -> np.ndarray:
    """r = d_dMMSE / (d_ridge + d_dMMSE): 1 at ridge, 0 at dMMSE, 1/2 equidistant (NaN where both are 0)."""
    a, b = np.asarray(d_ridge, np.float64), np.asarray(d_dmmse, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return b / (a + b)


def summarize_curve(steps: Sequence[int], loss_fresh: Sequence[float], d_ridge: Sequence[float],
                    d_dmmse: Sequence[float], ridge_loss: float, dmmse_loss: float,
                    thresholds: CurveThresholds = CurveThresholds()) -> dict[str, Any]:
    """One run's curves over training, read as :class:`CurveThresholds` defines.

    ``steps`` (T,) are the evaluation steps; ``loss_fresh``, ``d_ridge``, ``d_dmmse`` (T,) the fresh-task loss and
    the distances to ridge and to dMMSE on fresh tasks, averaged over positions; ``ridge_loss`` and ``dmmse_loss``
    the two Bayes predictors' fresh-task losses on the same tasks (their gap G is the scale; where it is not
    positive, the gains are NaN and no run counts as emerged). Returns t* (step of the
    lowest smoothed fresh-task loss, the last such step on ties; ``min_loss`` that minimum), whether it is interior,
    the ICL gain at t* and at the end, the rise of the loss after t* (in units of G), the ridge-ness r at its peak
    (value, step, distance to ridge there) and at the end, the final loss, distances and state, ``emerged`` and
    ``transient``. Every value is read on the smoothed curves; the final ones are means over the last ``smooth``
    evaluations."""
    steps = np.asarray(steps, np.int64)
    loss, dr, dd = (np.asarray(v, np.float64) for v in (loss_fresh, d_ridge, d_dmmse))
    if not (steps.ndim == 1 and steps.size >= 1 and loss.shape == dr.shape == dd.shape == steps.shape):
        raise ValueError(f"steps, loss_fresh, d_ridge and d_dmmse must be 1-D of one length >= 1, got shapes "
                         f"{steps.shape}, {loss.shape}, {dr.shape}, {dd.shape}")
    # Ridge is the Bayes predictor of fresh tasks, so the gap is positive in expectation; on a finite evaluation set
    # at a pool so large that dMMSE is ridge it can be 0 or below, and then there is no scale: gains are NaN and
    # nothing counts as emerged.
    gap = float(dmmse_loss) - float(ridge_loss)
    if not (np.isfinite(gap) and gap > 0):
        gap = float("nan")
    if not (np.all(np.isfinite(loss)) and np.all(np.isfinite(dr)) and np.all(np.isfinite(dd))):
        nan = float("nan")
        return {"t_star": nan, "interior_minimum": False, "min_loss": nan, "final_loss": nan, "peak_gain": nan,
                "final_gain": nan, "rise": nan, "peak_ridgeness": nan, "peak_step": nan, "peak_d_ridge": nan,
                "final_ridgeness": nan, "final_d_ridge": nan, "final_d_dmmse": nan, "final_state": "diverged",
                "emerged": False, "transient": False}
    w = thresholds.smooth
    r = ridgeness(dr, dd)
    r = smoothed(np.where(np.isfinite(r), r, 0.5), w)
    # Every curve smoothed the same way, its last point the mean of the last `w` evaluations (the end state). The
    # minimum is the LAST index of the smallest smoothed loss: the last two points of a 3-window are means of the
    # same evaluations, so a loss still falling at the end has its minimum at the end (not interior, rise 0).
    loss_s, dr_s, dd_s = smoothed(loss, w), smoothed(dr, w), smoothed(dd, w)
    i_loss = int(loss_s.size - 1 - np.argmin(loss_s[::-1]))
    i_peak = int(np.argmax(r))
    peak_gain = (float(dmmse_loss) - float(loss_s[i_loss])) / gap
    rise = (float(loss_s[-1]) - float(loss_s[i_loss])) / gap
    emerged = bool(np.isfinite(peak_gain) and peak_gain >= thresholds.emerged)
    moved = bool(dd_s[-1] < dd_s[i_loss] and dr_s[-1] > dr_s[i_loss])
    final = float(r[-1])
    state = "ridge" if final >= 0.5 + thresholds.side else "dMMSE" if final <= 0.5 - thresholds.side else "between"
    return {"t_star": int(steps[i_loss]), "interior_minimum": bool(i_loss < steps.size - 1),
            "min_loss": float(loss_s[i_loss]), "final_loss": float(loss_s[-1]), "peak_gain": float(peak_gain),
            "final_gain": (float(dmmse_loss) - float(loss_s[-1])) / gap, "rise": float(rise),
            "peak_ridgeness": float(r[i_peak]), "peak_step": int(steps[i_peak]), "peak_d_ridge": float(dr_s[i_peak]),
            "final_ridgeness": final, "final_d_ridge": float(dr_s[-1]), "final_d_dmmse": float(dd_s[-1]),
            "final_state": state, "emerged": emerged,
            "transient": bool(emerged and rise >= thresholds.faded and moved)}


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of log y = log a + b log x: {"exponent": b, "prefactor": a, "n": points, "stderr": the
    standard error of b (NaN with fewer than 3 points), "lo"/"hi": b's 95% Student-t interval}. Needs at least two
    points with different x > 0 and y > 0 (ValueError otherwise)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[keep]), np.log(y[keep])
    if lx.size < 2 or np.ptp(lx) == 0:
        raise ValueError(f"a power law needs at least two points with different x > 0 and y > 0, got {int(lx.size)} "
                         "usable point(s)")
    b, log_a = np.polyfit(lx, ly, 1)
    n = int(lx.size)
    out = {"exponent": float(b), "prefactor": float(math.exp(log_a)), "n": n, "stderr": float("nan"),
           "lo": float("nan"), "hi": float("nan")}
    if n >= 3:
        from scipy import stats

        resid = ly - (log_a + b * lx)
        se = math.sqrt(float(resid @ resid) / (n - 2) / float(((lx - lx.mean()) ** 2).sum()))
        half = float(stats.t.ppf(0.975, n - 2)) * se
        out.update(stderr=se, lo=float(b - half), hi=float(b + half))
    return out

