"""Closed-form learners: minimum-norm least squares and ridge regression, per task.

Least squares: w = X^+ y (the Moore-Penrose pseudo-inverse, so N < d gives the minimum-norm interpolant).
Ridge: w = (X^T X + lambda I)^{-1} X^T y; with w ~ N(0, tau^2 I) and noise sigma it is the Bayes posterior mean
for lambda = sigma^2 / tau^2 ("Pretraining task diversity and the emergence of non-Bayesian in-context learning
for regression").
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp

from iclgd_synth.learners._common import Learner, check_positive
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch


@flax.struct.dataclass
class LeastSquares(Learner):
    """Minimum-norm least squares: ``LeastSquares()(batch)``, ``.weights(batch)`` (B, d_out, d)."""

    def solve(self, batch: TaskBatch) -> Array:
        pinv_BxdxN = jnp.linalg.pinv(batch.x)
        return jnp.einsum("bdn,bno->bod", pinv_BxdxN, batch.labels_BxNxO())


@flax.struct.dataclass
class Ridge(Learner):
    """Ridge regression; ``lam = noise^2 / w_scale^2`` is the Bayes-optimal choice.

    Attributes:
      lam: the ridge penalty lambda > 0. Default 1.
    """

    lam: Any = 1.0

    def checked(self, batch: TaskBatch) -> "Ridge":
        return self.replace(lam=check_positive("lam", self.lam))

    def solve(self, batch: TaskBatch) -> Array:
        gram = jnp.einsum("bnd,bne->bde", batch.x, batch.x) + self.lam * jnp.eye(batch.dim, dtype=batch.x.dtype)
        rhs = jnp.einsum("bnd,bno->bdo", batch.x, batch.labels_BxNxO())
        return jnp.swapaxes(jnp.linalg.solve(gram, rhs), -1, -2)
