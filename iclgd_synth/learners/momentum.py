"""Heavy-ball gradient descent on the in-context loss.

W_{k+1} = W_k - eta grad L(W_k) + mu (W_k - W_{k-1}), W_{-1} = W_0 (so the first step is plain GD).
"Why Can GPT Learn In-Context?" relates momentum to attention that also sums exponentially decayed past values.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import Learner, broadcast_schedule, check_schedule, start_weights
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.validation import check_int


@flax.struct.dataclass
class MomentumGD(Learner):
    """Heavy-ball GD: ``MomentumGD(eta, mu, steps)(batch)``; ``.weights(batch)`` gives W_K (B, d_out, d).

    Attributes:
      eta: step size, scalar or (steps,). Default 1.
      mu: momentum, scalar or (steps,). Default 0.9.
      steps: K >= 1 (static). Default 1.
      w0: initial weights (as for :class:`~iclgd_synth.learners.gd.GD`); None is zero. Default None.
    """

    eta: Any = 1.0
    mu: Any = 0.9
    steps: int = flax.struct.field(pytree_node=False, default=1)
    w0: Any = None

    def checked(self, batch: TaskBatch) -> "MomentumGD":
        steps = check_int("steps", self.steps, min_value=1)
        return self.replace(eta=check_schedule("eta", self.eta, steps), mu=check_schedule("mu", self.mu, steps))

    def solve(self, batch: TaskBatch) -> Array:
        x, y_BxNxO, n = batch.x, batch.labels_BxNxO(), batch.n_context

        def step(carry, hp):
            w, w_prev = carry
            eta_k, mu_k = hp
            grad = jnp.einsum("bno,bnd->bod", jnp.einsum("bod,bnd->bno", w, x) - y_BxNxO, x) / n
            return (w - eta_k * grad + mu_k * (w - w_prev), w), None

        w_init = start_weights(batch, self.w0)
        hps = (broadcast_schedule(self.eta, self.steps, x.dtype), broadcast_schedule(self.mu, self.steps, x.dtype))
        (w, _), _ = jax.lax.scan(step, (w_init, w_init), hps)
        return w
