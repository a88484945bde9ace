"""Order-dependent learners: SGD over the demonstrations in their given order, and Adam on the in-context loss.

Full-batch GD is exactly invariant to the order of the demonstrations; SGD with small batches and Adam on minibatches
are not ("Do pretrained Transformers Learn In-Context by Gradient Descent?", order sensitivity). Both visit the
demonstrations in the order they have in the batch (reorder with ``TaskBatch.with_context_order``), in consecutive
minibatches of ``batch_size``, for ``epochs`` passes; each minibatch step uses the loss 1/(2b) sum ||W x_i - y_i||^2.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import (
    check_hyper, check_positive, learner_inputs, linear_readout, start_weights,
)
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.validation import check_float, check_int


def _check_minibatches(batch: TaskBatch, batch_size: int, epochs: int) -> tuple[int, int]:
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


def sgd_weights(batch: TaskBatch, eta: Any, epochs: int = 1, batch_size: int = 1, w0: Array | None = None) -> Array:
    """SGD iterate after ``epochs`` ordered passes, (B, d_out, d)."""
    eta = check_hyper("eta", eta)
    batch, w0 = learner_inputs(batch, w0)
    batch_size, epochs = _check_minibatches(batch, batch_size, epochs)
    return _sgd_weights(batch, eta, w0, epochs=epochs, batch_size=batch_size)


def sgd_predict(batch: TaskBatch, eta: Any, epochs: int = 1, batch_size: int = 1, w0: Array | None = None) -> Array:
    eta = check_hyper("eta", eta)
    batch, w0 = learner_inputs(batch, w0)
    batch_size, epochs = _check_minibatches(batch, batch_size, epochs)
    return _sgd_predict(batch, eta, w0, epochs=epochs, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size"))
def _sgd_weights(batch: TaskBatch, eta: Any, w0_BxOxd: Array | None, *, epochs: int, batch_size: int) -> Array:
    def step(w, xy):
        return w - eta * _grad(w, *xy), None

    w, _ = jax.lax.scan(step, start_weights(batch, w0_BxOxd), _minibatches(batch, batch_size, epochs))
    return w


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size"))
def _sgd_predict(batch: TaskBatch, eta: Any, w0_BxOxd: Array | None, *, epochs: int, batch_size: int) -> Array:
    w = _sgd_weights(batch, eta, w0_BxOxd, epochs=epochs, batch_size=batch_size)
    return linear_readout(w, batch.x_query, batch.vector_output)


def _check_adam(lr: Any, b1: Any, b2: Any, eps: Any) -> dict[str, Any]:
    return {"lr": check_positive("lr", lr), "b1": check_float("b1", b1, min_value=0.0, max_value=1.0),
            "b2": check_float("b2", b2, min_value=0.0, max_value=1.0), "eps": check_positive("eps", eps)}


def adam_weights(batch: TaskBatch, lr: Any, epochs: int = 1, batch_size: int = 1, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8, w0: Array | None = None) -> Array:
    """Adam (bias-corrected) over ordered minibatches of the demonstrations, per task, (B, d_out, d)."""
    hp = _check_adam(lr, b1, b2, eps)
    batch, w0 = learner_inputs(batch, w0)
    batch_size, epochs = _check_minibatches(batch, batch_size, epochs)
    return _adam_weights(batch, hp, w0, epochs=epochs, batch_size=batch_size)


def adam_predict(batch: TaskBatch, lr: Any, epochs: int = 1, batch_size: int = 1, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8, w0: Array | None = None) -> Array:
    hp = _check_adam(lr, b1, b2, eps)
    batch, w0 = learner_inputs(batch, w0)
    batch_size, epochs = _check_minibatches(batch, batch_size, epochs)
    return _adam_predict(batch, hp, w0, epochs=epochs, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size"))
def _adam_weights(batch: TaskBatch, hp: dict, w0_BxOxd: Array | None, *, epochs: int, batch_size: int) -> Array:
    lr, b1, b2, eps = hp["lr"], hp["b1"], hp["b2"], hp["eps"]
    xs, ys = _minibatches(batch, batch_size, epochs)

    def step(carry, inp):
        w, m, v = carry
        t, x, y = inp
        g = _grad(w, x, y)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        return (w - lr * m_hat / (jnp.sqrt(v_hat) + eps), m, v), None

    w = start_weights(batch, w0_BxOxd)
    ts = jnp.arange(1, xs.shape[0] + 1, dtype=batch.x.dtype)
    (w, _, _), _ = jax.lax.scan(step, (w, jnp.zeros_like(w), jnp.zeros_like(w)), (ts, xs, ys))
    return w


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size"))
def _adam_predict(batch: TaskBatch, hp: dict, w0_BxOxd: Array | None, *, epochs: int, batch_size: int) -> Array:
    w = _adam_weights(batch, hp, w0_BxOxd, epochs=epochs, batch_size=batch_size)
    return linear_readout(w, batch.x_query, batch.vector_output)


@flax.struct.dataclass
class SGD:
    """SGD in the batch's demonstration order as a predictor."""

    eta: Any = 1.0
    epochs: int = flax.struct.field(pytree_node=False, default=1)
    batch_size: int = flax.struct.field(pytree_node=False, default=1)

    def __call__(self, batch: TaskBatch) -> Array:
        return sgd_predict(batch, self.eta, self.epochs, self.batch_size)


@flax.struct.dataclass
class Adam:
    """Adam on the in-context loss, in the batch's demonstration order, as a predictor."""

    lr: Any = 0.1
    epochs: int = flax.struct.field(pytree_node=False, default=1)
    batch_size: int = flax.struct.field(pytree_node=False, default=1)

    def __call__(self, batch: TaskBatch) -> Array:
        return adam_predict(batch, self.lr, self.epochs, self.batch_size)
