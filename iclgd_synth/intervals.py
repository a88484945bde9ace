"""Means with 95% intervals across seeds, and paired comparisons with their effect size.

A headline number from training is a mean over S seeds with a Student-t interval, mean +- t_{0.975, S-1} s / sqrt(S)
(s the sample standard deviation); with one seed the interval is undefined (NaN) and reports say "1 seed". A paired
comparison of two quantities measured on the same seeds (or tasks) gives the mean difference, its interval, the
paired t statistic, its two-sided p-value and the effect size d_z = mean(diff) / sd(diff).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

LEVEL = 0.95


def _t_quantile(df: int, level: float = LEVEL) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df))


def mean_ci(values: Sequence[float] | Any, level: float = LEVEL) -> dict[str, Any]:
    """{mean, lo, hi, n, values} of ``values`` (NaNs dropped and counted in ``n_nan``)."""
    v = np.asarray(values, np.float64).ravel()
    finite = v[np.isfinite(v)]
    n = int(finite.size)
    out: dict[str, Any] = {"mean": float(finite.mean()) if n else float("nan"), "lo": float("nan"),
                           "hi": float("nan"), "n": n, "values": [float(x) for x in v]}
    if v.size - n:
        out["n_nan"] = int(v.size - n)
    if n >= 2:
        half = _t_quantile(n - 1, level) * float(finite.std(ddof=1)) / math.sqrt(n)
        out.update(lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def paired_test(a: Sequence[float] | Any, b: Sequence[float] | Any, level: float = LEVEL) -> dict[str, Any]:
    """Paired comparison of a and b (same units, same order): mean of a - b with its interval, t, p, d_z."""
    from scipy import stats

    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs a and b of the same length, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    out = mean_ci(diff, level)
    out.pop("values", None)
    n = diff.size
    sd = float(diff.std(ddof=1)) if n >= 2 else float("nan")
    if n >= 2 and sd > 0:
        t = float(diff.mean() / (sd / math.sqrt(n)))
        out.update(t=t, p=float(2 * stats.t.sf(abs(t), n - 1)), effect_size=float(diff.mean() / sd))
    else:
        out.update(t=float("nan"), p=float("nan"), effect_size=float("nan"))
    out["significant"] = bool(np.isfinite(out["p"]) and out["p"] < 1 - level)
    return out


def format_ci(ci: dict[str, Any], digits: int = 4) -> str:
    """'0.2036 [0.2031, 0.2041] (5 seeds)' or '0.2036 (1 seed)'."""
    m = ci["mean"]
    n = ci["n"]
    if not np.isfinite(m):
        return "n/a"
    if n < 2 or not np.isfinite(ci["lo"]):
        return f"{m:.{digits}g} ({n} seed{'s' * (n != 1)})"
    return f"{m:.{digits}g} [{ci['lo']:.{digits}g}, {ci['hi']:.{digits}g}] ({n} seeds)"


def combine_seeds(entries: Sequence[Any]) -> Any:
    """Per-seed results (same structure) combined leaf by leaf: floats averaged over the finite values (NaN when
    none is), integers (counts) summed, lists element-wise, other values (strings, flags) from the first seed.
    One seed: its values unchanged."""
    first = entries[0]
    if isinstance(first, dict):
        return {key: combine_seeds([e[key] for e in entries]) for key in first}
    if isinstance(first, (list, tuple)):
        if any(len(e) != len(first) for e in entries):
            raise ValueError("combine_seeds needs per-seed lists of the same length")
        return [combine_seeds([e[i] for e in entries]) for i in range(len(first))]
    if isinstance(first, (bool, np.bool_, str)) or first is None:
        return first
    if isinstance(first, (int, np.integer)):
        return int(sum(int(e) for e in entries))
    if len(entries) == 1:
        return float(first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN (an undefined cell): NaN
        return float(np.nanmean(np.asarray(entries, np.float64)))


def holm(pvalues: Sequence[float] | Any, level: float = LEVEL) -> list[bool]:
    """Holm's step-down correction: which of m two-sided tests stay significant at family-wise error 1 - ``level``
    (the k-th smallest p is compared with (1 - level) / (m - k + 1), stopping at the first that fails; NaN never
    significant)."""
    p = np.asarray(pvalues, np.float64).ravel()
    alpha = 1.0 - level
    order = np.argsort(np.where(np.isfinite(p), p, np.inf), kind="stable")
    keep = np.zeros(p.size, bool)
    m = p.size
    for rank, i in enumerate(order):
        if not (np.isfinite(p[i]) and p[i] <= alpha / (m - rank)):
            break
        keep[i] = True
    return [bool(k) for k in keep]
