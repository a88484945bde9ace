"""GD++: gradient descent that also transforms the inputs at every step.

From "Transformers learn in-context by gradient descent" (section on GD++): at step k, with X_k the d x N matrix of
the current context inputs and r^k the current residual targets (r^0 = y),

    Delta w_k = (eta_k / N) X_k r^k        prediction += Delta w_k . x_q^k       r^{k+1} = r^k - X_k^T Delta w_k
    X_{k+1} = (I - gamma_k X_k X_k^T) X_k   x_q^{k+1} = (I - gamma_k X_k X_k^T) x_q^k

With gamma = 0 this is plain GD from W0 = 0. The transformation (I - gamma X X^T) acts as a preconditioner that
improves the conditioning of X X^T, which is why trained recurrent models that learn it beat plain GD. The
prediction is linear in x_q: x_q^k = T_k x_q with T_k the product of the transformations so far, so the implicit
weights are W = sum_k Delta w_k T_k (what :meth:`GDPlusPlus.weights` returns).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import Learner, broadcast_schedule, check_schedule
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.validation import check_int


@flax.struct.dataclass
class GDPlusPlus(Learner):
    """GD++: ``GDPlusPlus(eta=..., gamma=..., steps=2)(batch)``.

    Attributes:
      eta: step size, scalar or (steps,). Default 1.
      gamma: input-transformation strength, scalar or (steps,); 0 gives plain GD. Default 0.
      steps: K >= 1 (static). Default 1.
    """

    eta: Any = 1.0
    gamma: Any = 0.0
    steps: int = flax.struct.field(pytree_node=False, default=1)

    def checked(self, batch: TaskBatch) -> "GDPlusPlus":
        steps = check_int("steps", self.steps, min_value=1)
        return self.replace(eta=check_schedule("eta", self.eta, steps), gamma=check_schedule("gamma", self.gamma, steps))

    def _scan(self, batch: TaskBatch, track_transform: bool):
        dtype, n, d = batch.x.dtype, batch.n_context, batch.dim

        def step(carry, hp):
            x_BxNxd, xq_Bxd, r_BxNxO, pred_BxO, t_Bxdxd, w_BxOxd = carry
            eta_k, gamma_k = hp
            dw_BxOxd = eta_k / n * jnp.einsum("bno,bnd->bod", r_BxNxO, x_BxNxd)
            pred_BxO = pred_BxO + jnp.einsum("bod,bd->bo", dw_BxOxd, xq_Bxd)
            r_BxNxO = r_BxNxO - jnp.einsum("bod,bnd->bno", dw_BxOxd, x_BxNxd)
            gram_Bxdxd = jnp.einsum("bnd,bne->bde", x_BxNxd, x_BxNxd)
            x_new = x_BxNxd - gamma_k * jnp.einsum("bde,bne->bnd", gram_Bxdxd, x_BxNxd)
            xq_new = xq_Bxd - gamma_k * jnp.einsum("bde,be->bd", gram_Bxdxd, xq_Bxd)
            if track_transform:
                w_BxOxd = w_BxOxd + jnp.einsum("bod,bde->boe", dw_BxOxd, t_Bxdxd)
                t_Bxdxd = t_Bxdxd - gamma_k * jnp.einsum("bde,bef->bdf", gram_Bxdxd, t_Bxdxd)
            return (x_new, xq_new, r_BxNxO, pred_BxO, t_Bxdxd, w_BxOxd), None

        hps = (broadcast_schedule(self.eta, self.steps, dtype), broadcast_schedule(self.gamma, self.steps, dtype))
        b, o = batch.batch_size, batch.out_dim
        t0 = jnp.broadcast_to(jnp.eye(d, dtype=dtype), (b, d, d)) if track_transform else jnp.zeros((), dtype)
        w0 = jnp.zeros((b, o, d), dtype) if track_transform else jnp.zeros((), dtype)
        init = (batch.x, batch.x_query, batch.labels_BxNxO(), jnp.zeros((b, o), dtype), t0, w0)
        (_, _, _, pred, _, w), _ = jax.lax.scan(step, init, hps)
        return pred, w

    def solve(self, batch: TaskBatch) -> Array:
        return self._scan(batch, track_transform=True)[1]

    def readout(self, batch: TaskBatch) -> Array:
        pred = self._scan(batch, track_transform=False)[0]
        return pred if batch.vector_output else pred[:, 0]
