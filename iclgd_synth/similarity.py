"""The one cosine of the package, with its zero policy.

``cosine_rows(a, b)`` is the per-row cosine of two stacks of vectors (each row flattened). **Zero policy**: a row whose
norm is at most ``tol`` times the largest row norm of its stack (default 1e-12; a change at rounding level has no
direction) has no direction, so its cosine is undefined: NaN. Means over rows (:func:`mean_defined`) leave undefined
rows out and say how many there were; they never count them as 0 (which would read as "orthogonal").
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Relative norm below which a vector counts as zero.
ZERO_TOL = 1e-12


def cosine_rows(a: Any, b: Any, *, tol: float = ZERO_TOL) -> np.ndarray:
    """Per-row cosine of a and b, each (B, ...), in float64; NaN for rows without a direction (see the module)."""
    a = np.asarray(a, np.float64).reshape(np.shape(a)[0], -1)
    b = np.asarray(b, np.float64).reshape(np.shape(b)[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"cosine_rows needs arrays of the same shape, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > tol * max(na.max(initial=0.0), 1e-300)) & (nb > tol * max(nb.max(initial=0.0), 1e-300))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(a * b, axis=1) / (na * nb)
    return np.where(ok, np.clip(cos, -1.0, 1.0), np.nan)


def cosine(a: Any, b: Any, *, tol: float = ZERO_TOL) -> float:
    """Cosine of two arrays taken as single vectors; NaN when either is zero."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na <= 1e-300 or nb <= 1e-300:
        return float("nan")
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def mean_defined(values: Any) -> tuple[float, int]:
    """(mean over the defined entries, number of undefined (NaN) entries)."""
    v = np.asarray(values, np.float64).ravel()
    ok = np.isfinite(v)
    return (float(v[ok].mean()) if ok.any() else float("nan")), int((~ok).sum())
