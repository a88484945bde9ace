"""Heavy-ball gradient descent on the in-context loss.

W_{k+1} = W_k - eta grad L(W_k) + mu (W_k - W_{k-1}), W_{-1} = W_0 (so the first step is plain GD).
"Why Can GPT Learn In-Context?" relates momentum to attention that also sums exponentially decayed past values.
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


def momentum_gd_weights(batch: TaskBatch, eta: Any, mu: Any, steps: int = 1, w0: Array | None = None) -> Array:
    """Heavy-ball iterate W_K, (B, d_out, d); ``eta`` and ``mu`` scalars or (steps,) arrays."""
    steps = check_int("steps", steps, min_value=1)
    eta = check_schedule("eta", eta, steps)
    mu = check_schedule("mu", mu, steps)
    batch, w0 = learner_inputs(batch, w0)
    return _momentum_weights(batch, eta, mu, w0, steps=steps)


def momentum_gd_predict(batch: TaskBatch, eta: Any, mu: Any, steps: int = 1, w0: Array | None = None) -> Array:
    steps = check_int("steps", steps, min_value=1)
    eta = check_schedule("eta", eta, steps)
    mu = check_schedule("mu", mu, steps)
    batch, w0 = learner_inputs(batch, w0)
    return _momentum_predict(batch, eta, mu, w0, steps=steps)


@functools.partial(jax.jit, static_argnames=("steps",))
def _momentum_weights(batch: TaskBatch, eta: Any, mu: Any, w0_BxOxd: Array | None, *, steps: int) -> Array:
    x, y_BxNxO, n = batch.x, batch.labels_BxNxO(), batch.n_context

    def step(carry, hp):
        w, w_prev = carry
        eta_k, mu_k = hp
        grad = jnp.einsum("bno,bnd->bod", jnp.einsum("bod,bnd->bno", w, x) - y_BxNxO, x) / n
        return (w - eta_k * grad + mu_k * (w - w_prev), w), None

    w_init = start_weights(batch, w0_BxOxd)
    hps = (broadcast_schedule(eta, steps, x.dtype), broadcast_schedule(mu, steps, x.dtype))
    (w, _), _ = jax.lax.scan(step, (w_init, w_init), hps)
    return w


@functools.partial(jax.jit, static_argnames=("steps",))
def _momentum_predict(batch: TaskBatch, eta: Any, mu: Any, w0_BxOxd: Array | None, *, steps: int) -> Array:
    w = _momentum_weights(batch, eta, mu, w0_BxOxd, steps=steps)
    return linear_readout(w, batch.x_query, batch.vector_output)


@flax.struct.dataclass
class MomentumGD:
    """Heavy-ball GD as a predictor."""

    eta: Any = 1.0
    mu: Any = 0.9
    steps: int = flax.struct.field(pytree_node=False, default=1)
    w0: Any = None

    def __call__(self, batch: TaskBatch) -> Array:
        return momentum_gd_predict(batch, self.eta, self.mu, self.steps, self.w0)
