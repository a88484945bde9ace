"""dMMSE: the Bayes posterior mean when tasks come from a finite pool {w_1, ..., w_M}.

w_hat = sum_m softmax_m( -(1 / (2 sigma^2)) sum_j ||y_j - W_m x_j||^2 ) W_m
("Pretraining task diversity and the emergence of non-Bayesian in-context learning for regression").
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import check_positive, linear_readout, prepare
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch


def dmmse_weights(batch: TaskBatch, pool: Array, noise: Any) -> Array:
    """Posterior-mean weights per task, (B, d_out, d). ``pool``: (M, d) or (M, d_out, d); ``noise`` sigma > 0."""
    check_positive("noise", noise)
    batch, y_BxNxO, _ = prepare(batch)
    pool = jnp.asarray(pool, batch.x.dtype)
    if pool.ndim == 2:
        pool = pool[:, None]
    if pool.ndim != 3 or pool.shape[1:] != (batch.out_dim, batch.dim):
        raise ValueError(f"pool must have shape (M, d) or (M, d_out, d) with d = {batch.dim}, "
                         f"d_out = {batch.out_dim}; got {tuple(pool.shape)}")
    pred_BxMxNxO = jnp.einsum("mod,bnd->bmno", pool, batch.x)
    sq_BxM = jnp.sum((pred_BxMxNxO - y_BxNxO[:, None]) ** 2, axis=(-1, -2))
    post_BxM = jax.nn.softmax(-sq_BxM / (2 * noise**2), axis=-1)
    return jnp.einsum("bm,mod->bod", post_BxM, pool)


def dmmse_predict(batch: TaskBatch, pool: Array, noise: Any) -> Array:
    batch, _, _ = prepare(batch)
    return linear_readout(dmmse_weights(batch, pool, noise), batch.x_query, batch.vector_output)


@flax.struct.dataclass
class DMMSE:
    """dMMSE as a predictor (``pool`` from :func:`iclgd_synth.tasks.task_pool`)."""

    pool: Any
    noise: Any = 0.5

    def __call__(self, batch: TaskBatch) -> Array:
        return dmmse_predict(batch, self.pool, self.noise)
