"""Synthetic linear-regression tasks for in-context learning.

A task is a weight vector ``w`` and ``N`` context pairs ``(x_i, y_i = w . x_i + noise)`` plus one query pair.
Sampling is a pure function of a PRNG key and a hashable :class:`TaskConfig`, jit-compiled with the config static,
so ``sample(jax.random.fold_in(key, step), config, batch_size)`` gives the same tasks on every run and backend.

The reference paper ("Transformers learn in-context by gradient descent") samples ``x ~ U(-0.5, 0.5)^d`` in its
released code although its text says ``U(-1, 1)``; both are available through ``x_range`` (the half-width ``a`` of
``U(-a, a)``), and the ``vonoswald`` preset uses ``a = 0.5``, which is the one that matches the paper's numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth import rng
from iclgd_synth.shapes import Array, PRNGKey
from iclgd_synth.validation import (check_choice, check_float, check_int, check_key, check_memory, check_shape,
                                    format_bytes, is_concrete)

X_DISTRIBUTIONS = ("uniform", "normal", "anisotropic", "laplace", "exponential")


@flax.struct.dataclass
class TaskBatch:
    """A batch of regression tasks. All fields are arrays (NumPy or JAX, float32 or float64); nested Python lists are
    accepted too and become arrays on validation (:meth:`create` validates at construction).

    Attributes:
      x: context inputs, (B, N, d).
      y: context labels, (B, N), or (B, N, d_out) for vector outputs.
      x_query: query inputs, (B, d).
      y_query: query labels, (B,), or (B, d_out).
      w: the task weights, (B, d) or (B, d_out, d); ``None`` when unknown.
    """

    x: Array
    y: Array
    x_query: Array
    y_query: Array
    w: Array | None = None

    @property
    def batch_size(self) -> int:
        return int(np.shape(self.x)[0])

    @property
    def n_context(self) -> int:
        return int(np.shape(self.x)[1])

    @property
    def dim(self) -> int:
        return int(np.shape(self.x)[2])

    @property
    def out_dim(self) -> int:
        return 1 if np.ndim(self.y) == 2 else int(np.shape(self.y)[2])

    @property
    def vector_output(self) -> bool:
        """True for (B, N, d_out) labels; predictions then have shape (B, d_out) rather than (B,)."""
        return np.ndim(self.y) == 3

    @classmethod
    def create(cls, x: Any, y: Any, x_query: Any, y_query: Any, w: Any = None) -> "TaskBatch":
        """A validated batch from arrays or nested lists: shapes checked now, JAX arrays of one float dtype."""
        return validate_batch(cls(x=x, y=y, x_query=x_query, y_query=y_query, w=w))

    def validated(self) -> "TaskBatch":
        """Check shapes (clear errors naming the field) and return a copy with JAX arrays of one float dtype."""
        return validate_batch(self)

    def labels_BxNxO(self) -> Array:
        """Context labels with an explicit output axis, (B, N, d_out)."""
        return self.y if self.vector_output else self.y[..., None]

    def query_labels_BxO(self) -> Array:
        return self.y_query if self.vector_output else self.y_query[..., None]

    def with_context_order(self, perm: Array) -> "TaskBatch":
        """The same tasks with the demonstrations reordered: ``perm`` is (N,) or (B, N) indices, each row a
        permutation of 0..N-1 (checked when concrete: an out-of-range index would be clamped by JAX indexing, and a
        repeated one would drop a demonstration and duplicate another)."""
        if is_concrete(perm):
            check_permutation("perm", perm, self.n_context, self.batch_size)
        perm = jnp.asarray(perm)
        if perm.ndim == 1:
            return self.replace(x=self.x[:, perm], y=self.y[:, perm])
        take = jax.vmap(lambda a, p: a[p])
        return self.replace(x=take(self.x, perm), y=take(self.y, perm))

    def slice(self, start: int, stop: int) -> "TaskBatch":
        """Tasks ``start:stop`` of the batch."""
        return jax.tree.map(lambda a: a[start:stop], self)


_FIELDS = ("x", "y", "x_query", "y_query", "w")


def check_permutation(name: str, perm: Any, n: int, batch_size: int) -> None:
    """Raise unless ``perm`` is (N,) or (B, N) integers whose every row is a permutation of 0..N-1."""
    arr = np.asarray(perm)
    if arr.shape not in ((n,), (batch_size, n)):
        raise ValueError(f"{name} must have shape (N,) = ({n},) or (B, N) = {(batch_size, n)}, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"{name} must hold integer indices (a permutation of 0..{n - 1}), got dtype {arr.dtype}")
    rows = arr.reshape(-1, n)
    bad = np.flatnonzero(np.any(np.sort(rows, axis=1) != np.arange(n), axis=1))
    if bad.size:
        row = rows[bad[0]]
        where = "" if arr.ndim == 1 else f" (row {int(bad[0])})"
        out = row[(row < 0) | (row >= n)]
        why = (f"index {int(out[0])} is outside 0..{n - 1}" if out.size else
               f"index {int(next(v for v in row if np.sum(row == v) > 1))} is repeated, so another demonstration "
               "would be dropped")
        raise ValueError(f"{name} must be a permutation of 0..{n - 1} (each demonstration exactly once){where}: {why}")


def _as_array(name: str, value: Any) -> Any:
    """A field as an array: JAX arrays and tracers kept, anything else (nested lists, scalars) through NumPy."""
    if not isinstance(value, (jax.Array, jax.core.Tracer, np.ndarray)):
        try:
            value = np.asarray(value)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"batch.{name} must be a rectangular array, got {type(value).__name__}: {e}") from None
    if jnp.issubdtype(value.dtype, jnp.complexfloating):
        raise TypeError(f"batch.{name} must hold real numbers, got complex dtype {value.dtype} (its imaginary part "
                        "would be dropped); pass the real part explicitly (np.real) if that is what you mean")
    if not (jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(value.dtype, jnp.bool_)):
        raise TypeError(f"batch.{name} must hold real numbers, got dtype {value.dtype}")
    return value


def validate_batch(batch: TaskBatch) -> TaskBatch:
    """Shape-check a batch and convert it to JAX arrays of a common float dtype."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be an iclgd_synth.TaskBatch, got {type(batch).__name__}")
    # Fields one by one: jax.tree.map would walk into nested Python lists instead of treating them as arrays.
    batch = TaskBatch(**{f: None if getattr(batch, f) is None else _as_array(f, getattr(batch, f)) for f in _FIELDS})
    if np.ndim(batch.x) != 3:
        raise ValueError(f"batch.x must have shape (B, N, d), got {np.shape(batch.x)}")
    b, n, d = np.shape(batch.x)
    if b < 1 or n < 1 or d < 1:
        raise ValueError(f"batch.x must have B, N, d >= 1, got shape {(b, n, d)}")
    if np.ndim(batch.y) == 2:
        check_shape("batch.y", batch.y, (b, n), "(B, N)")
        check_shape("batch.y_query", batch.y_query, (b,), "(B,)")
        w_shape: tuple[int, ...] = (b, d)
    elif np.ndim(batch.y) == 3:
        o = np.shape(batch.y)[2]
        check_shape("batch.y", batch.y, (b, n, o), "(B, N, d_out)")
        check_shape("batch.y_query", batch.y_query, (b, o), "(B, d_out)")
        w_shape = (b, o, d)
    else:
        raise ValueError(f"batch.y must have shape (B, N) or (B, N, d_out), got {np.shape(batch.y)}")
    check_shape("batch.x_query", batch.x_query, (b, d), "(B, d)")
    if batch.w is not None:
        check_shape("batch.w", batch.w, w_shape, "(B, d)" if len(w_shape) == 2 else "(B, d_out, d)")
    leaves = [batch.x, batch.y, batch.x_query, batch.y_query] + ([] if batch.w is None else [batch.w])
    dtype = jnp.result_type(*[jax.dtypes.canonicalize_dtype(a.dtype) for a in leaves], jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return TaskBatch(**{f: None if getattr(batch, f) is None else jnp.asarray(getattr(batch, f), dtype)
                        for f in _FIELDS})


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """How tasks are drawn. Hashable, so it can be a static argument of jitted functions.

    Attributes:
      dim: input dimension d (>= 1). Default 10.
      n_context: context pairs N per task (>= 1). Default 10.
      out_dim: output dimension d_out (>= 1); 1 gives (B, N) labels, more gives (B, N, d_out). Default 1.
      x_dist: input law: "uniform" U(-a, a)^d, "normal" N(0, I), "anisotropic" N(0, Sigma), "laplace" (unit scale),
        "exponential" (rate 1). Default "uniform".
      x_range: half-width a of the uniform law (unitless). Default 0.5 (the reference code's U(-0.5, 0.5)).
      x_cov: covariance Sigma for "anisotropic", a d x d symmetric positive-definite matrix (nested tuples or array).
        Default None: built from ``condition_number``.
      condition_number: ratio of largest to smallest eigenvalue of Sigma when ``x_cov`` is None; eigenvalues are
        log-spaced with mean 1 and the eigenbasis is a random rotation drawn from ``cov_seed``. Default 10.
      cov_seed: seed of that rotation. Default 0.
        ``x_cov``, ``condition_number`` and ``cov_seed`` only shape the "anisotropic" law: setting any of them to a
        non-default value with another ``x_dist`` raises ValueError instead of being silently ignored.
      w_scale: tau, the standard deviation of each entry of w ~ N(0, tau^2 I). Default 1.
      noise: sigma, the standard deviation of Gaussian label noise (context and query). Default 0.
      x_scale: multiplies every input after sampling (out-of-distribution tests), > 0 (0 would make every input
        and label 0). Default 1.
      pool_size: M, the number of tasks in a finite pool (tasks drawn uniformly from it), or None for fresh tasks.
      pool_seed: seed of the pool, independent of the sampling key. Default 0.
      label_corruption: fraction of context labels replaced by labels of an independent task (same marginal law).
    """

    dim: int = 10
    n_context: int = 10
    out_dim: int = 1
    x_dist: str = "uniform"
    x_range: float = 0.5
    x_cov: Any = None
    condition_number: float = 10.0
    cov_seed: int = 0
    w_scale: float = 1.0
    noise: float = 0.0
    x_scale: float = 1.0
    pool_size: int | None = None
    pool_seed: int = 0
    label_corruption: float = 0.0

    def __post_init__(self):
        check_int("dim", self.dim, min_value=1)
        check_int("n_context", self.n_context, min_value=1)
        check_int("out_dim", self.out_dim, min_value=1)
        check_choice("x_dist", self.x_dist, X_DISTRIBUTIONS)
        check_float("x_range", self.x_range, min_value=0.0, strict_min=True)
        check_float("condition_number", self.condition_number, min_value=1.0)
        check_int("cov_seed", self.cov_seed, min_value=0)
        check_float("w_scale", self.w_scale, min_value=0.0)
        check_float("noise", self.noise, min_value=0.0)
        check_float("x_scale", self.x_scale, min_value=0.0, strict_min=True)
        if self.pool_size is not None:
            check_int("pool_size", self.pool_size, min_value=1)
        check_int("pool_seed", self.pool_seed, min_value=0)
        check_float("label_corruption", self.label_corruption, min_value=0.0, max_value=1.0)
        if self.x_dist != "anisotropic":  # these only shape the anisotropic law: refuse them rather than ignore
            defaults = {f.name: f.default for f in dataclasses.fields(TaskConfig)}
            given = {"x_cov": self.x_cov is not None, "condition_number": self.condition_number != defaults[
                "condition_number"], "cov_seed": self.cov_seed != defaults["cov_seed"]}
            set_names = [n for n, is_set in given.items() if is_set]
            if set_names:
                name = set_names[0]
                shown = "a matrix" if name == "x_cov" else repr(getattr(self, name))
                raise ValueError(f"{name} is only used with x_dist='anisotropic' (got x_dist={self.x_dist!r} and "
                                 f"{name} = {shown}); set x_dist='anisotropic' or leave {name} out")
        if self.x_cov is not None:
            cov = np.asarray(self.x_cov, dtype=np.float64)
            check_shape("x_cov", cov, (self.dim, self.dim), "(d, d)")
            if not np.allclose(cov, cov.T) or np.linalg.eigvalsh(cov).min() <= 0:
                raise ValueError("x_cov must be a symmetric positive-definite (d, d) matrix")
            # Stored as nested tuples so the config stays hashable (a static jit argument).
            object.__setattr__(self, "x_cov", tuple(map(tuple, cov.tolist())))

    def replace(self, **changes) -> "TaskConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Named task presets. ``vonoswald``: d = N = 10, x ~ U(-0.5, 0.5), w ~ N(0, I), noiseless (the reference paper).
#: ``raventos``: d = 8, K = 16 points, sigma^2 = 0.25, Gaussian inputs (the task-diversity paper).
TASK_PRESETS: dict[str, TaskConfig] = {
    "vonoswald": TaskConfig(dim=10, n_context=10, x_dist="uniform", x_range=0.5),
    "vonoswald_paper_text": TaskConfig(dim=10, n_context=10, x_dist="uniform", x_range=1.0),
    "raventos": TaskConfig(dim=8, n_context=16, x_dist="normal", noise=0.5),
}


def task_config(n_context: int, dim: int, **options) -> TaskConfig:
    """Build a :class:`TaskConfig`; an unknown option raises TypeError listing the accepted ones."""
    names = {f.name for f in dataclasses.fields(TaskConfig)} - {"dim", "n_context"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown task option(s) {unknown}; accepted: {sorted(names)}")
    return TaskConfig(dim=dim, n_context=n_context, **options)


def sample_tasks(key: PRNGKey, batch_size: int, n_context: int, dim: int, **options) -> TaskBatch:
    """Draw ``batch_size`` tasks with ``n_context`` demonstrations in dimension ``dim``.

    ``options`` are the fields of :class:`TaskConfig` (x_dist, x_range, w_scale, noise, pool_size, ...), plus
    ``dtype`` (default: JAX's default float, float64 when x64 is enabled). Jit-compiled; same key, same tasks.
    """
    dtype = check_dtype(options.pop("dtype", None))
    config = task_config(n_context, dim, **options)
    return sample(key, config, check_int("batch_size", batch_size, min_value=1), dtype=dtype)


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_dtype(dtype: Any) -> Any:
    """``None`` (JAX's default float) or one of :data:`FLOAT_DTYPES` as a NumPy dtype; TypeError otherwise."""
    if dtype is None:
        return None
    accepted = f"dtype must be a float dtype ({', '.join(FLOAT_DTYPES[:-1])} or {FLOAT_DTYPES[-1]}) or None"
    try:
        dt = jnp.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{accepted}, got {dtype!r}") from None
    if dt.name not in FLOAT_DTYPES:
        raise TypeError(f"{accepted}, got {dt.name}")
    return dt


#: Real-valued TaskConfig fields passed to the compiled sampler as traced values, so sweeping them (out-of-distribution
#: tests, noise levels) reuses one compilation. Only whether noise / corruption are on at all is static.
_TRACED_FIELDS = ("x_range", "w_scale", "noise", "x_scale", "label_corruption")


def sample(key: PRNGKey, config: TaskConfig, batch_size: int, dtype: Any = None, *, first: int = 0) -> TaskBatch:
    """Draw a :class:`TaskBatch` for ``config``; the jit-compiled core of :func:`sample_tasks`.

    ``key`` is one PRNG key (``jax.random.PRNGKey(seed)``); a batch that cannot fit in this machine's memory is
    refused before anything is drawn (MemoryError with the estimate). ``first``: the tasks are tasks ``first`` ..
    ``first + batch_size - 1`` of ``key``'s stream, the same tasks as those rows of a larger batch drawn from the
    same key (a large batch can be drawn in parts, on several devices).
    """
    check_key("key", key)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    first = check_int("first", first, min_value=0, max_value=2 ** 32 - 1 - batch_size)
    check_sample_memory(config, batch_size, dtype)
    values = {f: getattr(config, f) for f in _TRACED_FIELDS}
    static = config.replace(x_range=1.0, w_scale=1.0, x_scale=1.0, noise=float(config.noise > 0),
                            label_corruption=0.5 * (config.label_corruption > 0))
    return _sample(key, static, values, batch_size, check_dtype(dtype), first)


@functools.partial(jax.jit, static_argnames=("config", "batch_size", "dtype", "first"))
def _sample(key: PRNGKey, config: TaskConfig, values: dict, batch_size: int, dtype: Any = None,
            first: int = 0) -> TaskBatch:
    dtype = dtype if dtype is not None else jnp.zeros(()).dtype
    n, o = config.n_context, config.out_dim
    with rng.fixed_mode():
        pool = None if config.pool_size is None else task_pool(config, dtype, values["w_scale"])
        # Task i from fold_in(key, i) alone: the same task whatever the batch size or device (see iclgd_synth.rng).
        x_all, y_all, w = jax.vmap(lambda k: _draw_task(k, config, values, pool, dtype))(
            rng.index_keys(key, batch_size, first))
    if o == 1:
        y_all, w = y_all[..., 0], w[:, 0]
    return TaskBatch(x=x_all[:, :n], y=y_all[:, :n], x_query=x_all[:, n], y_query=y_all[:, n], w=w)


def _draw_task(key: PRNGKey, config: TaskConfig, values: dict, pool: Array | None, dtype) -> tuple[Array, ...]:
    """One task: inputs (N+1, d), labels (N+1, O) and weights (O, d), each part from its own ``fold_in`` key."""
    n, d, o = config.n_context, config.dim, config.out_dim
    # One flat draw reshaped is faster on CPU than drawing a shaped array.
    x = _draw_inputs(rng.derive(key, rng.INPUTS), config, values["x_range"], (n + 1) * d, dtype).reshape(n + 1, d)
    x = x * values["x_scale"]
    k_w = rng.derive(key, rng.WEIGHTS)
    if pool is None:
        w = values["w_scale"] * jax.random.normal(k_w, (o * d,), dtype).reshape(o, d)
    else:
        w = pool[jax.random.randint(k_w, (), 0, config.pool_size)]
    y = x @ w.T
    if config.noise > 0:
        y = y + values["noise"] * jax.random.normal(rng.derive(key, rng.NOISE), ((n + 1) * o,), dtype).reshape(n + 1, o)
    if config.label_corruption > 0:
        w_other = values["w_scale"] * jax.random.normal(rng.derive(key, rng.CORRUPTION_WEIGHTS), (o * d,),
                                                        dtype).reshape(o, d)
        replace = jax.random.bernoulli(rng.derive(key, rng.CORRUPTION), values["label_corruption"], (n, 1))
        y = y.at[:n].set(jnp.where(replace, x[:n] @ w_other.T, y[:n]))
    return x, y, w


def _itemsize(dtype: Any) -> int:
    return (jnp.zeros(()).dtype if dtype is None else check_dtype(dtype)).itemsize


def pool_bytes(config: TaskConfig, dtype: Any = None) -> int:
    """Memory of the pool of task weights (0 without a pool)."""
    return 0 if config.pool_size is None else config.pool_size * config.out_dim * config.dim * _itemsize(dtype)


def sample_bytes(config: TaskConfig, batch_size: int, dtype: Any = None) -> int:
    """A lower bound on the memory of ``batch_size`` tasks drawn by :func:`sample`: inputs and labels (drawn, then
    sliced: twice) and the task weights; the pool (:func:`pool_bytes`) not included."""
    n, d, o = config.n_context, config.dim, config.out_dim
    return batch_size * (2 * (n + 1) * (d + o) + o * d) * _itemsize(dtype)


def check_sample_memory(config: TaskConfig, batch_size: int, dtype: Any = None) -> None:
    """Refuse a batch (or a task pool) that cannot fit in this machine's memory, naming the parameter."""
    _check_pool_memory(config, dtype)
    check_memory(f"batch_size = {batch_size} tasks of N = {config.n_context} pairs in d = {config.dim} "
                 f"({format_bytes(sample_bytes(config, 1, dtype))} per task)",
                 sample_bytes(config, batch_size, dtype) + pool_bytes(config, dtype),
                 "draw fewer tasks at a time (in chunks, with jax.random.fold_in(key, i) for chunk i)")


def _check_pool_memory(config: TaskConfig, dtype: Any) -> None:
    if config.pool_size is not None:
        check_memory(f"pool_size = {config.pool_size} (a pool of {config.pool_size} x {config.out_dim} x "
                     f"{config.dim} task weights)", pool_bytes(config, dtype),
                     "use a smaller pool_size, or pool_size=None for fresh tasks")


def task_pool(config: TaskConfig, dtype: Any = None, w_scale: Any = None) -> Array:
    """The finite pool of task weights, (M, d_out, d), drawn from ``config.pool_seed`` alone.

    Pools are nested: task m is drawn from ``fold_in(PRNGKey(pool_seed), m)`` alone, so the pool of size M is the first
    M tasks of any larger pool with the same seed (a sweep over pool sizes adds tasks, it does not redraw them)."""
    if config.pool_size is None:
        raise ValueError("task_pool needs a config with pool_size set (an integer >= 1)")
    dtype = jnp.zeros(()).dtype if dtype is None else check_dtype(dtype)
    _check_pool_memory(config, dtype)
    keys = rng.index_keys(rng.seed_key(config.pool_seed), config.pool_size)
    shape = (config.out_dim * config.dim,)
    with rng.fixed_mode():
        w = jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)
    return (config.w_scale if w_scale is None else w_scale) * w.reshape(-1, config.out_dim, config.dim)


def _coordinate_variance(config: TaskConfig) -> float | None:
    """Variance of one input coordinate for the i.i.d. laws (before ``x_scale``); None for the anisotropic law."""
    return {"uniform": config.x_range**2 / 3.0, "normal": 1.0, "laplace": 2.0, "exponential": 1.0}.get(config.x_dist)


def input_covariance(config: TaskConfig, dtype: Any = None) -> Array:
    """Covariance of one input vector under ``config`` (before ``x_scale``), (d, d)."""
    dtype = jnp.zeros(()).dtype if dtype is None else check_dtype(dtype)
    variance = _coordinate_variance(config)
    if variance is not None:
        return jnp.eye(config.dim, dtype=dtype) * variance
    factor = _anisotropic_factor(config, dtype)
    return factor @ factor.T


def input_mean(config: TaskConfig) -> float:
    """Mean of every input coordinate under ``config`` (before ``x_scale``): 1 for the exponential law (rate 1), 0
    for the other laws."""
    return 1.0 if config.x_dist == "exponential" else 0.0


def input_second_moment(config: TaskConfig) -> float:
    """Mean over coordinates of E[x_j^2] under ``config``, ``x_scale`` included: trace(covariance) / d plus the
    squared mean. Uniform U(-a, a): a^2 / 3; normal: 1; Laplace (unit scale): 2; exponential (rate 1): 2 (variance 1
    plus squared mean 1); anisotropic N(0, Sigma): trace(Sigma) / d."""
    variance = _coordinate_variance(config)
    if variance is None:  # anisotropic: from the covariance matrix
        variance = float(np.trace(np.asarray(input_covariance(config), np.float64))) / config.dim
    return float((variance + input_mean(config) ** 2) * config.x_scale**2)


def _anisotropic_factor(config: TaskConfig, dtype) -> Array:
    """A square root L of the anisotropic law's covariance (x = L z, z ~ N(0, I)), computed in float64 NumPy from
    the config alone, so the law does not depend on the dtype the tasks are drawn in."""
    d = config.dim
    if config.x_cov is not None:
        return jnp.asarray(np.linalg.cholesky(np.asarray(config.x_cov, np.float64)), dtype)
    eig = np.logspace(0.0, -np.log10(config.condition_number), d)
    eig = eig * d / eig.sum()
    q, r = np.linalg.qr(np.random.default_rng(config.cov_seed).standard_normal((d, d)))
    q = q * np.sign(np.diagonal(r))  # a Haar-distributed rotation
    return jnp.asarray(q * np.sqrt(eig), dtype)


def _draw_inputs(key: PRNGKey, config: TaskConfig, x_range: Any, size: int, dtype) -> Array:
    if config.x_dist == "uniform":
        return x_range * jax.random.uniform(key, (size,), dtype, -1.0, 1.0)
    if config.x_dist == "normal":
        return jax.random.normal(key, (size,), dtype)
    if config.x_dist == "laplace":
        return jax.random.laplace(key, (size,), dtype)
    if config.x_dist == "exponential":
        return jax.random.exponential(key, (size,), dtype)
    z = jax.random.normal(key, (size // config.dim, config.dim), dtype)
    return (z @ _anisotropic_factor(config, dtype).T).reshape(-1)


