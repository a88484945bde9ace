"""The regression loss used everywhere: half mean squared error on the query, 0.5 * mean ||y_hat - y_q||^2."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from iclgd_synth.shapes import Array


def half_mse(pred: Array, target: Array) -> Array:
    """0.5 * mean over tasks of the squared error, summed over output dimensions ((B,) or (B, d_out) inputs)."""
    sq = _squared_error(pred, target)
    return 0.5 * jnp.mean(sq if sq.ndim == 1 else sq.sum(-1))


def per_task_half_se(pred: Array, target: Array) -> Array:
    """0.5 * squared error per task, (B,)."""
    sq = _squared_error(pred, target)
    return 0.5 * (sq if sq.ndim == 1 else sq.sum(-1))


def _squared_error(pred: Array, target: Array) -> Array:
    # Equal shapes required: broadcasting (B,) against (B, 1) would silently average a (B, B) grid of errors.
    if np.shape(pred) != np.shape(target):
        raise ValueError(f"pred and target must have the same shape, got pred {np.shape(pred)} and target "
                         f"{np.shape(target)}")
    return (jnp.asarray(pred) - jnp.asarray(target)) ** 2
