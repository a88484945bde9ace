"""Where hand-constructed and trained weights fall in the distribution of each statistic over a real LLM.

For a statistic of one kind of matrix, the LLM's *distribution* is its values over layers (whole-layer matrices
W_Q, W_K, W_V, W_O) or over layers x heads (per-head slices and the products W_K^T W_Q, W_O W_V). A hand-constructed
or trained source contributes one number per statistic: the median over its own layers / heads (each of the default
ones has one layer and one head, so it is simply that matrix's value). Against each LLM it gets

    percentile  100 (#{LLM values < v} + #{LLM values = v} / 2) / n          (0: below all, 100: above all)
    z           (v - mean) / std of the LLM values                          (+-inf when the LLM values are constant)
    inside      p1 <= v <= p99, the LLM's 1st and 99th percentiles (linear interpolation; with the 30 layers of
                SmolLM2 these are close to its minimum and maximum)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from iclgd_synth.weights.collect import SourceStats
from iclgd_synth.weights.stats import STATISTICS

INSIDE_PERCENTILES = (1.0, 99.0)

#: (matrix, statistic) rows of the summary table: sparsity in the critique's sense, scale-invariant sparsity,
#: entry distribution, rank and spectrum, and the structure of the two products a linear-attention layer depends on.
SUMMARY_ROWS = (
    ("W_Q", "zero"), ("W_Q", "abs<1e-3"), ("W_Q", "rel<1e-2"), ("W_Q", "kurtosis"), ("W_Q", "ks_normal"),
    ("W_Q", "stable_rank/n"), ("W_Q", "eff_rank/n"), ("W_Q", "top10_energy"),
    ("W_K", "zero"), ("W_K", "kurtosis"), ("W_K", "eff_rank/n"),
    ("W_V", "zero"), ("W_V", "abs<1e-3"), ("W_V", "rel<1e-2"), ("W_V", "kurtosis"), ("W_V", "ks_normal"),
    ("W_V", "stable_rank/n"), ("W_V", "eff_rank/n"),
    ("W_O", "zero"), ("W_O", "abs<1e-3"), ("W_O", "kurtosis"), ("W_O", "eff_rank/n"),
    ("W_K^T W_Q", "symmetry"), ("W_K^T W_Q", "cos_I"), ("W_K^T W_Q", "diag_energy"), ("W_K^T W_Q", "kurtosis"),
    ("W_K^T W_Q", "stable_rank/n"), ("W_K^T W_Q", "eff_rank/n"), ("W_K^T W_Q", "top10_energy"),
    ("W_O W_V", "top_row_energy"), ("W_O W_V", "symmetry"), ("W_O W_V", "cos_I"), ("W_O W_V", "diag_energy"),
    ("W_O W_V", "kurtosis"), ("W_O W_V", "stable_rank/n"), ("W_O W_V", "eff_rank/n"),
)


def position(value: float, sample) -> dict:
    """Percentile, z-score and inside-range flag of ``value`` in ``sample`` (NaNs in the sample are dropped)."""
    x = np.asarray(sample, np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0 or value is None or math.isnan(value):
        return {"percentile": math.nan, "z": math.nan, "inside": None}
    pct = 100.0 * (np.count_nonzero(x < value) + 0.5 * np.count_nonzero(x == value)) / x.size
    sd = x.std()
    if sd > 0:
        z = (value - x.mean()) / sd
    else:
        z = 0.0 if value == x.mean() else math.copysign(math.inf, value - x.mean())
    lo, hi = np.percentile(x, INSIDE_PERCENTILES)
    # a tiny relative tolerance so that a value equal to an extreme of the sample counts as inside
    tol = 1e-12 * max(abs(lo), abs(hi), 1.0)
    return {"percentile": float(pct), "z": float(z), "inside": bool(lo - tol <= value <= hi + tol)}


def distribution(sample) -> dict:
    """Summary of an LLM's values: n, median, mean, std, min, max and the inside range [p1, p99]."""
    x = np.asarray(sample, np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"n": 0}
    lo, hi = np.percentile(x, INSIDE_PERCENTILES)
    return {"n": int(x.size), "median": float(np.median(x)), "mean": float(x.mean()), "std": float(x.std()),
            "min": float(x.min()), "max": float(x.max()), "p1": float(lo), "p99": float(hi)}


def resemblance(llms: Sequence[SourceStats], others: Sequence[SourceStats],
                rows: Sequence[tuple[str, str]] | None = None) -> list[dict]:
    """For every (matrix, statistic): each LLM's distribution and each other source's value and position in it.

    ``rows`` defaults to every matrix kind present in the LLMs times every statistic of :data:`STATISTICS`.
    """
    if rows is None:
        kinds = [m for m in _matrix_order(llms)]
        rows = [(m, s) for m in kinds for s in STATISTICS]
    out = []
    for matrix, stat in rows:
        samples = {l.name: l.values(matrix, stat) for l in llms}
        if all(v.size == 0 for v in samples.values()):
            continue
        row = {"matrix": matrix, "stat": stat, "llm": {n: distribution(v) for n, v in samples.items()},
               "sources": {}}
        for o in others:
            v = o.value(matrix, stat)
            row["sources"][o.name] = {"value": v, "positions": {n: position(v, s) for n, s in samples.items()}}
        out.append(row)
    return out


def inside_counts(rows: Sequence[dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """source -> LLM -> (statistics inside that LLM's range, statistics compared)."""
    counts: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        for name, entry in row["sources"].items():
            for llm, pos in entry["positions"].items():
                if pos["inside"] is None:
                    continue
                c = counts.setdefault(name, {}).setdefault(llm, [0, 0])
                c[0] += int(pos["inside"])
                c[1] += 1
    return {n: {l: (c[0], c[1]) for l, c in d.items()} for n, d in counts.items()}


def _matrix_order(sources: Sequence[SourceStats]) -> list[str]:
    seen: list[str] = []
    for s in sources:
        for r in s.records:
            if r.matrix not in seen:
                seen.append(r.matrix)
    return seen
