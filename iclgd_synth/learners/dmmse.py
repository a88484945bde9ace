"""dMMSE: the Bayes posterior mean when tasks come from a finite pool {w_1, ..., w_M}.

w_hat = sum_m softmax_m( -(1 / (2 sigma^2)) sum_j ||y_j - W_m x_j||^2 ) W_m
("Pretraining task diversity and the emergence of non-Bayesian in-context learning for regression").
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import Learner, check_positive
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch


@flax.struct.dataclass
class DMMSE(Learner):
    """dMMSE: ``DMMSE(pool, noise)(batch)``.

    Attributes:
      pool: the task pool, (M, d) or (M, d_out, d) (e.g. from :func:`iclgd_synth.tasks.task_pool`).
      noise: the label-noise standard deviation sigma > 0. Default 0.5.
    """

    pool: Any
    noise: Any = 0.5

    def checked(self, batch: TaskBatch) -> "DMMSE":
        noise = check_positive("noise", self.noise)
        pool = jnp.asarray(self.pool, batch.x.dtype)
        if pool.ndim == 2:
            pool = pool[:, None]
        if pool.ndim != 3 or pool.shape[1:] != (batch.out_dim, batch.dim):
            raise ValueError(f"pool must have shape (M, d) or (M, d_out, d) with d = {batch.dim}, "
                             f"d_out = {batch.out_dim}; got {tuple(pool.shape)}")
        return self.replace(pool=pool, noise=noise)

    def solve(self, batch: TaskBatch) -> Array:
        pool_MxOxd = self.pool
        pred_BxMxNxO = jnp.einsum("mod,bnd->bmno", pool_MxOxd, batch.x)
        sq_BxM = jnp.sum((pred_BxMxNxO - batch.labels_BxNxO()[:, None]) ** 2, axis=(-1, -2))
        post_BxM = jax.nn.softmax(-sq_BxM / (2 * self.noise**2), axis=-1)
        return jnp.einsum("bm,mod->bod", post_BxM, pool_MxOxd)
