"""Order-dependent learners: SGD over the demonstrations in their given order, and Adam on the in-context loss.

Full-batch GD is exactly invariant to the order of the demonstrations; SGD with small batches and Adam on minibatches
are not ("Do pretrained Transformers Learn In-Context by Gradient Descent?", order sensitivity). Both visit the
demonstrations in the order they have in the batch (reorder with ``TaskBatch.with_context_order``), in consecutive
minibatches of ``batch_size``, for ``epochs`` passes; each minibatch step uses the loss 1/(2b) sum ||W x_i - y_i||^2.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import Learner, check_hyper, check_positive, start_weights
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.validation import check_float, check_int


def _check_minibatches(batch: TaskBatch, batch_size: Any, epochs: Any) -> tuple[int, int]:
    n = batch.n_context
    batch_size = check_int("batch_size", batch_size, min_value=1, max_value=n)
    epochs = check_int("epochs", epochs, min_value=1)
    if n % batch_size:
        raise ValueError(f"batch_size must divide the number of demonstrations N = {n}; got {batch_size}")
    return batch_size, epochs


def _minibatches(batch: TaskBatch, batch_size: int, epochs: int):
    """Inside the jitted cores: the ordered minibatches of all epochs, (epochs * N / b, B, b, .) each."""
    steps = batch.n_context // batch_size
    xs = jnp.moveaxis(batch.x.reshape(batch.batch_size, steps, batch_size, batch.dim), 1, 0)
    ys = jnp.moveaxis(batch.labels_BxNxO().reshape(batch.batch_size, steps, batch_size, -1), 1, 0)
    return jnp.tile(xs, (epochs, 1, 1, 1)), jnp.tile(ys, (epochs, 1, 1, 1))


def _grad(w_BxOxd, x_Bxbxd, y_BxbxO):
    resid = jnp.einsum("bod,bnd->bno", w_BxOxd, x_Bxbxd) - y_BxbxO
    return jnp.einsum("bno,bnd->bod", resid, x_Bxbxd) / x_Bxbxd.shape[1]


@flax.struct.dataclass
class SGD(Learner):
    """SGD over the demonstrations in the batch's order: ``SGD(eta, epochs, batch_size)(batch)``.

    Attributes:
      eta: step size. Default 1.
      epochs: passes over the demonstrations (static). Default 1.
      batch_size: demonstrations per step, a divisor of N (static). Default 1.
      w0: initial weights; None is zero. Default None.
    """

    eta: Any = 1.0
    epochs: int = flax.struct.field(pytree_node=False, default=1)
    batch_size: int = flax.struct.field(pytree_node=False, default=1)
    w0: Any = None

    def checked(self, batch: TaskBatch) -> "SGD":
        _check_minibatches(batch, self.batch_size, self.epochs)
        return self.replace(eta=check_hyper("eta", self.eta))

    def solve(self, batch: TaskBatch) -> Array:
        def step(w, xy):
            return w - self.eta * _grad(w, *xy), None

        w, _ = jax.lax.scan(step, start_weights(batch, self.w0), _minibatches(batch, self.batch_size, self.epochs))
        return w


@flax.struct.dataclass
class Adam(Learner):
    """Adam (bias-corrected) on the in-context loss over ordered minibatches: ``Adam(lr, epochs, batch_size)(batch)``.

    Attributes:
      lr: learning rate > 0. Default 0.1.
      epochs, batch_size: as for :class:`SGD` (static). Default 1, 1.
      b1, b2: moment decay rates in [0, 1]. Default 0.9, 0.999.
      eps: denominator offset > 0. Default 1e-8.
      w0: initial weights; None is zero. Default None.
    """

    lr: Any = 0.1
    epochs: int = flax.struct.field(pytree_node=False, default=1)
    batch_size: int = flax.struct.field(pytree_node=False, default=1)
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    w0: Any = None

    def checked(self, batch: TaskBatch) -> "Adam":
        _check_minibatches(batch, self.batch_size, self.epochs)
        return self.replace(lr=check_positive("lr", self.lr), b1=check_float("b1", self.b1, min_value=0.0,
                                                                               max_value=1.0),
                            b2=check_float("b2", self.b2, min_value=0.0, max_value=1.0),
                            eps=check_positive("eps", self.eps))

    def solve(self, batch: TaskBatch) -> Array:
        lr, b1, b2, eps = self.lr, self.b1, self.b2, self.eps
        xs, ys = _minibatches(batch, self.batch_size, self.epochs)

        def step(carry, inp):
            w, m, v = carry
            t, x, y = inp
            g = _grad(w, x, y)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g**2
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            return (w - lr * m_hat / (jnp.sqrt(v_hat) + eps), m, v), None

        w = start_weights(batch, self.w0)
        ts = jnp.arange(1, xs.shape[0] + 1, dtype=batch.x.dtype)
        (w, _, _), _ = jax.lax.scan(step, (w, jnp.zeros_like(w), jnp.zeros_like(w)), (ts, xs, ys))
        return w
