"""Baselines at every context length: the prediction of y_{n+1} from the first n pairs, for n = 0, 1, ..., N.

Convention (the same as :func:`iclgd_synth.gpt.gpt_forward`, which reads the prediction of y_i at the x_i token):
``baseline(batch)`` returns (B, N + 1) predictions (or (B, N + 1, d_out)); column n is the prediction at
x_{n+1} from (x_1, y_1), ..., (x_n, y_n), where x_{N+1} is the query x_q. So column 0 uses no pair at all (every
baseline then predicts 0, except dMMSE, which gives the pool's mean prediction), the last column equals the
full-context learner's prediction, and the targets are :func:`prefix_targets` = (y_1, ..., y_N, y_q).
``baseline.query(batch)`` is that last column, (B,).

Every baseline is computed for all prefixes at once (cumulative sums of X^T X and X^T y, or masks), never in a
Python loop over n or tasks:

- :class:`PrefixLeastSquares`: w_n = pinv(X_n) y_n, the minimum-norm least-squares fit (an interpolant for n <= d).
- :class:`PrefixRidge`: w_n = (X_n^T X_n + lambda I)^-1 X_n^T y_n. With w ~ N(0, tau^2 I) and Gaussian label
  noise sigma it is the Bayes posterior mean at lambda = sigma^2 / tau^2 (:func:`bayes_ridge_lambda`) whatever the
  input law, since the posterior of w given (X, y) does not involve the law of X ("Pretraining task diversity and
  the emergence of non-Bayesian in-context learning for regression" uses it as the Bayes predictor for fresh tasks).
- :class:`PrefixGD`: K steps of GD on L_n(W) = 1/(2n) sum_{i<=n} ||W x_i - y_i||^2 from W = 0, with a step size
  per prefix (:func:`tune_prefix_gd` tunes it per n on a tuning batch).
- :class:`PrefixZero`, :class:`PrefixAveraging` (w_n = (1/n) sum_{i<=n} y_i x_i),
  :class:`PrefixNearestNeighbours` (mean label of the min(k, n) nearest x_i, k = 3 by default).
- :class:`PrefixDMMSE`: the posterior mean over a finite task pool {W_1, ..., W_M} drawn uniformly,
  sum_m softmax_m(-(1/(2 sigma^2)) sum_{i<=n} ||y_i - W_m x_i||^2) W_m x_{n+1}, accumulated over chunks of the pool
  with a running log-sum-exp, so memory is bounded by the chunk and M = 2^15 or more stays finite.

:func:`prefix_baselines` builds all of them for a :class:`~iclgd_synth.tasks.TaskConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.learners._common import check_hyper, check_positive
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, TaskConfig, task_pool, validate_batch
from iclgd_synth.validation import check_float, check_int


def prefix_targets(batch: TaskBatch) -> Array:
    """The label each column predicts: (y_1, ..., y_N, y_q), (B, N + 1) (or (B, N + 1, d_out))."""
    return jnp.concatenate([batch.y, batch.y_query[:, None]], axis=1)


def prefix_inputs(batch: TaskBatch) -> Array:
    """Where each column's prediction is read: (x_1, ..., x_N, x_q), (B, N + 1, d)."""
    return jnp.concatenate([batch.x, batch.x_query[:, None]], axis=1)


def per_position_half_mse(pred: Any, batch: TaskBatch) -> Array:
    """0.5 * squared error (summed over outputs) averaged over tasks, per column: (N + 1,). ``pred`` is (B, N + 1)
    (or (B, N + 1, d_out)), e.g. a prefix baseline's or :func:`iclgd_synth.gpt.gpt_forward`'s output."""
    batch = validate_batch(batch)
    target = prefix_targets(batch)
    pred = jnp.asarray(pred)
    if pred.shape != target.shape:
        raise ValueError(f"pred must have shape {target.shape} (B, N + 1{', d_out' if batch.vector_output else ''}) "
                         f"for this batch, got {pred.shape}")
    sq = (pred - target) ** 2
    return 0.5 * jnp.mean(sq if sq.ndim == 2 else sq.sum(-1), axis=0)


def _prefix_moments(batch: TaskBatch) -> tuple[Array, Array, Array]:
    """G_n = X_n^T X_n (B, N+1, d, d), C_n = X_n^T Y_n (B, N+1, d, O) and n (N+1,), for n = 0..N."""
    x, y = batch.x, batch.labels_BxNxO()
    b, _, d = x.shape
    o = y.shape[-1]
    g = jnp.cumsum(jnp.einsum("bnd,bne->bnde", x, x), axis=1)
    c = jnp.cumsum(jnp.einsum("bnd,bno->bndo", x, y), axis=1)
    g = jnp.concatenate([jnp.zeros((b, 1, d, d), x.dtype), g], axis=1)
    c = jnp.concatenate([jnp.zeros((b, 1, d, o), x.dtype), c], axis=1)
    return g, c, jnp.arange(batch.n_context + 1)


def _read(w_BxPxdxO: Array, batch: TaskBatch) -> Array:
    return jnp.einsum("bpd,bpdo->bpo", prefix_inputs(batch), w_BxPxdxO)


class PrefixBaseline:
    """Base of the prefix baselines: ``baseline(batch) -> (B, N + 1)`` and ``baseline.query(batch) -> (B,)``.

    Subclasses are ``flax.struct`` dataclasses defining :meth:`predict_all` (pure JAX, (B, N + 1, d_out)) and, when
    they have hyper-parameters, :meth:`checked`. A call validates the batch and the hyper-parameters, then runs
    :meth:`predict_all` under one module-level jit (compiled once per static options and shapes).
    """

    def checked(self, batch: TaskBatch) -> "PrefixBaseline":
        """This baseline with its hyper-parameters validated against ``batch``."""
        return self

    def predict_all(self, batch: TaskBatch) -> Array:
        """Predictions for every prefix length, (B, N + 1, d_out) (pure JAX, traced)."""
        raise NotImplementedError

    def __call__(self, batch: TaskBatch) -> Array:
        batch = validate_batch(batch).replace(w=None)
        out = _jit_predict_all(type(self), self.checked(batch), batch)
        return out if batch.vector_output else out[..., 0]

    def query(self, batch: TaskBatch) -> Array:
        """The full-context prediction of y_q, (B,) (or (B, d_out)): the last column, the learners' call shape."""
        return self(batch)[:, -1]


@functools.partial(jax.jit, static_argnums=0)
def _jit_predict_all(kind: type, baseline: PrefixBaseline, batch: TaskBatch) -> Array:
    # The class is a static argument: in this JAX version two dataclass pytrees of different classes with the same
    # fields compare equal as tree structures, and with the persistent compilation cache on, jit then ran one empty
    # baseline's program for another (PrefixZero returning PrefixAveraging's predictions).
    del kind
    return baseline.predict_all(batch)


@flax.struct.dataclass
class PrefixZero(PrefixBaseline):
    """The zero predictor at every prefix."""

    def predict_all(self, batch: TaskBatch) -> Array:
        return jnp.zeros((batch.batch_size, batch.n_context + 1, batch.out_dim), batch.x.dtype)


@flax.struct.dataclass
class PrefixAveraging(PrefixBaseline):
    """Averaging, w_n = (1/n) sum_{i<=n} y_i x_i (0 for n = 0)."""

    def predict_all(self, batch: TaskBatch) -> Array:
        _, c, n = _prefix_moments(batch)
        return _read(c / jnp.maximum(n, 1)[None, :, None, None].astype(c.dtype), batch)


@flax.struct.dataclass
class PrefixLeastSquares(PrefixBaseline):
    """Minimum-norm least squares, w_n = pinv(X_n) y_n (0 for n = 0).

    The pseudo-inverse of X with its rows after n zeroed is pinv(X_n) padded with zero columns, so one SVD of an
    N x d matrix per task and prefix (``lax.map`` over prefixes bounds memory to one (B, N, d) stack at a time).
    """

    def predict_all(self, batch: TaskBatch) -> Array:
        x, y = batch.x, batch.labels_BxNxO()
        rows = jnp.arange(batch.n_context)

        def one_prefix(n):
            keep_N = (rows < n).astype(x.dtype)
            pinv_BxdxN = jnp.linalg.pinv(x * keep_N[None, :, None])
            return jnp.einsum("bdn,bno->bdo", pinv_BxdxN, y * keep_N[None, :, None])

        w_PxBxdxO = jax.lax.map(one_prefix, jnp.arange(batch.n_context + 1))
        return _read(jnp.moveaxis(w_PxBxdxO, 0, 1), batch)


@flax.struct.dataclass
class PrefixRidge(PrefixBaseline):
    """Ridge at every prefix, w_n = (X_n^T X_n + lam I)^-1 X_n^T y_n (0 for n = 0).

    Attributes:
      lam: the penalty lambda > 0; sigma^2 / tau^2 (:func:`bayes_ridge_lambda`) is the Bayes posterior mean for
        w ~ N(0, tau^2 I) and noise sigma. Default 1.
    """

    lam: Any = 1.0

    def checked(self, batch: TaskBatch) -> "PrefixRidge":
        return self.replace(lam=check_positive("lam", self.lam))

    def predict_all(self, batch: TaskBatch) -> Array:
        g, c, _ = _prefix_moments(batch)
        eye = jnp.eye(batch.dim, dtype=g.dtype)
        return _read(jnp.linalg.solve(g + self.lam * eye, c), batch)


@flax.struct.dataclass
class PrefixGD(PrefixBaseline):
    """K steps of GD from W = 0 on the loss of the first n pairs, for every n (0 for n = 0).

    Attributes:
      eta: step size, a scalar or one per prefix length, shape (N + 1,) (entry n for the first n pairs; entry 0 is
        unused), e.g. :func:`tune_prefix_gd`'s ``eta``. Default 1.
      steps: K >= 1 (static). Default 1.
    """

    eta: Any = 1.0
    steps: int = flax.struct.field(pytree_node=False, default=1)

    def checked(self, batch: TaskBatch) -> "PrefixGD":
        check_int("steps", self.steps, min_value=1)
        eta = check_hyper("eta", self.eta)
        p = batch.n_context + 1
        if tuple(np.shape(eta)) not in ((), (p,)):
            raise ValueError(f"eta must be a scalar or have shape (N + 1,) = ({p},) (one per prefix length "
                             f"0..N), got {tuple(np.shape(eta))}")
        return self.replace(eta=eta)

    def predict_all(self, batch: TaskBatch) -> Array:
        a, b = _gd_moments(batch)
        return _read(_gd_from_moments(a, b, self.eta, self.steps), batch)


def _gd_moments(batch: TaskBatch) -> tuple[Array, Array]:
    """A_n = X_n^T X_n / n (B, N+1, d, d) and b_n = X_n^T Y_n / n (B, N+1, d, O), zero for n = 0."""
    g, c, n = _prefix_moments(batch)
    scale = 1.0 / jnp.maximum(n, 1).astype(g.dtype)
    return g * scale[:, None, None], c * scale[:, None, None]


def _gd_from_moments(a_BxPxdxd: Array, b_BxPxdxO: Array, eta: Any, steps: int) -> Array:
    """W after ``steps`` GD steps from 0 for every prefix, (B, N+1, d, O); ``eta`` a scalar or (N+1,)."""
    eta_P = jnp.broadcast_to(jnp.asarray(eta, a_BxPxdxd.dtype), (a_BxPxdxd.shape[1],))[:, None, None]

    def step(w, _):
        return w - eta_P * (a_BxPxdxd @ w - b_BxPxdxO), None

    w, _ = jax.lax.scan(step, jnp.zeros_like(b_BxPxdxO), None, length=steps)
    return w


@flax.struct.dataclass
class PrefixNearestNeighbours(PrefixBaseline):
    """k-nearest neighbours at every prefix: the mean label of the min(k, n) inputs among x_1..x_n closest to
    x_{n+1} (Euclidean; equal distances go to the earlier pair); 0 for n = 0.

    Attributes:
      k: neighbours (integer >= 1, static). Default 3.
    """

    k: int = flax.struct.field(pytree_node=False, default=3)

    def checked(self, batch: TaskBatch) -> "PrefixNearestNeighbours":
        check_int("k", self.k, min_value=1)
        return self

    def predict_all(self, batch: TaskBatch) -> Array:
        x, y = batch.x, batch.labels_BxNxO()
        n_ctx = batch.n_context
        dist_BxPxN = jnp.sum((prefix_inputs(batch)[:, :, None] - x[:, None]) ** 2, axis=-1)
        seen_PxN = jnp.arange(n_ctx)[None, :] < jnp.arange(n_ctx + 1)[:, None]
        dist_BxPxN = jnp.where(seen_PxN, dist_BxPxN, jnp.inf)
        neg_BxPxk, idx_BxPxk = jax.lax.top_k(-dist_BxPxN, min(self.k, n_ctx))
        use = jnp.isfinite(neg_BxPxk).astype(x.dtype)  # fewer than k pairs seen: only those
        y_BxPxkxO = jnp.take_along_axis(y[:, None], idx_BxPxk[..., None], axis=2)
        total = jnp.einsum("bpk,bpko->bpo", use, y_BxPxkxO)
        return total / jnp.maximum(use.sum(-1), 1.0)[..., None]


@flax.struct.dataclass
class PrefixDMMSE(PrefixBaseline):
    """The posterior mean over a finite task pool at every prefix (the pool's mean prediction for n = 0).

    Attributes:
      pool: task weights (M, d) or (M, d_out, d), e.g. :func:`iclgd_synth.tasks.task_pool`.
      noise: label-noise standard deviation sigma > 0. Default 0.5.
      chunk: pool members handled at once (integer >= 1, static): memory ~ B * chunk * N * d_out numbers.
        Default 256.
    """

    pool: Any
    noise: Any = 0.5
    chunk: int = flax.struct.field(pytree_node=False, default=256)

    def checked(self, batch: TaskBatch) -> "PrefixDMMSE":
        check_int("chunk", self.chunk, min_value=1)
        noise = check_positive("noise", self.noise)
        pool = jnp.asarray(self.pool, batch.x.dtype)
        if pool.ndim == 2:
            pool = pool[:, None]
        if pool.ndim != 3 or pool.shape[0] < 1 or pool.shape[1:] != (batch.out_dim, batch.dim):
            raise ValueError(f"pool must have shape (M, d) or (M, d_out, d) with M >= 1, d = {batch.dim}, "
                             f"d_out = {batch.out_dim}; got {tuple(jnp.shape(self.pool))}")
        return self.replace(pool=pool, noise=noise)

    def predict_all(self, batch: TaskBatch) -> Array:
        pool_MxOxd = self.pool
        m_total, o, d = pool_MxOxd.shape
        chunk = min(self.chunk, m_total)
        n_chunks = -(-m_total // chunk)
        pad = n_chunks * chunk - m_total
        pool_CxKxOxd = jnp.concatenate([pool_MxOxd, jnp.zeros((pad, o, d), pool_MxOxd.dtype)]).reshape(
            n_chunks, chunk, o, d)
        real_CxK = (jnp.arange(n_chunks * chunk) < m_total).reshape(n_chunks, chunk)
        x, y, xr = batch.x, batch.labels_BxNxO(), prefix_inputs(batch)
        b, p, dtype = batch.batch_size, batch.n_context + 1, x.dtype
        inv_two_var = 1.0 / (2.0 * jnp.asarray(self.noise, dtype) ** 2)

        def add_chunk(carry, inp):
            top_BxP, total_BxP, num_BxPxO = carry
            w_KxOxd, real_K = inp
            resid_BxKxN = jnp.sum((jnp.einsum("kod,bnd->bkno", w_KxOxd, x) - y[:, None]) ** 2, axis=-1)
            sq_BxKxP = jnp.concatenate([jnp.zeros((b, chunk, 1), dtype), jnp.cumsum(resid_BxKxN, axis=-1)], -1)
            logit_BxKxP = jnp.where(real_K[None, :, None], -sq_BxKxP * inv_two_var, -jnp.inf)
            new_top = jnp.maximum(top_BxP, logit_BxKxP.max(axis=1))
            decay = jnp.exp(top_BxP - new_top)
            weight_BxKxP = jnp.exp(logit_BxKxP - new_top[:, None])
            pred_BxKxPxO = jnp.einsum("kod,bpd->bkpo", w_KxOxd, xr)
            total_BxP = total_BxP * decay + weight_BxKxP.sum(axis=1)
            num_BxPxO = num_BxPxO * decay[..., None] + jnp.einsum("bkp,bkpo->bpo", weight_BxKxP, pred_BxKxPxO)
            return (new_top, total_BxP, num_BxPxO), None

        # The first chunk always holds real members, so the running maximum is finite after it.
        init = (jnp.full((b, p), jnp.finfo(dtype).min, dtype), jnp.zeros((b, p), dtype), jnp.zeros((b, p, o), dtype))
        (_, total, num), _ = jax.lax.scan(add_chunk, init, (pool_CxKxOxd, real_CxK))
        return num / total[..., None]


# ------------------------------------------------------------------------------------------------ tuning and building

@dataclasses.dataclass(frozen=True)
class PrefixTuned:
    """Step sizes tuned per prefix length and the half-MSE they reach on the tuning batch, both (N + 1,) NumPy
    arrays (entry 0, no pairs: eta 0 and the loss of predicting 0)."""

    eta: np.ndarray
    loss: np.ndarray


def tune_prefix_gd(batch: TaskBatch, steps: int = 1, *, n_grid: int = 48, rounds: int = 4) -> PrefixTuned:
    """The constant step size of K-step GD that minimises the half-MSE of column n on ``batch``, for every n.

    A log-spaced grid of ``n_grid`` step sizes per prefix over [1e-2, 10^2.5] / mean(trace(X_n^T X_n / n)), then
    ``rounds - 1`` linear refinements between the best point's neighbours, all prefixes at once (each picks its own
    eta; vmapped over the grid, one compilation). Diverging step sizes (non-finite loss) count as +inf.
    """
    steps = check_int("steps", steps, min_value=1)
    n_grid = check_int("n_grid", n_grid, min_value=3)
    rounds = check_int("rounds", rounds, min_value=1)
    batch = validate_batch(batch).replace(w=None)
    for name in ("x", "y", "x_query", "y_query"):
        if not bool(np.all(np.isfinite(np.asarray(getattr(batch, name))))):
            raise ValueError(f"the tuning batch has non-finite values in {name}; tune on finite tasks")
    x = np.asarray(batch.x, np.float64)
    p = batch.n_context + 1
    n = np.arange(p)
    mean_trace = np.concatenate([[0.0], np.cumsum(np.mean(np.sum(x**2, axis=-1), axis=0)) / n[1:]])
    scale = np.where(n > 0, 1.0 / np.maximum(mean_trace, np.finfo(np.float64).tiny), 0.0)
    etas = scale[None, :] * np.logspace(-2.0, 2.5, n_grid)[:, None]  # (G, P)
    best_eta, best_loss = np.zeros(p), np.full(p, np.inf)
    for _ in range(rounds):
        losses = np.asarray(_grid_losses(jnp.asarray(etas, batch.x.dtype), batch, steps=steps), np.float64)
        losses = np.where(np.isfinite(losses), losses, np.inf)
        i = np.argmin(losses, axis=0)
        cols = np.arange(p)
        better = losses[i, cols] < best_loss
        best_eta = np.where(better, etas[i, cols], best_eta)
        best_loss = np.where(better, losses[i, cols], best_loss)
        lo = etas[np.maximum(i - 1, 0), cols]
        hi = etas[np.minimum(i + 1, n_grid - 1), cols]
        etas = lo[None, :] + (hi - lo)[None, :] * np.linspace(0.0, 1.0, n_grid)[:, None]
    if not np.all(np.isfinite(best_loss[1:])):
        bad = [int(k) for k in np.nonzero(~np.isfinite(best_loss))[0]]
        raise FloatingPointError(f"tune_prefix_gd: every step size diverged for prefix lengths {bad}")
    best_eta[0] = 0.0
    return PrefixTuned(eta=best_eta, loss=best_loss)


@functools.partial(jax.jit, static_argnames=("steps",))
def _grid_losses(etas_GxP: Array, batch: TaskBatch, steps: int) -> Array:
    """Half-MSE per prefix for every row of step sizes, (G, N+1)."""
    target = prefix_targets(batch)
    target = target if batch.vector_output else target[..., None]
    a, b = _gd_moments(batch)  # once for the whole grid

    def one(eta_P):
        err = _read(_gd_from_moments(a, b, eta_P, steps), batch) - target
        return 0.5 * jnp.mean(jnp.sum(err**2, axis=-1), axis=0)

    return jax.lax.map(one, etas_GxP, batch_size=8)


def bayes_ridge_lambda(config: TaskConfig) -> float:
    """lambda = sigma^2 / tau^2 = noise^2 / w_scale^2 for ``config``'s task law (0 for noiseless tasks, where the
    posterior mean is the minimum-norm interpolant, i.e. least squares). Ridge at this lambda is the Bayes predictor
    for fresh tasks whatever ``x_dist`` and ``x_scale`` are; not with a task pool (then dMMSE is) nor with
    ``label_corruption`` (the labels are then not w . x plus Gaussian noise)."""
    if not isinstance(config, TaskConfig):
        raise TypeError(f"config must be an iclgd_synth.TaskConfig, got {type(config).__name__}")
    check_float("w_scale", config.w_scale, min_value=0.0, strict_min=True)
    return float(config.noise) ** 2 / float(config.w_scale) ** 2


def prefix_baselines(config: TaskConfig, tuning_batch: TaskBatch | None = None, *, gd_steps: tuple[int, ...] = (1,),
                     k: int = 3, dmmse_chunk: int = 256) -> dict[str, PrefixBaseline]:
    """Every baseline for ``config``'s tasks, by name: "zero", "averaging", "nearest_neighbours" (k), "least_squares",
    "ridge" (the Bayes lambda; only with noise > 0: without noise the Bayes predictor is least squares), "gd_K" for
    each K in ``gd_steps`` with eta tuned per prefix on ``tuning_batch`` (required when ``gd_steps`` is non-empty;
    draw it independently of the evaluation tasks), and "dmmse" when ``config.pool_size`` is set (needs noise > 0).
    """
    lam = bayes_ridge_lambda(config)
    k = check_int("k", k, min_value=1)
    check_int("dmmse_chunk", dmmse_chunk, min_value=1)
    gd_steps = tuple(check_int("gd_steps[i]", s, min_value=1) for s in gd_steps)
    out: dict[str, PrefixBaseline] = {"zero": PrefixZero(), "averaging": PrefixAveraging(),
                                      "nearest_neighbours": PrefixNearestNeighbours(k=k),
                                      "least_squares": PrefixLeastSquares()}
    if lam > 0:
        out["ridge"] = PrefixRidge(lam=lam)
    if gd_steps and tuning_batch is None:
        raise ValueError("tuning_batch is needed to tune GD per prefix (gd_steps is non-empty); pass tasks drawn "
                         "like the evaluation tasks, or gd_steps=()")
    for s in gd_steps:
        out[f"gd_{s}"] = PrefixGD(eta=tune_prefix_gd(tuning_batch, s).eta, steps=s)
    if config.pool_size is not None:
        if config.noise <= 0:
            raise ValueError("dMMSE needs label noise > 0 (its posterior divides by sigma^2); got noise = 0 with "
                             f"pool_size = {config.pool_size}")
        out["dmmse"] = PrefixDMMSE(pool=task_pool(config), noise=config.noise, chunk=dmmse_chunk)
    return out
