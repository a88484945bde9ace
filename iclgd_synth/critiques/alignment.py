"""Alignment metrics between in-context learning (ICL) and fine-tuning (FT), ported to the regression testbed.

From "Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as Meta-Optimizers" and
"In-context Learning and Gradient Descent Revisited":

- SimAOU = cos(h_ICL - h_ZSL, h_FT - h_ZSL): the change that ICL makes to an attention output against the change that
  fine-tuning makes, both measured from the zero-shot (ZSL) output; per task, then averaged. The paper normalises
  each output first (:func:`normalised_sim_aou`); :func:`sim_aou` is the unnormalised cosine.
- SimAM_delta = cos(m_ICL - m_ZSL, m_FT - m_ZSL) for attention maps over the keys the three runs share.
- Kendall's tau between ICL's attention over the demonstrations and FT's per-demonstration influence.
- Rec2FTP: of the tasks where FT improves on zero-shot, the fraction where ICL improves too (the regression analogue
  of "recall to fine-tuning predictions": "improves" = smaller absolute error on the query).

The nulls' helpers: :func:`energy_fraction` (how much of a change sits in the y entries), :func:`kendall_tau_channels`
(vector outputs), :func:`rec2ftp_selection_corrected` (the base rate given the zero-shot error) and Dai's SimAM on one
shared key (:func:`sim_am_across_tasks`).

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


# --------------------------------------------------------------------------- the paper's definitions and the nulls

def normalised_sim_aou(h_icl: Any, h_zsl: Any, h_ft: Any, *, rel_tol: float = 1e-10) -> np.ndarray:
    """Per-task SimAOU as "Why Can GPT Learn In-Context?" defines it (Sec. 4, SimAOU): each attention output is first
    normalised to unit length, then cos(h^_ICL - h^_ZSL, h^_FT - h^_ZSL); inputs (B, D). NaN where a change is at
    rounding level; a zero output stays zero (:func:`unit_rows`).

    Normalising removes the size of each output, so a change that only rescales the zero-shot output is no change;
    :func:`sim_aou` (unnormalised) is what the testbed reported before and is kept beside it."""
    return _delta_cosine(*(unit_rows(v) for v in (h_icl, h_zsl, h_ft)), rel_tol)


def unit_rows(a: Any) -> np.ndarray:
    """Each row of a (B, ...) scaled to unit length, (B, F); a zero row stays zero (the convention that lets a
    zero-shot model whose attention output is 0, e.g. a lone query that is not a key, be compared at all)."""
    r = np.asarray(a, np.float64).reshape(np.shape(a)[0], -1)
    n = np.linalg.norm(r, axis=1, keepdims=True)
    return r / np.where(n > 0, n, 1.0)


def energy_fraction(delta_BxD: Any, channels: Any) -> np.ndarray:
    """Per task, the fraction ||delta[channels]||^2 / ||delta||^2 of a change's energy in ``channels`` (a slice or
    index list over the last axis); NaN for a zero change. Near 1 for the y entries means a cosine of two such changes
    is nearly the sign agreement of their y entries (with one output channel)."""
    delta = np.asarray(delta_BxD, np.float64).reshape(np.shape(delta_BxD)[0], -1)
    total = np.sum(delta**2, axis=1)
    part = np.sum(delta[:, channels] ** 2, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, part / np.where(total > 0, total, 1.0), np.nan)


def kendall_tau_channels(a_BxNxO: Any, b_BxNxO: Any) -> np.ndarray:
    """Kendall's tau-a per task and output channel, averaged over channels, (B,); (B, N) inputs are one channel.
    With vector outputs each channel ranks the demonstrations by its own entry (a ranking needs scalars)."""
    a, b = np.asarray(a_BxNxO, np.float64), np.asarray(b_BxNxO, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"kendall_tau_channels needs two (B, N) or (B, N, O) arrays of the same shape, got "
                         f"{np.shape(a_BxNxO)} and {np.shape(b_BxNxO)}")
    bsz, n, o = a.shape
    per = kendall_tau(np.moveaxis(a, 2, 1).reshape(bsz * o, n), np.moveaxis(b, 2, 1).reshape(bsz * o, n))
    return per.reshape(bsz, o).mean(axis=1)


def error_norms(pred_BxO: Any, y_BxO: Any) -> np.ndarray:
    """Per-task error size ||pred - y|| (the absolute error for scalar outputs), (B,); NaN where pred is not finite."""
    diff = np.asarray(pred_BxO, np.float64) - np.asarray(y_BxO, np.float64)
    diff = diff.reshape(diff.shape[0], -1)
    out = np.linalg.norm(diff, axis=1)
    return np.where(np.all(np.isfinite(diff), axis=1), out, np.nan)


def rec2ftp_selection_corrected(err_zsl: Any, err_icl: Any, err_ft: Any, n_bins: int = 5) -> dict[str, Any]:
    """Rec2FTP beside the rate it would have if ICL's improvements were independent of FT's *given the zero-shot
    error*: both improve mostly where the zero-shot error is large, so the unconditional rate of ICL improving is the
    wrong base rate.

    Tasks are stratified into ``n_bins`` quantile bins of |err_zsl|; ``expected`` = sum over bins of (share of FT's
    improvements in the bin) x (ICL's improvement rate in the bin), and ``excess`` = rec2ftp - expected (about 0 for an
    improver that is unrelated to ICL beyond the zero-shot error). Tasks with a non-finite error are left out.
    Returns {"rec2ftp", "expected", "excess", "n_ft_improves", "icl_improves_rate"}."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins}")
    e0, ei, ef = (np.abs(np.asarray(e, np.float64)).ravel() for e in (err_zsl, err_icl, err_ft))
    ok = np.isfinite(e0) & np.isfinite(ei) & np.isfinite(ef)
    e0, ei, ef = e0[ok], ei[ok], ef[ok]
    base = rec2ftp(e0, ei, ef)
    ft_fix, icl_fix = ef < e0, ei < e0
    n_ft = int(ft_fix.sum())
    if n_ft == 0:
        return {**base, "expected": float("nan"), "excess": float("nan")}
    edges = np.quantile(e0, np.linspace(0.0, 1.0, int(n_bins) + 1))
    bins = np.clip(np.searchsorted(edges, e0, side="right") - 1, 0, int(n_bins) - 1)
    expected = 0.0
    for k in range(int(n_bins)):
        in_bin = bins == k
        if in_bin.any() and ft_fix[in_bin].any():
            expected += ft_fix[in_bin].sum() / n_ft * icl_fix[in_bin].mean()
    return {**base, "expected": float(expected), "excess": float(base["rec2ftp"] - expected)}


def sim_am_across_tasks(m_a: Any, m_b: Any) -> float:
    """Dai's SimAM (not the delta form) when the maps share a single key: one cosine between the (B,) vectors of that
    key's attention score across tasks (a per-task cosine of two scalars is only their sign agreement). NaN if either
    vector is zero."""
    a, b = (np.asarray(v, np.float64).ravel()[None] for v in (m_a, m_b))
    return float(cosine_rows(a, b)[0])
