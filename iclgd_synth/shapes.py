"""Dimension letters used in names and docstrings across the package.

Shape-suffixed names (``tokens_BxTxD``, ``c_BxDxD``) use these letters:

    B  batch of tasks               N  context pairs (demonstrations) per task
    d  input dimension              d_out (O)  output dimension (1 for scalar regression)
    D  token dimension = d + d_out  T  tokens per sequence (N + 1 concatenated, 2N + 1 interleaved)
    H  attention heads              Kq / Kv  key / value size per head
    K  layers (or GD steps)         M  tasks in a finite task pool
    S  seeds                        F  MLP hidden width
"""

from __future__ import annotations

from typing import Any, Callable

import jax

Array = jax.Array
PRNGKey = jax.Array
#: Any predictor in the package: a trained model, hand-constructed weights or an explicit learner, as a function of a
#: :class:`~iclgd_synth.tasks.TaskBatch` returning predictions of shape (B,) (or (B, d_out)).
Predictor = Callable[[Any], Array]
