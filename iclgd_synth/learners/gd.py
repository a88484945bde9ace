"""K-step gradient descent on the in-context loss L(W) = 1/(2N) sum_i ||W x_i - y_i||^2.

W_{k+1} = W_k - eta_k grad L(W_k), grad L(W) = (1/N) sum_i (W x_i - y_i) x_i^T, from W0 (default 0); the prediction
is W_K x_q. This is the learner that the hand-constructed LSA weights implement exactly (see constructions.py).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.learners._common import Learner, broadcast_schedule, check_schedule, start_weights
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.validation import check_int, is_concrete


@flax.struct.dataclass
class GD(Learner):
    """K-step GD: ``GD(eta=6.0, steps=1)(batch)`` predicts, ``.weights(batch)`` gives W_K (B, d_out, d).

    Attributes:
      eta: step size, a scalar or per-step (steps,) array. Default 1.
      steps: K >= 1 (static). Default 1.
      w0: initial weights W0, (d,), (d_out, d) or per task (B, d_out, d); None is zero. Default None.
    """

    eta: Any = 1.0
    steps: int = flax.struct.field(pytree_node=False, default=1)
    w0: Any = None

    def checked(self, batch: TaskBatch) -> "GD":
        steps = check_int("steps", self.steps, min_value=1)
        eta = check_schedule("eta", self.eta, steps)
        if is_concrete(eta) and np.any(np.asarray(eta) < 0):  # a negative step climbs the loss: gradient ascent
            raise ValueError(f"eta must be >= 0 (a gradient-descent step size, scalar or per step), got {self.eta!r}")
        return self.replace(eta=eta)

    def solve(self, batch: TaskBatch) -> Array:
        y_BxNxO, x_BxNxd, n = batch.labels_BxNxO(), batch.x, batch.n_context

        def step(w_BxOxd, eta_k):
            resid_BxNxO = jnp.einsum("bod,bnd->bno", w_BxOxd, x_BxNxd) - y_BxNxO
            grad_BxOxd = jnp.einsum("bno,bnd->bod", resid_BxNxO, x_BxNxd) / n
            return w_BxOxd - eta_k * grad_BxOxd, None

        w, _ = jax.lax.scan(step, start_weights(batch, self.w0),
                            broadcast_schedule(self.eta, self.steps, x_BxNxd.dtype))
        return w
