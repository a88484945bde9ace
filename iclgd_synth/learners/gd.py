"""K-step gradient descent on the in-context loss L(W) = 1/(2N) sum_i ||W x_i - y_i||^2.

W_{k+1} = W_k - eta_k grad L(W_k), grad L(W) = (1/N) sum_i (W x_i - y_i) x_i^T, from W0 (default 0); the prediction
is W_K x_q. This is the learner that the hand-constructed LSA weights implement exactly (see constructions.py).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import (
    broadcast_schedule, check_schedule, learner_inputs, linear_readout, start_weights,
)
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.validation import check_int


def gd_weights(batch: TaskBatch, eta: Any, steps: int = 1, w0: Array | None = None) -> Array:
    """The GD iterate W_K for each task, (B, d_out, d). ``eta``: scalar or (steps,) per-step step sizes."""
    steps = check_int("steps", steps, min_value=1)
    eta = check_schedule("eta", eta, steps)
    batch, w0 = learner_inputs(batch, w0)
    return _gd_weights(batch, eta, w0, steps=steps)


def gd_predict(batch: TaskBatch, eta: Any, steps: int = 1, w0: Array | None = None) -> Array:
    """Explicit GD's prediction W_K x_q, (B,) (or (B, d_out)), from W0 = ``w0`` (default 0)."""
    steps = check_int("steps", steps, min_value=1)
    eta = check_schedule("eta", eta, steps)
    batch, w0 = learner_inputs(batch, w0)
    return _gd_predict(batch, eta, w0, steps=steps)


@functools.partial(jax.jit, static_argnames=("steps",))
def _gd_weights(batch: TaskBatch, eta: Any, w0_BxOxd: Array | None, *, steps: int) -> Array:
    y_BxNxO, x_BxNxd, n = batch.labels_BxNxO(), batch.x, batch.n_context

    def step(w_BxOxd, eta_k):
        resid_BxNxO = jnp.einsum("bod,bnd->bno", w_BxOxd, x_BxNxd) - y_BxNxO
        grad_BxOxd = jnp.einsum("bno,bnd->bod", resid_BxNxO, x_BxNxd) / n
        return w_BxOxd - eta_k * grad_BxOxd, None

    w, _ = jax.lax.scan(step, start_weights(batch, w0_BxOxd), broadcast_schedule(eta, steps, x_BxNxd.dtype))
    return w


@functools.partial(jax.jit, static_argnames=("steps",))
def _gd_predict(batch: TaskBatch, eta: Any, w0_BxOxd: Array | None, *, steps: int) -> Array:
    return linear_readout(_gd_weights(batch, eta, w0_BxOxd, steps=steps), batch.x_query, batch.vector_output)


@flax.struct.dataclass
class GD:
    """K-step GD as a predictor: ``GD(eta=6.0, steps=1)(batch)``."""

    eta: Any = 1.0
    steps: int = flax.struct.field(pytree_node=False, default=1)
    w0: Any = None

    def __call__(self, batch: TaskBatch) -> Array:
        return gd_predict(batch, self.eta, self.steps, self.w0)
