"""The regression loss used everywhere: half mean squared error on the query, 0.5 * mean ||y_hat - y_q||^2."""

from __future__ import annotations

import jax.numpy as jnp

from iclgd_synth.shapes import Array


def half_mse(pred: Array, target: Array) -> Array:
    """0.5 * mean over tasks of the squared error, summed over output dimensions ((B,) or (B, d_out) inputs)."""
    sq = (pred - target) ** 2
    return 0.5 * jnp.mean(sq if sq.ndim == 1 else sq.sum(-1))


def per_task_half_se(pred: Array, target: Array) -> Array:
    """0.5 * squared error per task, (B,)."""
    sq = (pred - target) ** 2
    return 0.5 * (sq if sq.ndim == 1 else sq.sum(-1))
