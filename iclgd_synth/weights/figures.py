"""Figures of the weight comparison (matplotlib, Agg backend; each function writes one PNG and returns its path)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iclgd_synth.plotting import save_figure  # noqa: E402
from iclgd_synth.weights.collect import SourceStats  # noqa: E402

LINESTYLES = {"llm": "-", "synthetic": "-", "hand": "--", "trained": ":"}
PANELS = ("W_Q", "W_K", "W_V", "W_O")
SPECTRUM_PANELS = ("W_Q", "W_V", "W_O", "W_K^T W_Q", "W_O W_V")


def _save(fig, path) -> Path:
    return save_figure(fig, path, dpi=100)


def _style(i: int, s: SourceStats) -> dict:
    return {"color": f"C{i % 10}", "ls": LINESTYLES.get(s.kind, "-"), "lw": 1.6 if s.kind == "llm" else 1.3}


def _percent(f: float) -> str:
    return f"{100 * f:.4f}%" if 0.999 < f < 1 else f"{100 * f:.3g}%"


def _label(m: str) -> str:
    return "W_O (P for the LSA models)" if m == "W_O" else m


def magnitude_histograms(path, sources: Sequence[SourceStats]) -> Path:
    """Histograms of log10(|w| / RMS(W)) of the whole-layer matrices (exact zeros counted in the legend)."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), sharey=True)
    for ax, m in zip(axes, PANELS):
        for i, s in enumerate(sources):
            h = s.rel_hist.get(m)
            if h is None or h.total == 0:
                continue
            centres = 0.5 * (h.edges[1:] + h.edges[:-1])
            ax.step(centres, h.counts / h.total, where="mid", label=f"{s.name} (zeros {_percent(h.zeros / h.total)})",
                    **_style(i, s))
        ax.set_yscale("log")
        ax.set_xlabel("log10(|w| / RMS(W))")
        ax.set_title(_label(m))
    axes[0].set_ylabel("fraction of entries per bin")
    axes[-1].legend(fontsize=6, loc="upper left")
    fig.suptitle("entry magnitude relative to the matrix's RMS: log10(|w| / RMS(W)) (0 = typical size; exact zeros "
                 "in the legend)", fontsize=9)
    return _save(fig, path)


def small_fraction_curves(path, sources: Sequence[SourceStats]) -> Path:
    """Fraction of entries with |w| < t against the absolute threshold t (the critique's sparsity measure)."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), sharey=True)
    for ax, m in zip(axes, PANELS):
        for i, s in enumerate(sources):
            h = s.abs_hist.get(m)
            if h is None or h.total == 0:
                continue
            ax.plot(10.0 ** h.edges, h.fraction_below(), label=s.name, **_style(i, s))
        for t in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
            ax.axvline(t, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("threshold t")
        ax.set_title(_label(m))
    axes[0].set_ylabel("fraction of entries with |w| < t")
    axes[-1].legend(fontsize=6, loc="upper left")
    return _save(fig, path)


def spectra(path, sources: Sequence[SourceStats], grid_size: int = 200) -> Path:
    """Normalised singular values s_k / s_1 against k / n (median over layers / heads, 10-90% band)."""
    grid = np.linspace(0.0, 1.0, grid_size)
    fig, axes = plt.subplots(1, len(SPECTRUM_PANELS), figsize=(3.8 * len(SPECTRUM_PANELS), 3.5), sharey=True)
    for ax, m in zip(axes, SPECTRUM_PANELS):
        for i, s in enumerate(sources):
            curves = s.spectra.get(m)
            if not curves:
                continue
            ys = np.stack([np.interp(grid, (np.arange(c.size) + 0.5) / c.size, np.maximum(c, 1e-8)) for c in curves])
            style = _style(i, s)
            ax.plot(grid, np.median(ys, 0), label=s.name, **style)
            if len(curves) > 2:
                ax.fill_between(grid, np.percentile(ys, 10, 0), np.percentile(ys, 90, 0), color=style["color"],
                                alpha=0.15)
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 1.5)
        ax.set_xlabel("k / n")
        ax.set_title(_label(m))
    axes[0].set_ylabel("s_k / s_1")
    axes[-1].legend(fontsize=6, loc="lower left")
    return _save(fig, path)


def heatmaps(path, examples: Sequence[tuple[str, np.ndarray]], columns: int = 4) -> Path:
    """Heat maps of square matrices (W_K^T W_Q, W_O W_V), colour scale symmetric about 0, up to max |M| for matrices
    up to 64 x 64 and up to the 99.5th percentile of |M| for larger ones."""
    n = max(len(examples), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, m) in zip(axes.ravel(), examples):
        a = np.abs(m)
        # small (hand-constructed, trained) matrices: the full range; large ones: clip the few outlier entries
        vmax = (float(a.max()) if a.size <= 64 * 64 else float(np.percentile(a, 99.5))) or float(a.max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def n_dependence(path, rows: Sequence[dict]) -> Path:
    """The label entry of the hand-constructed P = eta / N against the number of demonstrations N."""
    ns = np.array([r["N"] for r in rows], np.float64)
    p = np.array([r["P_yy"] for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.loglog(ns, p, "o-", color="k", label="P[y, y] = eta / N (hand GD)")
    ax.set_xlabel("number of demonstrations N")
    ax.set_ylabel("P[y, y]")
    ax.set_title("hand weights depend on N (undefined at N = 0)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)
