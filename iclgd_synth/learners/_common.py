"""Shared pieces of the explicit learners: the :class:`Learner` base, batch preparation, schedules, read-out.

Every learner is one class (a ``flax.struct`` dataclass: real hyper-parameters are pytree leaves, integer options
such as ``steps`` are static). Its ``checked(batch)`` validates the hyper-parameters in Python (shapes, ranges, finite
concrete values); its ``solve(batch)`` computes the weights W (B, d_out, d) as pure JAX; ``learner.weights(batch)``
and ``learner(batch)`` run that core under one module-level ``jax.jit`` with the learner as a traced argument, so an
eager call compiles once per static configuration and shapes and one compilation serves every step size; under an
outer jit / vmap the core is inlined (hyper-parameters may then be tracers, whose values the checks skip).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, validate_batch
from iclgd_synth.tokens import as_batched_weights
from iclgd_synth.validation import check_float, check_int, is_concrete


def prepare(batch: TaskBatch) -> tuple[TaskBatch, Array, Array]:
    """Validated batch, its labels as (B, N, O) and query labels as (B, O)."""
    batch = validate_batch(batch)
    return batch, batch.labels_BxNxO(), batch.query_labels_BxO()


def initial_weights(batch: TaskBatch, w0: Array | None) -> Array:
    """W0 as (B, O, d); zero when None."""
    b, o, d = batch.batch_size, batch.out_dim, batch.dim
    if w0 is None:
        return jnp.zeros((b, o, d), batch.x.dtype)
    return as_batched_weights(jnp.asarray(w0, batch.x.dtype), b, o, d)


def check_hyper(name: str, value: Any) -> Any:
    """Check a real hyper-parameter (finite when concrete); lists and tuples become NumPy arrays (one jit leaf)."""
    check_float(name, value)
    return np.asarray(value) if isinstance(value, (list, tuple)) else value


def check_schedule(name: str, value: Any, steps: int) -> Any:
    """Check a scalar or per-step (steps,) hyper-parameter, ``steps`` an int >= 1 already checked."""
    value = check_hyper(name, value)
    shape = tuple(np.shape(value))
    if shape not in ((), (steps,)):
        raise ValueError(f"{name} must be a scalar or have shape (steps,) = ({steps},), got {shape}")
    return value


def broadcast_schedule(value: Any, steps: int, dtype) -> Array:
    """A checked scalar or (steps,) hyper-parameter as a (steps,) array (used inside the jitted cores)."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (steps,))


def step_schedule(name: str, value: Any, steps: int, dtype) -> Array:
    """A scalar or per-step hyper-parameter as a (steps,) array, with clear errors."""
    steps = check_int("steps", steps, min_value=1)
    return broadcast_schedule(check_schedule(name, value, steps), steps, dtype)


def learner_inputs(batch: TaskBatch, w0: Array | None = None) -> tuple[TaskBatch, Array | None]:
    """The validated batch without its task weights (a jitted core needs no ``w``) and W0 as (B, O, d) or None."""
    batch = validate_batch(batch)
    w0 = None if w0 is None else initial_weights(batch, w0)
    return batch.replace(w=None), w0


def start_weights(batch: TaskBatch, w0_BxOxd: Array | None) -> Array:
    """Inside a jitted core: W0 given by :func:`learner_inputs`, or zeros."""
    if w0_BxOxd is None:
        return jnp.zeros((batch.batch_size, batch.out_dim, batch.dim), batch.x.dtype)
    return w0_BxOxd


def linear_readout(w_BxOxd: Array, x_query_Bxd: Array, vector_output: bool) -> Array:
    pred = jnp.einsum("bod,bd->bo", w_BxOxd, x_query_Bxd)
    return pred if vector_output else pred[:, 0]


class Learner:
    """Base of the explicit learners: ``learner(batch) -> (B,)`` predictions and ``learner.weights(batch)``.

    Subclasses are ``flax.struct`` dataclasses that define :meth:`solve` (and :meth:`checked` when they have
    hyper-parameters to validate); learners with an initial model have a ``w0`` field (None: zero).
    """

    def checked(self, batch: TaskBatch) -> "Learner":
        """This learner with its hyper-parameters validated against ``batch`` (lists become arrays)."""
        return self

    def solve(self, batch: TaskBatch) -> Array:
        """The learned weights, (B, d_out, d) (pure JAX, traced)."""
        raise NotImplementedError

    def readout(self, batch: TaskBatch) -> Array:
        """The prediction for the query, (B,) (or (B, d_out) for vector outputs); W x_q by default."""
        return linear_readout(self.solve(batch), batch.x_query, batch.vector_output)

    def _prepare(self, batch: TaskBatch) -> tuple["Learner", TaskBatch]:
        w0 = getattr(self, "w0", None)
        batch, w0 = learner_inputs(batch, w0)
        learner = self.checked(batch)
        if hasattr(learner, "w0"):
            learner = learner.replace(w0=w0)
        return learner, batch

    def weights(self, batch: TaskBatch) -> Array:
        learner, batch = self._prepare(batch)
        return _jit_solve(type(learner), learner, batch)

    def __call__(self, batch: TaskBatch) -> Array:
        learner, batch = self._prepare(batch)
        return _jit_readout(type(learner), learner, batch)


# The class is a static argument: two learner classes whose pytrees have the same fields (e.g. two without any)
# can compare equal as tree structures, and jit would then reuse one class's compiled program for the other.
@functools.partial(jax.jit, static_argnums=0)
def _jit_solve(kind: type, learner: Learner, batch: TaskBatch) -> Array:
    del kind
    return learner.solve(batch)


@functools.partial(jax.jit, static_argnums=0)
def _jit_readout(kind: type, learner: Learner, batch: TaskBatch) -> Array:
    del kind
    return learner.readout(batch)


def check_positive(name: str, value: Any) -> Any:
    """A finite real > 0 (scalar or array; tracers pass); lists and tuples become NumPy arrays."""
    value = check_hyper(name, value)
    if is_concrete(value) and np.any(np.asarray(value) <= 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value
