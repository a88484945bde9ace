"""Simple in-context baselines with the learners' call shape ``learner(batch) -> (B,)``: the zero predictor,
averaging, and k-nearest neighbours ("What can Transformers learn in-context? A case study of simple function
classes" compares its models with the last two; the zero predictor is the error scale every plot needs).

- :class:`Zero`: y_hat = 0 (W = 0).
- :class:`Averaging`: W = (1/N) sum_i y_i x_i^T, y_hat = W x_q; one GD step of size 1 from W = 0, unscaled by the
  input law (with x ~ N(0, I) it is unbiased for w; with other laws it is not, and that is the baseline's point).
- :class:`NearestNeighbours`: y_hat = mean of y_i over the k context inputs closest to x_q in Euclidean distance
  (all N of them when N < k; ties go to the earlier demonstration). Not linear in x_q, so it has no weights.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from iclgd_synth.learners._common import Learner
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch
from iclgd_synth.validation import check_int


@flax.struct.dataclass
class Zero(Learner):
    """The zero predictor: ``Zero()(batch)`` is 0 for every task; ``.weights(batch)`` is W = 0 (B, d_out, d)."""

    def solve(self, batch: TaskBatch) -> Array:
        return jnp.zeros((batch.batch_size, batch.out_dim, batch.dim), batch.x.dtype)


@flax.struct.dataclass
class Averaging(Learner):
    """The averaging estimator W = (1/N) sum_i y_i x_i^T: ``Averaging()(batch)``, ``.weights(batch)``."""

    def solve(self, batch: TaskBatch) -> Array:
        return jnp.einsum("bno,bnd->bod", batch.labels_BxNxO(), batch.x) / batch.n_context


@flax.struct.dataclass
class NearestNeighbours(Learner):
    """k-nearest-neighbour regression: ``NearestNeighbours(k=3)(batch)``.

    Attributes:
      k: neighbours averaged (integer >= 1, static); min(k, N) are used. Default 3 (the value in "What can
        Transformers learn in-context?").
    """

    k: int = flax.struct.field(pytree_node=False, default=3)

    def checked(self, batch: TaskBatch) -> "NearestNeighbours":
        check_int("k", self.k, min_value=1)
        return self

    def solve(self, batch: TaskBatch) -> Array:
        raise TypeError("k-nearest neighbours is not a linear predictor: it has no weights; call it on a batch")

    def readout(self, batch: TaskBatch) -> Array:
        k = min(self.k, batch.n_context)
        dist_BxN = jnp.sum((batch.x - batch.x_query[:, None]) ** 2, axis=-1)
        _, idx_Bxk = jax.lax.top_k(-dist_BxN, k)  # equal distances: the lower index first
        y_BxkxO = jnp.take_along_axis(batch.labels_BxNxO(), idx_Bxk[..., None], axis=1)
        pred_BxO = jnp.mean(y_BxkxO, axis=1)
        return pred_BxO if batch.vector_output else pred_BxO[:, 0]
