"""Heavy-ball gradient descent on the in-context loss.

W_{k+1} = W_k - eta grad L(W_k) + mu (W_k - W_{k-1}), W_{-1} = W_0 (so the first step is plain GD).
"Why Can GPT Learn In-Context?" relates momentum to attention that also sums exponentially decayed past values.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import initial_weights, linear_readout, prepare, step_schedule
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch


def momentum_gd_weights(batch: TaskBatch, eta: Any, mu: Any, steps: int = 1, w0: Array | None = None) -> Array:
    """Heavy-ball iterate W_K, (B, d_out, d); ``eta`` and ``mu`` scalars or (steps,) arrays."""
    batch, y_BxNxO, _ = prepare(batch)
    etas = step_schedule("eta", eta, steps, batch.x.dtype)
    mus = step_schedule("mu", mu, steps, batch.x.dtype)
    x, n = batch.x, batch.n_context

    def step(carry, hp):
        w, w_prev = carry
        eta_k, mu_k = hp
        grad = jnp.einsum("bno,bnd->bod", jnp.einsum("bod,bnd->bno", w, x) - y_BxNxO, x) / n
        return (w - eta_k * grad + mu_k * (w - w_prev), w), None

    w_init = initial_weights(batch, w0)
    (w, _), _ = jax.lax.scan(step, (w_init, w_init), (etas, mus))
    return w


def momentum_gd_predict(batch: TaskBatch, eta: Any, mu: Any, steps: int = 1, w0: Array | None = None) -> Array:
    batch, _, _ = prepare(batch)
    return linear_readout(momentum_gd_weights(batch, eta, mu, steps, w0), batch.x_query, batch.vector_output)


@flax.struct.dataclass
class MomentumGD:
    """Heavy-ball GD as a predictor."""

    eta: Any = 1.0
    mu: Any = 0.9
    steps: int = flax.struct.field(pytree_node=False, default=1)
    w0: Any = None

    def __call__(self, batch: TaskBatch) -> Array:
        return momentum_gd_predict(batch, self.eta, self.mu, self.steps, self.w0)
