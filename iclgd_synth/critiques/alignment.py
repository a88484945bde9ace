"""Alignment metrics between in-context learning (ICL) and fine-tuning (FT), ported to the regression testbed.

From "Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as Meta-Optimizers" and
"In-context Learning and Gradient Descent Revisited":

- SimAOU = cos(h_ICL - h_ZSL, h_FT - h_ZSL): the change that ICL makes to an attention output against the change that
  fine-tuning makes, both measured from the zero-shot (ZSL) output; per task, then averaged.
- SimAM_delta = cos(m_ICL - m_ZSL, m_FT - m_ZSL) for attention maps over the keys the three runs share.
- Kendall's tau between ICL's attention over the demonstrations and FT's per-demonstration influence.
- Rec2FTP: of the tasks where FT improves on zero-shot, the fraction where ICL improves too (the regression analogue
  of "recall to fine-tuning predictions": "improves" = smaller absolute error on the query).

All functions take NumPy or JAX arrays with the task axis first and return NumPy values; a per-task cosine whose two
vectors are (numerically) zero is NaN and left out of averages, and the count of such tasks is returned.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def cosine_rows(a: Any, b: Any, *, tol: float = 1e-12) -> np.ndarray:
    """Per-row cosine between a and b, each (B, ...); NaN where either row has norm <= tol * (largest row norm)."""
    a = np.asarray(a, np.float64).reshape(np.shape(a)[0], -1)
    b = np.asarray(b, np.float64).reshape(np.shape(b)[0], -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > tol * max(na.max(initial=0.0), 1e-300)) & (nb > tol * max(nb.max(initial=0.0), 1e-300))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(a * b, axis=1) / (na * nb)
    return np.where(ok, cos, np.nan)


def summarize(values: Any) -> dict[str, float]:
    """Mean, standard error and count of the finite entries (NaN entries are counted as undefined)."""
    v = np.asarray(values, np.float64).ravel()
    ok = np.isfinite(v)
    n = int(ok.sum())
    mean = float(v[ok].mean()) if n else float("nan")
    sem = float(v[ok].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "sem": sem, "n": n, "n_undefined": int((~ok).sum())}


def _delta_cosine(a: Any, z: Any, b: Any, rel_tol: float) -> np.ndarray:
    """Per-row cos(a - z, b - z); NaN where a change is below ``rel_tol`` times the size of its two ends (a change
    at rounding level has no direction)."""
    a, z, b = (np.asarray(v, np.float64).reshape(np.shape(v)[0], -1) for v in (a, z, b))
    da, db = a - z, b - z
    na, nb = np.linalg.norm(da, axis=1), np.linalg.norm(db, axis=1)
    nz = np.linalg.norm(z, axis=1)
    ok = (na > rel_tol * (np.linalg.norm(a, axis=1) + nz)) & (nb > rel_tol * (np.linalg.norm(b, axis=1) + nz))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(da * db, axis=1) / (na * nb)
    return np.where(ok, cos, np.nan)


def sim_aou(h_icl: Any, h_zsl: Any, h_ft: Any, *, rel_tol: float = 1e-10) -> np.ndarray:
    """Per-task SimAOU: cos(h_ICL - h_ZSL, h_FT - h_ZSL); inputs (B, D). NaN where either change is at rounding
    level (below ``rel_tol`` relative)."""
    return _delta_cosine(h_icl, h_zsl, h_ft, rel_tol)


def sim_am_delta(m_icl: Any, m_zsl: Any, m_ft: Any, *, rel_tol: float = 1e-10) -> np.ndarray:
    """Per-task SimAM_delta: cos(m_ICL - m_ZSL, m_FT - m_ZSL) over the shared keys; inputs (B, keys)."""
    return _delta_cosine(m_icl, m_zsl, m_ft, rel_tol)


def sim_am_delta_across_tasks(m_icl: Any, m_zsl: Any, m_ft: Any, *, rel_tol: float = 1e-10) -> float:
    """SimAM_delta when the maps share a single key: one cosine between the (B,) vectors of changes across tasks
    (a per-task cosine of two scalars is only their sign agreement). NaN if a change is at rounding level."""
    rows = [np.asarray(v, np.float64).ravel()[None] for v in (m_icl, m_zsl, m_ft)]
    return float(_delta_cosine(*rows, rel_tol)[0])


def kendall_tau(a: Any, b: Any) -> np.ndarray:
    """Kendall's tau-a between the rows of a and b, each (B, N): (concordant - discordant pairs) / (N (N - 1) / 2).

    Ties count as neither concordant nor discordant (they do not occur for continuous data)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"kendall_tau needs two (B, N) arrays of the same shape, got {a.shape} and {b.shape}")
    n = a.shape[1]
    if n < 2:
        raise ValueError("kendall_tau needs N >= 2 items per row")
    iu = np.triu_indices(n, k=1)
    da = np.sign(a[:, :, None] - a[:, None, :])[:, iu[0], iu[1]]
    db = np.sign(b[:, :, None] - b[:, None, :])[:, iu[0], iu[1]]
    return np.sum(da * db, axis=1) / (n * (n - 1) / 2)


def rec2ftp(err_zsl: Any, err_icl: Any, err_ft: Any) -> dict[str, float]:
    """Of the tasks where FT's absolute error is below zero-shot's, the fraction where ICL's is too.

    Returns {"rec2ftp", "n_ft_improves", "icl_improves_rate"} (the last: ICL's rate over all tasks, the baseline a
    rec2ftp must beat to say anything about FT)."""
    e0, ei, ef = (np.abs(np.asarray(e, np.float64)).ravel() for e in (err_zsl, err_icl, err_ft))
    ft_fix, icl_fix = ef < e0, ei < e0
    n = int(ft_fix.sum())
    return {"rec2ftp": float(icl_fix[ft_fix].mean()) if n else float("nan"), "n_ft_improves": n,
            "icl_improves_rate": float(icl_fix.mean())}
