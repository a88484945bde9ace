"""Figures for the study reports (matplotlib, Agg backend; every function writes one PNG and returns its path)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close a figure; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def loss_curves(path, losses_SxT: np.ndarray, baselines: Mapping[str, float], *, title: str = "training loss",
                smooth: int = 50) -> Path:
    """Training loss per step (mean over seeds, smoothed, min-max band) against horizontal baseline losses."""
    fig, ax = plt.subplots(figsize=(6, 4))
    losses = np.asarray(losses_SxT, np.float64)
    steps = np.arange(1, losses.shape[1] + 1)
    k = max(1, min(smooth, losses.shape[1] // 10 or 1))
    kernel = np.ones(k) / k
    sm = np.stack([np.convolve(l, kernel, mode="valid") for l in losses])
    x = steps[k - 1:]
    ax.plot(x, sm.mean(0), label=f"trained ({losses.shape[0]} seed{'s' * (losses.shape[0] > 1)})", color="k")
    if losses.shape[0] > 1:
        ax.fill_between(x, sm.min(0), sm.max(0), color="k", alpha=0.2)
    for i, (name, v) in enumerate(baselines.items()):
        ax.axhline(v, ls="--", color=f"C{i}", label=f"{name} ({v:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("half-MSE on the query")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


#: How a metric key of the training history is shown: key prefix -> (title, y-axis label, reference value or None).
#: The reference is what a model that *is* the baseline would show (predictions equal: difference 0; sensitivities
#: aligned: cosine 1).
METRIC_STYLES = {
    "loss": ("held-out loss", "half-MSE on the query", None),
    "preds_diff": ("prediction difference vs {long}", "mean |y_model - y_{short}|", 0.0),
    "model_cos": ("implicit-model cosine vs {long}", "mean cosine of dy/dx_q", 1.0),
    "model_diff": ("implicit-model difference vs {long}", "mean |dy/dx_q - {short}'s|", 0.0),
}
#: Baseline suffixes of the metric keys: (name in titles, short name in axis labels).
BASELINE_NAMES = {"gd": ("tuned GD", "GD"), "gdpp": ("tuned GD++", "GD++")}


def metric_style(key: str) -> tuple[str, str, float | None]:
    """(readable title, y-axis label, reference value or None) of a history metric key such as ``model_cos_gdpp``."""
    for prefix, (title, ylabel, ref) in METRIC_STYLES.items():
        if key == prefix or key.startswith(prefix + "_"):
            suffix = key[len(prefix) + 1:]
            long, short = BASELINE_NAMES.get(suffix, (suffix.replace("_", " ") or "the baseline", "baseline"))
            return title.format(long=long), ylabel.format(short=short), ref
    readable = key.replace("_", " ")
    return readable, readable, None


def metrics_over_training(path, steps: Sequence[int], series: Mapping[str, Sequence[float]], *,
                          title: str = "trained model vs GD over training") -> Path:
    """One panel per metric (preds diff, model cos, ...) against the training step, with readable titles, axis labels
    and the value a model equal to the baseline would show as a dotted reference line (:data:`METRIC_STYLES`)."""
    n = len(series)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False)
    for ax, (name, vals) in zip(axes[0], series.items()):
        label, ylabel, ref = metric_style(name)
        ax.plot(steps, vals, marker=".", color="C0")
        if ref is not None:
            ax.axhline(ref, color="grey", ls=":", lw=1, label=f"equal to the baseline ({ref:g})")
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def weight_heatmaps(path, matrices: Mapping[str, np.ndarray], *, title: str = "") -> Path:
    """Heat maps side by side, each with a symmetric colour scale."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.0), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items()):
        m = np.asarray(m, np.float64)
        v = float(np.max(np.abs(m))) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


#: A predictor whose largest (smallest) loss is this many times above (below) the typical predictor's is left off
#: the y-range of the out-of-distribution panels (least squares at N = d reaches losses 1e3 x the others').
OFF_SCALE_FACTOR = 30.0


def robust_log_ylim(losses: Mapping[str, Sequence[float]], factor: float = OFF_SCALE_FACTOR
                    ) -> tuple[float, float] | None:
    """A log-scale y-range (lo, hi) spanning every predictor except those far above or below the others: the upper
    edge is set by the predictors whose largest loss is within ``factor`` of the median predictor's largest loss (the
    lower edge likewise), with a margin. None when there is nothing positive and finite to show."""
    highs, lows = [], []
    for vals in losses.values():
        v = np.asarray(vals, np.float64)
        v = v[np.isfinite(v) & (v > 0)]
        if v.size:
            highs.append(v.max())
            lows.append(v.min())
    if not highs:
        return None
    mid_hi, mid_lo = np.median(highs), np.median(lows)
    hi = max(h for h in highs if h <= factor * mid_hi)
    lo = min(v for v in lows if v >= mid_lo / factor)
    return lo / 1.6, hi * 1.6  # a margin: points on the edge stay visible


def ood_curves(path, sweeps: Mapping[str, Mapping], *, title: str = "out of distribution") -> Path:
    """One panel per sweep: loss of every predictor against the swept value.

    The y-range is what most predictors span (:func:`robust_log_ylim`), so that one predictor's huge losses (least
    squares near N = d) do not flatten the others into one line: its points beyond the range are drawn on the edge
    as open triangles, and its legend entry says "off scale"."""
    n = len(sweeps)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 2.0, 3.2), squeeze=False)
    off_scale: set[str] = set()
    for ax, (name, sw) in zip(axes[0], sweeps.items()):
        values = sw["values"]
        numeric = all(isinstance(v, (int, float)) for v in values)
        xs = np.asarray(values if numeric else list(range(len(values))), np.float64)
        ylim = robust_log_ylim(sw["losses"])
        for i, (pname, losses) in enumerate(sw["losses"].items()):
            ys = np.asarray(losses, np.float64)
            ax.plot(xs, ys, marker="o", ms=3, label=pname, color=f"C{i}")
            if ylim is not None:
                above, below = ys > ylim[1], (ys > 0) & (ys < ylim[0])
                if above.any():
                    ax.plot(xs[above], np.full(above.sum(), ylim[1]), ls="none", marker="^", ms=6, mfc="none",
                            color=f"C{i}", clip_on=False)
                if below.any():
                    ax.plot(xs[below], np.full(below.sum(), ylim[0]), ls="none", marker="v", ms=6, mfc="none",
                            color=f"C{i}", clip_on=False)
                if above.any() or below.any():
                    off_scale.add(pname)
        if not numeric:
            ax.set_xticks(xs)
            ax.set_xticklabels(values, rotation=30, fontsize=7)
        ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("half-MSE")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    labels = [f"{lab} (off scale: triangles at the edge)" if lab in off_scale else lab for lab in labels]
    axes[0][-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the data
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def per_layer_losses(path, curves: Mapping[str, Sequence[float]], *, title: str = "loss after each layer / step"
                     ) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (name, vals) in enumerate(curves.items()):
        ax.plot(np.arange(1, len(vals) + 1), vals, marker="o", label=name, color=f"C{i}")
    ax.set_xlabel("layer / step")
    ax.set_ylabel("half-MSE")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def bar_chart(path: Path, values: Mapping[str, float], *, ylabel: str, title: str, log: bool = False,
              floor: float | None = None, errors: Mapping[str, float] | None = None) -> str:
    names = list(values)
    vals = np.array([values[n] for n in names], np.float64)
    if floor is not None:
        vals = np.maximum(vals, floor)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 2), 4))
    err = None if errors is None else [errors.get(n, 0.0) for n in names]
    ax.bar(range(len(names)), vals, yerr=err, color=[f"C{i % 10}" for i in range(len(names))])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    if floor is not None:
        ax.axhline(floor, color="grey", lw=0.8, ls=":")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path).name


def line_chart(path: Path, xs: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str, ylabel: str,
               title: str, logy: bool = False, logx: bool = False, floor: float | None = None) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, ys) in enumerate(series.items()):
        ys = np.asarray(ys, np.float64)
        if floor is not None:
            ys = np.maximum(ys, floor)
        ax.plot(xs, ys, marker="o", ms=4, label=name, color=f"C{i % 10}")
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path).name


def heatmap(path: Path, matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *, title: str,
            vmin: float = -1.0, vmax: float = 1.0, cmap: str = "RdBu_r") -> str:
    m = np.asarray(matrix, np.float64)
    fig, ax = plt.subplots(figsize=(1.4 * len(col_labels) + 3.5, 0.45 * len(row_labels) + 1.8))
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, "n/a" if not np.isfinite(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center",
                    fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path).name


def model_loss_curves(path: Path, losses: Mapping[str, np.ndarray], *, title: str, smooth: int = 50,
                baselines: Mapping[str, float] | None = None) -> str:
    """Training loss per step of several models (first seed, moving average), log scale."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, l) in enumerate(losses.items()):
        l = np.asarray(l, np.float64).reshape(-1, np.shape(l)[-1])[0]
        k = max(1, min(smooth, len(l) // 10 or 1))
        sm = np.convolve(l, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(l) + 1), sm, label=f"{name} (final {sm[-1]:.3g})", color=f"C{i % 10}")
    for j, (name, v) in enumerate((baselines or {}).items()):
        ax.axhline(v, ls="--", color="grey", lw=0.8 + 0.4 * j, label=f"{name} ({v:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("half-MSE on the query")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path).name


def curves_with_bands(path, series: Mapping[str, tuple[np.ndarray, np.ndarray]], *, xlabel: str, ylabel: str,
                      title: str = "", logy: bool = False) -> Path:
    """One line per series (mean over its columns, e.g. seeds) with a min-max band; ``series`` maps a name to
    (x of shape (T,), y of shape (T,) or (T, S))."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, (x, y)) in enumerate(series.items()):
        y = np.asarray(y, np.float64).reshape(len(x), -1)
        ax.plot(x, y.mean(1), label=f"{name} ({y.shape[1]} seed{'s' * (y.shape[1] != 1)})", color=f"C{i % 10}")
        if y.shape[1] > 1:
            ax.fill_between(x, y.min(1), y.max(1), color=f"C{i % 10}", alpha=0.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
