"""Means with 95% intervals across seeds, and paired comparisons with their effect size.

A headline number from training is a mean over S seeds with a Student-t interval, mean +- t_{0.975, S-1} s / sqrt(S)
(s the sample standard deviation); with one seed the interval is undefined (NaN) and reports say "1 seed". A paired
comparison of two quantities measured on the same seeds (or tasks) gives the mean difference, its interval, the
paired t statistic, its two-sided p-value and the effect size d_z = mean(diff) / sd(diff).
"""

from __future__ import annotations

import math
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
