"""Order sensitivity: the orderings of the demonstrations, the statistics that measure a predictor's reaction to them,
and the step-size tuners of the order-sensitive learners.

"Do pretrained Transformers Learn In-Context by Gradient Descent?" argues: if an algorithm A is equivalent to ICL,
reordering the demonstrations must change both by the same amount. Full-batch GD (and GD++) is exactly invariant to
the order; SGD with small batches and Adam on minibatches are not; ICL in a *causal* model is not. The study that
uses these functions is :mod:`iclgd_synth.studies.order`; the causal hand construction is
:func:`iclgd_synth.constructions.causal_hand_params`.

- **spread** (:func:`order_spread`): for each task, the standard deviation (population, ddof = 0) of the prediction
  over P orderings of the N demonstrations, averaged over tasks; **relative spread** = spread / (standard deviation
  across tasks of the per-task mean prediction), so that predictors of different scale compare.
- **order correlation** (:func:`order_correlation`): for each task, the Pearson correlation between the vectors of the
  P prediction deviations from the per-task mean (the two predictors' order effects); averaged over the tasks where
  both predictors move at all (> 1e-10 relative); undefined (NaN) for an order-invariant predictor.

A 2+-layer causal hand model is no longer K-step GD, so its step size is tuned for the causal model itself
(:func:`tune_causal_hand`, lowest query loss on the tuning tasks); for K = 1 that is GD's own eta.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.constructions import causal_hand_params
from iclgd_synth.learners import Adam, GD, GDPlusPlus, SGD, grid_search, tune, tune_gd, tune_gdpp
from iclgd_synth.losses import half_mse
from iclgd_synth.metrics import as_predictor
from iclgd_synth.model import predict
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch


# ------------------------------------------------------------------------------------------------------ the statistics

def random_orderings(key: Array, n_tasks: int, n_context: int, n_orderings: int) -> Array:
    """Independent random permutations of the N demonstrations for every task and ordering, (B, P, N)."""
    keys = jax.random.split(key, n_tasks * n_orderings)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n_context))(keys)
    return perms.reshape(n_tasks, n_orderings, n_context)


def ordered_batch(batch: TaskBatch, perms_BxPxN: Array) -> TaskBatch:
    """All orderings of every task as one batch of B * P tasks (task-major: task b's orderings are rows b*P..)."""
    b, p, n = perms_BxPxN.shape
    take = jax.vmap(jax.vmap(lambda a, q: a[q], (None, 0)), (0, 0))
    x = take(batch.x, perms_BxPxN).reshape(b * p, n, -1)
    y = take(batch.y, perms_BxPxN)
    y = y.reshape((b * p, n) + y.shape[3:])
    rep = lambda a: None if a is None else jnp.repeat(a, p, axis=0)  # noqa: E731
    return TaskBatch(x=x, y=y, x_query=rep(batch.x_query), y_query=rep(batch.y_query), w=rep(batch.w))


def ordered_predictions(predictor: Any, batch: TaskBatch, perms_BxPxN: Array) -> np.ndarray:
    """Predictions of ``predictor`` for every task under every ordering, (B, P) (float64 NumPy)."""
    b, p, _ = perms_BxPxN.shape
    preds = np.asarray(as_predictor(predictor)(ordered_batch(batch, perms_BxPxN)), np.float64)
    return preds.reshape((b, p) + preds.shape[1:])


def order_spread(preds_BxP: Any) -> dict[str, Any]:
    """Spread of predictions across orderings.

    Returns ``spread`` (mean over tasks of the per-task std over orderings, ddof = 0), ``scale`` (std over tasks of
    the per-task mean prediction), ``relative`` = spread / scale and ``per_task`` (B,)."""
    p = np.asarray(preds_BxP, np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"order_spread needs predictions of shape (B, P) with P >= 2 orderings, got {p.shape}")
    per_task = p.std(axis=1)
    spread = float(per_task.mean())
    scale = float(p.mean(axis=1).std())
    relative = spread / scale if scale > 0 else float("nan")
    return {"spread": spread, "scale": scale, "relative": relative, "per_task": per_task}


def order_correlation(a_BxP: Any, b_BxP: Any, *, rel_tol: float = 1e-10) -> dict[str, float]:
    """Mean over tasks of the correlation between two predictors' deviations from their per-task means.

    Tasks where either predictor's deviations are below ``rel_tol`` times its prediction scale are left out
    (``n_undefined``); the mean is NaN if no task is left."""
    a, b = np.asarray(a_BxP, np.float64), np.asarray(b_BxP, np.float64)
    da, db = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    na, nb = np.linalg.norm(da, axis=1), np.linalg.norm(db, axis=1)
    ok = (na > rel_tol * (1.0 + np.abs(a).max())) & (nb > rel_tol * (1.0 + np.abs(b).max()))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.sum(da * db, axis=1) / (na * nb)
    n = int(ok.sum())
    return {"mean": float(corr[ok].mean()) if n else float("nan"),
            "sem": float(corr[ok].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            "n": n, "n_undefined": int((~ok).sum())}


# ---------------------------------------------------------------------------------------------------- the predictors

def tune_causal_hand(batch: TaskBatch, n_layers: int, *, n_grid: int = 32, rounds: int = 3) -> float:
    """The step size eta of the causal hand K-layer model with the lowest query loss on ``batch``.

    K = 1: the causal model is one GD step (the query sees every key), so GD's exact optimum is returned. K >= 2: a
    grid search on [0, 3 eta_K] with eta_K the optimum of non-causal K-step GD."""
    eta_gd = tune_gd(batch, n_layers).eta
    if n_layers == 1:
        return eta_gd
    d, n = batch.dim, batch.n_context
    t = grid_search(lambda p, b: half_mse(predict(causal_hand_params(d, p["eta"], n_layers, n), b), b.y_query),
                    {"eta": (0.0, 3.0 * max(eta_gd, 1e-3))}, data=batch, n_grid=n_grid, rounds=rounds)
    return t.params["eta"]


def tune_sgd(batch: TaskBatch, epochs: int, batch_size: int = 1, eta_max: float = 6.0) -> float:
    """Best constant SGD step size for ``epochs`` ordered passes (grid refinement on the given order)."""
    return tune(SGD(epochs=epochs, batch_size=batch_size), batch, {"eta": (0.0, eta_max)}, widen=False, n_grid=24,
                rounds=3).params["eta"]


def tune_adam(batch: TaskBatch, epochs: int, batch_size: int = 1, lr_max: float = 2.0) -> float:
    """Best Adam learning rate for ``epochs`` ordered passes (grid refinement on [1e-4, ``lr_max``], given order)."""
    return tune(Adam(epochs=epochs, batch_size=batch_size), batch, {"lr": (1e-4, lr_max)}, widen=False, n_grid=24,
                rounds=3).params["lr"]


def sgd_name(epochs: int) -> str:
    """The label of online SGD (batch 1) with ``epochs`` passes, as the order study names it."""
    return f"SGD (batch 1, {epochs} epoch{'s' * (epochs > 1)})"


def adam_name(epochs: int) -> str:
    """The label of Adam (batch 1) with ``epochs`` passes, as the order study names it."""
    return f"Adam (batch 1, {epochs} epoch{'s' * (epochs > 1)})"


def tuned_learners(batch: TaskBatch, sgd_epochs: tuple[int, ...], adam_epochs: int, gdpp_steps: int
                   ) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """The explicit learners with hyper-parameters tuned on ``batch`` in its given order, and those values."""
    learners: dict[str, Any] = {}
    hyper: dict[str, dict[str, float]] = {}
    gd = tune_gd(batch, 1)
    learners["GD (full batch, 1 step)"], hyper["GD (full batch, 1 step)"] = GD(eta=gd.eta, steps=1), {"eta": gd.eta}
    pp = tune_gdpp(batch, gdpp_steps, n_grid=16, rounds=3)
    name = f"GD++ ({gdpp_steps} steps)"
    learners[name] = GDPlusPlus(eta=pp.params["eta"], gamma=pp.params["gamma"], steps=gdpp_steps)
    hyper[name] = dict(pp.params)
    for e in sgd_epochs:
        eta = tune_sgd(batch, e)
        name = sgd_name(e)
        learners[name], hyper[name] = SGD(eta=eta, epochs=e, batch_size=1), {"eta": eta}
    lr = tune_adam(batch, adam_epochs)
    name = adam_name(adam_epochs)
    learners[name], hyper[name] = Adam(lr=lr, epochs=adam_epochs, batch_size=1), {"lr": lr}
    return learners, hyper


# ------------------------------------------------------------------------------------ closed forms of the order terms

def sgd_order_term(batch: TaskBatch) -> np.ndarray:
    """Q = -sum_{a<b} (x_a . x_b)(x_b . x_q) y_a over the demonstrations in the batch's order, (B,) or (B, d_out).

    The order-dependent part of one-pass SGD (batch 1, from W = 0) is eta^2 Q + O(eta^3): unrolling
    W_t = W_(t-1) - eta (W_(t-1) x_t - y_t) x_t^T gives W_N = eta sum_a y_a x_a^T - eta^2 sum_{a<b} y_a (x_a . x_b)
    x_b^T + O(eta^3), whose first term does not depend on the order. The 2-layer causal hand model's prediction is
    2 (eta/N) sum_t y_t (x_t . x_q) - (eta/N)^2 sum_t sum_{i<=t} y_i (x_i . x_t)(x_t . x_q) exactly
    (:func:`causal_hand_two_layer_prediction`), whose only order-dependent part is (eta/N)^2 Q: the same term as
    SGD's at second order, with step eta/N. This is why the order effects of a 2-layer causal model built (or
    trained) to do GD correlate with one-pass SGD's."""
    x = np.asarray(batch.x, np.float64)
    xq = np.asarray(batch.x_query, np.float64)
    y = np.asarray(batch.labels_BxNxO(), np.float64)
    gram = np.einsum("bad,bcd->bac", x, x)
    strict = np.triu(np.ones(gram.shape[1:]), k=1)             # a < b
    s_bxn = np.einsum("bnd,bd->bn", x, xq)                      # x_b . x_q
    q = -np.einsum("bac,ac,bc,bao->bo", gram, strict, s_bxn, y)
    return q if batch.vector_output else q[:, 0]


def sgd_two_demo_order_difference(eta: float, x1: Any, x2: Any, y1: Any, y2: Any, x_q: Any) -> np.ndarray:
    """Exact difference of one-pass SGD's prediction (batch 1, from W = 0) between the orders (1, 2) and (2, 1):
    eta^2 (x1 . x2) (y2 (x1 . x_q) - y1 (x2 . x_q)). Inputs: vectors x (d,), y scalars or (d_out,) (a leading batch
    axis is allowed)."""
    x1, x2, xq = (np.asarray(v, np.float64) for v in (x1, x2, x_q))
    y1, y2 = np.asarray(y1, np.float64), np.asarray(y2, np.float64)
    c = np.sum(x1 * x2, -1)
    a1, a2 = np.sum(x1 * xq, -1), np.sum(x2 * xq, -1)
    if y1.ndim > c.ndim:  # vector outputs
        c, a1, a2 = c[..., None], a1[..., None], a2[..., None]
    return eta**2 * c * (y2 * a1 - y1 * a2)


def causal_hand_two_layer_prediction(batch: TaskBatch, eta: float) -> np.ndarray:
    """The 2-layer causal hand model's prediction in closed form (see :func:`sgd_order_term`), (B,):
    2 (eta/N) sum_t y_t (x_t . x_q) - (eta/N)^2 sum_t sum_{i<=t} y_i (x_i . x_t)(x_t . x_q)."""
    x = np.asarray(batch.x, np.float64)
    xq = np.asarray(batch.x_query, np.float64)
    y = np.asarray(batch.labels_BxNxO(), np.float64)[..., 0]
    c = eta / batch.n_context
    s = np.einsum("bnd,bd->bn", x, xq)
    gram = np.einsum("bad,bcd->bac", x, x)
    lower_eq = np.triu(np.ones(gram.shape[1:]))                  # i <= t
    return 2 * c * np.sum(y * s, -1) - c**2 * np.einsum("bic,ic,bc,bi->b", gram, lower_eq, s, y)


def ordered_order_terms(batch: TaskBatch, perms_BxPxN: Array) -> np.ndarray:
    """:func:`sgd_order_term` of every task under every ordering, (B, P) (scalar outputs)."""
    b, p, _ = perms_BxPxN.shape
    q = sgd_order_term(ordered_batch(batch, perms_BxPxN))
    return q.reshape((b, p) + q.shape[1:])


def shuffled_correlation(a_BxP: Any, b_BxP: Any, key: Array) -> dict[str, float]:
    """The null of :func:`order_correlation`: the same two predictors with the orderings of ``b`` re-paired at random
    within each task (ordering k of ``a`` against a random ordering of ``b``), so any true pairing is destroyed while
    both spreads are kept; expected 0."""
    b = np.asarray(b_BxP, np.float64)
    perm = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, b.shape[1]))(jax.random.split(key, b.shape[0])))
    return order_correlation(a_BxP, np.take_along_axis(b, perm, axis=1))
