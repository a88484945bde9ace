"""Pieces shared by the critique studies: run directories, overrides, float64 evaluation, tables and figures."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth import plotting  # noqa: F401  (sets the Agg backend before pyplot is imported)
from iclgd_synth.studies.rundir import is_finished, run_directory, write_json
from iclgd_synth.train import TrainConfig, TrainResult, train

import matplotlib.pyplot as plt  # noqa: E402


def prepare_run(root: str, name: str, config: dict, force: bool) -> tuple[Path, bool]:
    """The run directory for ``config`` and whether a finished run is already there (then nothing is recomputed).

    With ``force`` an existing directory is removed first. config.json is written before any work starts."""
    out = run_directory(root, name, config)
    if is_finished(out) and not force:
        print(f"{name}: finished run found in {out} (use --force to recompute)")
        return out, True
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    return out, False


#: CLI override names (``iclgd run NAME --steps ... --seeds ...``) and the study fields they set.
_ALIASES = {"n_steps": "train_steps", "seeds": "seed"}


def apply_overrides(study: Any, overrides: Mapping[str, Any]) -> Any:
    """``study`` with fields replaced; ``n_steps`` sets ``train_steps`` and ``seeds`` the (first) ``seed``.

    Unknown names raise TypeError listing the accepted ones."""
    names = {f.name for f in dataclasses.fields(study)}
    changes = {}
    for key, value in overrides.items():
        field = _ALIASES.get(key, key)
        if field not in names:
            raise TypeError(f"unknown override {key!r} for {type(study).__name__}; accepted: "
                            f"{sorted(names | set(_ALIASES))}")
        if key == "seeds":
            value = int(tuple(value)[0])
        changes[field] = value
    return dataclasses.replace(study, **changes)


def to_float64(tree: Any) -> Any:
    """Every floating leaf as float64 (call inside ``jax.enable_x64(True)``)."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                        else a, tree)


def train_model(config: TrainConfig, workdir: Path, progress: bool) -> TrainResult:
    """Train with checkpoints in ``workdir`` (an interrupted study resumes where it stopped)."""
    return train(config, workdir, progress=progress)


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not np.isfinite(v):
            return "n/a" if np.isnan(v) else str(v)
        if v == 0.0:
            return "0"
        return f"{v:.{digits}g}"
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with formatted numbers."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> str:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def matrix_heatmaps(path: Path, matrices: Mapping[str, np.ndarray], *, title: str = "") -> str:
    """Several matrices side by side, each with its own symmetric colour scale."""
    return plotting.weight_heatmaps(path, matrices, title=title).name


def loss_curves(path: Path, losses: Mapping[str, np.ndarray], *, title: str, smooth: int = 50,
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
    return _save(fig, path)
