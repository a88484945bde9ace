"""Closed-form learners: minimum-norm least squares and ridge regression, per task.

Least squares: w = X^+ y (the Moore-Penrose pseudo-inverse, so N < d gives the minimum-norm interpolant).
Ridge: w = (X^T X + lambda I)^{-1} X^T y; with w ~ N(0, tau^2 I) and noise sigma it is the Bayes posterior mean
for lambda = sigma^2 / tau^2 ("Pretraining task diversity and the emergence of non-Bayesian in-context learning
for regression").
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import check_positive, learner_inputs, linear_readout
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch


def least_squares_weights(batch: TaskBatch) -> Array:
    """Minimum-norm least-squares weights per task, (B, d_out, d)."""
    return _least_squares_weights(learner_inputs(batch)[0])


def least_squares_predict(batch: TaskBatch) -> Array:
    return _least_squares_predict(learner_inputs(batch)[0])


def ridge_weights(batch: TaskBatch, lam: Any) -> Array:
    """Ridge weights per task, (B, d_out, d); ``lam`` > 0."""
    lam = check_positive("lam", lam)
    return _ridge_weights(learner_inputs(batch)[0], lam)


def ridge_predict(batch: TaskBatch, lam: Any) -> Array:
    lam = check_positive("lam", lam)
    return _ridge_predict(learner_inputs(batch)[0], lam)


@jax.jit
def _least_squares_weights(batch: TaskBatch) -> Array:
    pinv_BxdxN = jnp.linalg.pinv(batch.x)
    return jnp.einsum("bdn,bno->bod", pinv_BxdxN, batch.labels_BxNxO())


@jax.jit
def _least_squares_predict(batch: TaskBatch) -> Array:
    return linear_readout(_least_squares_weights(batch), batch.x_query, batch.vector_output)


@jax.jit
def _ridge_weights(batch: TaskBatch, lam: Any) -> Array:
    gram = jnp.einsum("bnd,bne->bde", batch.x, batch.x) + lam * jnp.eye(batch.dim, dtype=batch.x.dtype)
    rhs = jnp.einsum("bnd,bno->bdo", batch.x, batch.labels_BxNxO())
    return jnp.swapaxes(jnp.linalg.solve(gram, rhs), -1, -2)


@jax.jit
def _ridge_predict(batch: TaskBatch, lam: Any) -> Array:
    return linear_readout(_ridge_weights(batch, lam), batch.x_query, batch.vector_output)


@flax.struct.dataclass
class LeastSquares:
    """Minimum-norm least squares as a predictor."""

    def __call__(self, batch: TaskBatch) -> Array:
        return least_squares_predict(batch)


@flax.struct.dataclass
class Ridge:
    """Ridge regression as a predictor; ``lam = noise^2 / w_scale^2`` is the Bayes-optimal choice."""

    lam: Any = 1.0

    def __call__(self, batch: TaskBatch) -> Array:
        return ridge_predict(batch, self.lam)
