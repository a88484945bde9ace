"""One JAX host device per CPU core for the command line.

XLA's CPU backend is one device by default. Split into one host device per core
(``--xla_force_host_platform_device_count``), the cores run separate programs at once: training draws each step's
tasks on every device (:func:`iclgd_synth.train.sharded_step_loop`, the same numbers bit for bit) and sweeps shard
their runs over them. The command line asks for this before JAX starts its backend; a library user who wants it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before importing JAX. Nothing changes when ``XLA_FLAGS``
already sets a device count, when JAX's backend has already started (too late to change), or under
``ICLGD_HOST_DEVICES=1``; ``ICLGD_HOST_DEVICES=N`` asks for N.
"""

from __future__ import annotations

import os
import sys

ENV = "ICLGD_HOST_DEVICES"
FLAG = "--xla_force_host_platform_device_count"

#: Most host devices asked for by default (one per core up to this).
MAX_DEFAULT = 8


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # cannot tell: leave the settings alone
        return True


def wanted() -> int:
    """Host devices to ask for: ``$ICLGD_HOST_DEVICES`` if set (an integer >= 1), else one per core up to
    :data:`MAX_DEFAULT`."""
    text = os.environ.get(ENV, "").strip()
    if text:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"{ENV} must be an integer >= 1, got {text!r}") from None
        if n < 1:
            raise ValueError(f"{ENV} must be an integer >= 1, got {n}")
        return n
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT))


def one_per_core() -> int | None:
    """Add the host device count to ``XLA_FLAGS`` (see the module docstring); returns the count asked for, or None
    when nothing was changed."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags or _backend_started():
        return None
    n = wanted()
    if n == 1:
        return None
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()
    return n
