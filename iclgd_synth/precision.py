"""Float64 for exact checks: one way to switch it on (a context manager) and to convert a pytree.

Equivalences are checked in float64; ``with float64():`` turns JAX's 64-bit mode on for a block and restores the
previous setting afterwards (``jax.enable_x64``), without touching the user's global configuration.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """A block computed with 64-bit floats (the previous setting is restored on exit)."""
    with jax.enable_x64(True):
        yield


def to_float64(tree: Any) -> Any:
    """Every floating leaf as float64 (call inside ``jax.enable_x64(True)``)."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                        else a, tree)
