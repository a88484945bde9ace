"""Shared pieces of the explicit learners: batch preparation, step-size schedules, linear read-out."""

from __future__ import annotations

from typing import Any

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


def step_schedule(name: str, value: Any, steps: int, dtype) -> Array:
    """A scalar or per-step hyper-parameter as a (steps,) array, with clear errors."""
    steps = check_int("steps", steps, min_value=1)
    check_float(name, value)
    arr = jnp.asarray(value, dtype)
    if arr.ndim == 0:
        return jnp.full((steps,), arr)
    if arr.shape != (steps,):
        raise ValueError(f"{name} must be a scalar or have shape (steps,) = ({steps},), got {tuple(arr.shape)}")
    return arr


def linear_readout(w_BxOxd: Array, x_query_Bxd: Array, vector_output: bool) -> Array:
    pred = jnp.einsum("bod,bd->bo", w_BxOxd, x_query_Bxd)
    return pred if vector_output else pred[:, 0]


def check_positive(name: str, value: Any) -> Any:
    if is_concrete(value) and np.any(np.asarray(value) <= 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return check_float(name, value)
