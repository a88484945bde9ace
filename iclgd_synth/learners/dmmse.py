"""dMMSE: the Bayes posterior mean when tasks come from a finite pool {w_1, ..., w_M}.

w_hat = sum_m softmax_m( -(1 / (2 sigma^2)) sum_j ||y_j - W_m x_j||^2 ) W_m
("Pretraining task diversity and the emergence of non-Bayesian in-context learning for regression").
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import check_positive, learner_inputs, linear_readout
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch


def dmmse_weights(batch: TaskBatch, pool: Array, noise: Any) -> Array:
    """Posterior-mean weights per task, (B, d_out, d). ``pool``: (M, d) or (M, d_out, d); ``noise`` sigma > 0."""
    batch, pool, noise = _check_dmmse(batch, pool, noise)
    return _dmmse_weights(batch, pool, noise)


def dmmse_predict(batch: TaskBatch, pool: Array, noise: Any) -> Array:
    batch, pool, noise = _check_dmmse(batch, pool, noise)
    return _dmmse_predict(batch, pool, noise)


def _check_dmmse(batch: TaskBatch, pool: Array, noise: Any) -> tuple[TaskBatch, Array, Any]:
    noise = check_positive("noise", noise)
    batch, _ = learner_inputs(batch)
    pool = jnp.asarray(pool, batch.x.dtype)
    if pool.ndim == 2:
        pool = pool[:, None]
    if pool.ndim != 3 or pool.shape[1:] != (batch.out_dim, batch.dim):
        raise ValueError(f"pool must have shape (M, d) or (M, d_out, d) with d = {batch.dim}, "
                         f"d_out = {batch.out_dim}; got {tuple(pool.shape)}")
    return batch, pool, noise


@jax.jit
def _dmmse_weights(batch: TaskBatch, pool_MxOxd: Array, noise: Any) -> Array:
    pred_BxMxNxO = jnp.einsum("mod,bnd->bmno", pool_MxOxd, batch.x)
    sq_BxM = jnp.sum((pred_BxMxNxO - batch.labels_BxNxO()[:, None]) ** 2, axis=(-1, -2))
    post_BxM = jax.nn.softmax(-sq_BxM / (2 * noise**2), axis=-1)
    return jnp.einsum("bm,mod->bod", post_BxM, pool_MxOxd)


@jax.jit
def _dmmse_predict(batch: TaskBatch, pool_MxOxd: Array, noise: Any) -> Array:
    return linear_readout(_dmmse_weights(batch, pool_MxOxd, noise), batch.x_query, batch.vector_output)


@flax.struct.dataclass
class DMMSE:
    """dMMSE as a predictor (``pool`` from :func:`iclgd_synth.tasks.task_pool`)."""

    pool: Any
    noise: Any = 0.5

    def __call__(self, batch: TaskBatch) -> Array:
        return dmmse_predict(batch, self.pool, self.noise)
