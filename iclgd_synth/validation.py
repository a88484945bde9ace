"""Argument checks that fail early with a message naming the parameter and the accepted range.

Checks only run on concrete values: a traced value (inside jit or vmap) is passed through unchanged, since its value
cannot be inspected; the public entry points check their arguments before tracing.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(value: Any) -> bool:
    """True when ``value`` holds data (not a tracer inside jit / vmap / grad)."""
    return not isinstance(value, jax.core.Tracer)


def check_int(name: str, value: Any, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """Return ``value`` as an int, or raise ValueError naming ``name`` and the accepted range."""
    rng = _range_text(min_value, max_value)
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer{rng}, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
        raise ValueError(f"{name} must be an integer{rng}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    strict_min: bool = False,
) -> Any:
    """Check a scalar or array of reals: finite and inside the range. Tracers pass through unchanged."""
    if not is_concrete(value):
        return value
    # Strings and booleans convert to floats without complaint ("1" -> 1.0, True -> 1.0): refuse them explicitly.
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    try:
        raw = np.asarray(value)
        if not (jnp.issubdtype(raw.dtype, jnp.floating) or jnp.issubdtype(raw.dtype, jnp.integer)):
            raise TypeError  # bool, complex, string or object arrays
        arr = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number (or an array of reals), got {value!r}") from None
    lo = "(" if strict_min else "["
    rng = f" in {lo}{'-inf' if min_value is None else min_value}, {'inf' if max_value is None else max_value}]"
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite{rng}, got {value!r}")
    if min_value is not None and (np.any(arr <= min_value) if strict_min else np.any(arr < min_value)):
        raise ValueError(f"{name} must be{rng}, got {value!r}")
    if max_value is not None and np.any(arr > max_value):
        raise ValueError(f"{name} must be{rng}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_shape(name: str, value: Any, expected: tuple[int | None, ...], legend: str) -> None:
    """Raise ValueError unless ``value.shape`` matches ``expected`` (None matches any size)."""
    shape = tuple(np.shape(value))
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        sizes = ["?" if e is None else str(e) for e in expected]
        want = "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"  # (2,) like Python's 1-tuples
        raise ValueError(f"{name} must have shape {legend} = {want}, got {shape}")


def _range_text(min_value: int | None, max_value: int | None) -> str:
    if min_value is not None and max_value is not None:
        return f" in [{min_value}, {max_value}]"
    if min_value is not None:
        return f" >= {min_value}"
    if max_value is not None:
        return f" <= {max_value}"
    return ""


def finite_or_inf(x: float) -> float:
    """``float(x)``, with NaN mapped to +inf (for 'best value' searches)."""
    x = float(x)
    return math.inf if math.isnan(x) else x


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, else a clean usage error (exit status 2), not a traceback."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def check_key(name: str, key: Any) -> Any:
    """Return ``key`` if it is one JAX PRNG key (``jax.random.PRNGKey(seed)`` or ``jax.random.key(seed)``); else raise
    TypeError naming ``name`` and how to make one. Tracers pass through (under vmap a batch of keys is traced)."""
    if not is_concrete(key):
        return key
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape == ():
                return key
        elif key.dtype == np.uint32 and key.ndim == 1 and key.shape[0] in (2, 4):  # threefry (2,), rbg (4,)
            return key
        shown = f"an array of dtype {key.dtype} and shape {tuple(key.shape)}"
    else:
        shown = f"{key!r} of type {type(key).__name__}"
    raise TypeError(f"{name} must be one JAX PRNG key such as jax.random.PRNGKey(0) or jax.random.key(0) (an integer "
                    f"seed is not a key), got {shown}")


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """A byte count for messages: 1012 B, 93.9 GiB."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
    return f"{n / 1024:.3g} PiB"


def check_memory(what: str, nbytes: float, advice: str) -> None:
    """Refuse, before any work, something that needs more than the machine's memory.

    ``what`` names the parameter(s) and their values, ``nbytes`` is the estimate (a lower bound: only the arrays that
    must exist at once), ``advice`` says what to change. Raises MemoryError with the estimate and the limit.
    """
    limit = machine_memory()
    if limit is not None and nbytes > limit:
        raise MemoryError(f"{what} needs about {format_bytes(nbytes)} of memory, more than this machine's "
                          f"{format_bytes(limit)}; {advice}")


class SlowCompileWarning(UserWarning):
    """Emitted before a compilation that is expected to take minutes (a very deep unrolled model, ...)."""


def warn_slow_compile(message: str, stacklevel: int = 3) -> None:
    """Say, in one line, that the next compilation will be long and why (rather than minutes of silence)."""
    import warnings

    warnings.warn(message, SlowCompileWarning, stacklevel=stacklevel)
