"""Hyper-parameter tuning of the explicit learners on a batch of tasks (the reference paper's line search).

- :func:`tune_gd` for K-step GD from W0 = 0 is exact: the prediction is a polynomial of degree K in eta,

      y_hat(eta) = sum_{m=1..K} (-1)^(m-1) C(K, m) eta^m  x_q^T A^(m-1) b,   A = X^T X / N,  b = X^T y / N

  (expand W_K = sum_{k<K} eta (I - eta A)^k b and sum over k with the hockey-stick identity), so the half-MSE is a
  polynomial of degree 2K whose minimiser is among the real roots of its derivative. One pass over the tasks, in
  float64 NumPy, then a check with the real learner.
  A polynomial of degree 2K is ill-conditioned for many steps (at K = 20 its coefficients span dozens of orders of
  magnitude and the roots are wrong even in float64), so the exact method is used up to :data:`EXACT_MAX_STEPS`
  steps and its answer is checked against the real learner's loss; beyond that, or if the check fails, the step
  size is found by :func:`tune`.
- :func:`tune` works for any learner whose hyper-parameters are fields (GD, GD++, SGD, Adam, momentum GD, ridge,
  ...): a grid over a bracket, widened while the best point sits on its upper edge, then refined around the best
  point (:func:`grid_search`: ``jax.lax.map`` over vmapped chunks, so memory stays bounded).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.losses import half_mse
from iclgd_synth.tasks import TaskBatch, validate_batch
from iclgd_synth.validation import check_choice, check_float, check_int


#: Largest K for which :func:`tune_gd` minimises the loss polynomial exactly (degree 2K = 12).
EXACT_MAX_STEPS = 6


@dataclasses.dataclass(frozen=True)
class Tuned:
    """Best hyper-parameters found and the loss they reach on the tuning batch."""

    params: dict[str, float]
    loss: float

    @property
    def eta(self) -> float:
        return self.params["eta"]

    def to_dict(self) -> dict[str, Any]:
        return {**self.params, "loss": self.loss}


def gd_loss_polynomial(batch: TaskBatch, steps: int) -> np.ndarray:
    """Coefficients (lowest degree first, length 2K + 1) of the half-MSE of K-step GD as a polynomial in eta."""
    steps = check_int("steps", steps, min_value=1)
    batch = validate_batch(batch)
    x = np.asarray(batch.x, np.float64)
    y = np.asarray(batch.labels_BxNxO(), np.float64)
    xq = np.asarray(batch.x_query, np.float64)
    n = x.shape[1]
    a = np.einsum("bnd,bne->bde", x, x) / n
    v = np.einsum("bnd,bno->bdo", x, y) / n  # A^(m-1) b, starting at m = 1
    coef = [-np.asarray(batch.query_labels_BxO(), np.float64)]  # c_0 = -y_q: the polynomial is y_hat - y_q
    for m in range(1, steps + 1):
        coef.append((-1) ** (m - 1) * math.comb(steps, m) * np.einsum("bd,bdo->bo", xq, v))
        v = np.einsum("bde,beo->bdo", a, v)
    c = np.stack(coef, axis=-1)  # (B, O, K + 1)
    gram = np.einsum("bom,bon->mn", c, c) / c.shape[0]
    loss = np.zeros(2 * steps + 1)
    for i in range(steps + 1):
        loss[i: i + steps + 1] += 0.5 * gram[i]
    return loss


def tune_gd(batch: TaskBatch, steps: int = 1, *, method: str = "auto", eta_max: float | None = None,
            n_grid: int = 64, rounds: int = 4) -> Tuned:
    """Best constant step size for K-step GD from W0 = 0 on ``batch`` and its half-MSE.

    ``method="exact"`` minimises the loss polynomial (K <= :data:`EXACT_MAX_STEPS`); ``"grid"`` uses :func:`tune` on
    [0, eta_max] (widened when the best eta is at the edge and ``eta_max`` was not given); ``"auto"`` (default) is
    exact where it is reliable and falls back on the grid when K is larger or the polynomial's loss at its minimiser
    disagrees with the real learner's (relative 1e-3).
    """
    from iclgd_synth.learners.gd import GD

    check_choice("method", method, ("auto", "exact", "grid"))
    steps = check_int("steps", steps, min_value=1)
    if eta_max is not None:
        eta_max = float(check_float("eta_max", eta_max, min_value=0.0, strict_min=True))
    n_grid = check_int("n_grid", n_grid, min_value=3)
    rounds = check_int("rounds", rounds, min_value=1)
    batch = validate_batch(batch)
    _check_finite_batch(batch)
    if method == "exact" and steps > EXACT_MAX_STEPS:
        raise ValueError(f"method='exact' is reliable for steps <= {EXACT_MAX_STEPS} (a degree-{2 * steps} polynomial "
                         f"has inaccurate roots); got steps={steps}: use method='auto' or 'grid'")
    if method in ("auto", "exact") and steps <= EXACT_MAX_STEPS:
        poly = gd_loss_polynomial(batch, steps)
        roots = np.roots(np.polyder(poly[::-1]))
        cands = [0.0] + [r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r)) and r.real > 0]
        if eta_max is not None:
            cands = [c for c in cands if c <= eta_max] + [float(eta_max)]
        values = np.polyval(poly[::-1], cands)
        i = int(np.argmin(values))
        eta = float(cands[i])
        loss = float(half_mse(GD(eta=eta, steps=steps)(batch), batch.y_query))
        if method == "exact" or abs(loss - values[i]) <= 1e-3 * max(abs(values[i]), 1e-12):
            return Tuned({"eta": eta}, loss)
    fixed = eta_max is not None
    bound = float(eta_max) if fixed else 4.0 * _eta_scale(batch)
    return tune(GD(eta=1.0, steps=steps), batch, {"eta": (0.0, bound)}, widen=not fixed, n_grid=n_grid,
                rounds=rounds)


def tune(learner: Any, batch: TaskBatch, bounds: dict[str, tuple[float, float]], *, widen: bool = True,
         max_widen: int = 4, n_grid: int = 32, rounds: int = 3, chunk: int = 64) -> Tuned:
    """Best values of ``learner``'s fields named in ``bounds`` for the half-MSE on ``batch``.

    ``learner`` is any pytree predictor whose hyper-parameters are fields (``learner.replace(eta=...)``), e.g.
    ``tune(SGD(epochs=1), batch, {"eta": (0, 6)})``. With ``widen`` the upper end of a bracket whose best point lies
    on it is multiplied by 4 (up to ``max_widen`` times) before the refinement, so a bracket that was too narrow is
    not silently returned as the optimum. Diverging values (non-finite loss) count as +inf.
    """
    if not hasattr(learner, "replace"):
        raise TypeError(f"tune needs a learner with fields (a flax.struct dataclass such as GD), got "
                        f"{type(learner).__name__}")
    batch = validate_batch(batch)

    def loss_fn(p, b):
        return half_mse(learner.replace(**p)(b), b.y_query)

    box = {k: tuple(map(float, v)) for k, v in bounds.items()}
    for _ in range(max_widen if widen else 0):
        coarse = grid_search(loss_fn, box, data=batch, n_grid=n_grid, rounds=1, chunk=chunk)
        at_edge = [k for k in box if coarse.params[k] >= box[k][1] - 1e-12 * max(1.0, abs(box[k][1]))]
        if not at_edge:
            break
        box = {k: (lo, hi * 4.0 if k in at_edge else hi) for k, (lo, hi) in box.items()}
    return grid_search(loss_fn, box, data=batch, n_grid=n_grid, rounds=rounds, chunk=chunk)


def _check_finite_batch(batch: TaskBatch) -> None:
    for name in ("x", "y", "x_query", "y_query"):
        v = getattr(batch, name, None)
        if v is not None and not bool(np.all(np.isfinite(np.asarray(v)))):
            raise ValueError(f"the tuning batch has non-finite values in {name}; tune on finite tasks")


def tune_gdpp(batch: TaskBatch, steps: int = 1, *, n_grid: int = 24, rounds: int = 4) -> Tuned:
    """Best constant (eta, gamma) for K-step GD++ on ``batch`` (:func:`tune` on a bracket from the data's scale)."""
    from iclgd_synth.learners.gdpp import GDPlusPlus

    steps = check_int("steps", steps, min_value=1)
    n_grid = check_int("n_grid", n_grid, min_value=3)
    rounds = check_int("rounds", rounds, min_value=1)
    batch = validate_batch(batch)
    _check_finite_batch(batch)
    eta_scale = _eta_scale(batch)
    gamma_max = 1.0 / float(np.mean(np.sum(np.asarray(batch.x, np.float64) ** 2, axis=(1, 2))) / batch.dim)
    return tune(GDPlusPlus(eta=1.0, gamma=0.0, steps=steps), batch,
                {"eta": (0.0, 4.0 * eta_scale), "gamma": (0.0, gamma_max)}, widen=False, n_grid=n_grid,
                rounds=rounds)


def grid_search(loss_fn: Callable[[dict[str, Any], Any], Any], bounds: dict[str, tuple[float, float]], *,
                data: Any = None, n_grid: int = 32, rounds: int = 3, chunk: int = 64) -> Tuned:
    """Minimise ``loss_fn(params, data) -> scalar`` over a box by a grid refined around its best point.

    ``data`` (a pytree, e.g. the tuning TaskBatch) is passed as a jit argument rather than closed over, so XLA does
    not constant-fold it.

    Each round evaluates ``n_grid`` points per axis (all combinations), vmapped in chunks of ``chunk`` points, then
    shrinks the box to two grid cells around the best point. NaN losses count as +inf.
    """
    n_grid = check_int("n_grid", n_grid, min_value=3)
    rounds = check_int("rounds", rounds, min_value=1)
    chunk = check_int("chunk", chunk, min_value=1)
    names = list(bounds)
    if not names:
        raise ValueError("bounds must name at least one parameter")
    for name, box in bounds.items():
        if np.shape(box) != (2,):
            raise ValueError(f"bounds[{name!r}] must be a pair (lo, hi), got {box!r}")
        lo, hi = (check_float(f"bounds[{name!r}]", v) for v in box)
        if not hi > lo:
            raise ValueError(f"bounds[{name!r}] must be finite with hi > lo, got {(lo, hi)}")

    @jax.jit
    def evaluate(points_PxA, data):
        return jax.lax.map(lambda p: loss_fn(dict(zip(names, p)), data), points_PxA, batch_size=chunk)

    box = {k: tuple(map(float, v)) for k, v in bounds.items()}
    best, best_loss = None, math.inf
    for _ in range(rounds):
        axes = [np.linspace(*box[k], n_grid) for k in names]
        points = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=-1)
        losses = np.asarray(evaluate(jnp.asarray(points), data), np.float64)
        losses = np.where(np.isfinite(losses), losses, np.inf)
        i = int(np.argmin(losses))
        if losses[i] < best_loss:
            best, best_loss = points[i], float(losses[i])
        if best is None:
            raise FloatingPointError("grid_search: every grid point gave a non-finite loss")
        for k, ax, c in zip(names, axes, best):
            step = ax[1] - ax[0]
            box[k] = (max(bounds[k][0], c - 2 * step), c + 2 * step)
    return Tuned({k: float(v) for k, v in zip(names, best)}, best_loss)


def _eta_scale(batch: TaskBatch) -> float:
    """1 / (mean eigenvalue of X^T X / N): the step size scale of GD on this batch."""
    x = np.asarray(batch.x, np.float64)
    return float(1.0 / (np.mean(np.sum(x**2, axis=(1, 2))) / (x.shape[1] * x.shape[2])))
