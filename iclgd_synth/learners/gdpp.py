"""GD++: gradient descent that also transforms the inputs at every step.

From "Transformers learn in-context by gradient descent" (section on GD++): at step k, with X_k the d x N matrix of
the current context inputs and r^k the current residual targets (r^0 = y),

    Delta w_k = (eta_k / N) X_k r^k        prediction += Delta w_k . x_q^k       r^{k+1} = r^k - X_k^T Delta w_k
    X_{k+1} = (I - gamma_k X_k X_k^T) X_k   x_q^{k+1} = (I - gamma_k X_k X_k^T) x_q^k

With gamma = 0 this is plain GD from W0 = 0. The transformation (I - gamma X X^T) acts as a preconditioner that
improves the conditioning of X X^T, which is why trained recurrent models that learn it beat plain GD.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import broadcast_schedule, check_schedule, learner_inputs
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.validation import check_int


def gdpp_predict(batch: TaskBatch, eta: Any, gamma: Any, steps: int = 1) -> Array:
    """Explicit GD++ prediction, (B,) (or (B, d_out)); ``eta`` and ``gamma`` scalars or (steps,) arrays."""
    steps = check_int("steps", steps, min_value=1)
    eta = check_schedule("eta", eta, steps)
    gamma = check_schedule("gamma", gamma, steps)
    batch, _ = learner_inputs(batch)
    return _gdpp_predict(batch, eta, gamma, steps=steps)


@functools.partial(jax.jit, static_argnames=("steps",))
def _gdpp_predict(batch: TaskBatch, eta: Any, gamma: Any, *, steps: int) -> Array:
    dtype, n = batch.x.dtype, batch.n_context

    def step(carry, hp):
        x_BxNxd, xq_Bxd, r_BxNxO, pred_BxO = carry
        eta_k, gamma_k = hp
        dw_BxOxd = eta_k / n * jnp.einsum("bno,bnd->bod", r_BxNxO, x_BxNxd)
        pred_BxO = pred_BxO + jnp.einsum("bod,bd->bo", dw_BxOxd, xq_Bxd)
        r_BxNxO = r_BxNxO - jnp.einsum("bod,bnd->bno", dw_BxOxd, x_BxNxd)
        gram_Bxdxd = jnp.einsum("bnd,bne->bde", x_BxNxd, x_BxNxd)
        x_new = x_BxNxd - gamma_k * jnp.einsum("bde,bne->bnd", gram_Bxdxd, x_BxNxd)
        xq_new = xq_Bxd - gamma_k * jnp.einsum("bde,be->bd", gram_Bxdxd, xq_Bxd)
        return (x_new, xq_new, r_BxNxO, pred_BxO), None

    hps = (broadcast_schedule(eta, steps, dtype), broadcast_schedule(gamma, steps, dtype))
    pred0 = jnp.zeros((batch.batch_size, batch.out_dim), dtype)
    (_, _, _, pred), _ = jax.lax.scan(step, (batch.x, batch.x_query, batch.labels_BxNxO(), pred0), hps)
    return pred if batch.vector_output else pred[:, 0]


@flax.struct.dataclass
class GDPlusPlus:
    """GD++ as a predictor: ``GDPlusPlus(eta=..., gamma=..., steps=2)(batch)``."""

    eta: Any = 1.0
    gamma: Any = 0.0
    steps: int = flax.struct.field(pytree_node=False, default=1)

    def __call__(self, batch: TaskBatch) -> Array:
        return gdpp_predict(batch, self.eta, self.gamma, self.steps)
