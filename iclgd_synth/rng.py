"""Random streams that depend on indices only: not on the device count, the batch size, chunking or JAX's settings.

Two rules, applied by the sampler (:mod:`iclgd_synth.tasks`), the initialisers (:mod:`iclgd_synth.model`,
:mod:`iclgd_synth.gpt`) and training (:mod:`iclgd_synth.train`):

1. **Keys are derived by ``fold_in`` of indices, never by ``split``.** A run's keys are ``fold_in(PRNGKey(seed), j)``
   (j = 0 for initialisation, 1 for data); step s draws from ``fold_in(data_key, s)``; task i of that step from
   ``fold_in(step_key, i)``; and each part of a task (inputs, weights, noise, ...) from ``fold_in(task_key, part)``.
   ``fold_in`` gives the same key under either setting of ``jax_threefry_partitionable`` (``split`` does not), and
   task i of a batch is the same task whatever the batch size or the device the batch sits on.
2. **Every draw happens under one fixed threefry mode** (:func:`fixed_mode`: ``jax.threefry_partitionable(False)``,
   a local context, so the user's global JAX setting is left as it is). The bits a key gives then do not depend on
   that global setting, whose default changed in JAX 0.5. The non-partitionable mode is the one fixed because it is
   the faster one on CPU: drawing one training step's tasks of the ``vonoswald`` preset (2048 tasks, 245,760 numbers)
   took 1.09 ms per step against 2.05 ms under the partitionable mode on the 2-core development machine, which is what
   lifts training past a million tasks per second there (``iclgd bench``). Per-task keys keep it shardable: a batch
   split over devices draws each task from its own key.

Everything random in the package goes through these two rules, which is what the tests check (the same tasks
under either global setting, for any batch size, on 1 and 8 devices).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp

from iclgd_synth.shapes import Array, PRNGKey

#: Parts of one task, each drawn from ``fold_in(task_key, part)``.
INPUTS, WEIGHTS, NOISE, CORRUPTION, CORRUPTION_WEIGHTS = range(5)


@contextlib.contextmanager
def fixed_mode() -> Iterator[None]:
    """The threefry mode every draw of the package runs under (see the module docstring); usable inside jit."""
    with jax.threefry_partitionable(False):
        yield


def derive(key: PRNGKey, *indices: int | Array) -> PRNGKey:
    """``fold_in`` of ``indices`` in turn: the key of (..., index) below ``key``."""
    for index in indices:
        key = jax.random.fold_in(key, index)
    return key


def index_keys(key: PRNGKey, n: int, first: int = 0) -> PRNGKey:
    """Keys ``fold_in(key, i)`` for i = first .. first + n - 1, stacked: (n, *key.shape)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n, dtype=jnp.uint32))


def seed_key(seed: int) -> PRNGKey:
    """The root key of an integer seed (``PRNGKey(seed)``: the same bits under every setting)."""
    return jax.random.PRNGKey(seed)
