"""What the statistics of a source are made of: one record per matrix, magnitude histograms, and the whole source.

Shared by the code that computes them (:mod:`~iclgd_synth.weights.collect`) and the on-disk cache that stores them
(:mod:`~iclgd_synth.weights.cache`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from iclgd_synth.weights.checkpoint import ModelInfo


@dataclasses.dataclass
class MatrixRecord:
    """The statistics of one matrix: ``head`` is None for whole-layer matrices (a key/value head for W_K/W_V head)."""

    matrix: str
    layer: int
    head: int | None
    shape: tuple[int, int]
    stats: dict[str, float]

    def to_dict(self) -> dict:
        return {"matrix": self.matrix, "layer": self.layer, "head": self.head, "shape": list(self.shape),
                "stats": self.stats}


@dataclasses.dataclass
class Histogram:
    """Counts of log10 magnitudes over fixed edges, plus exact zeros and magnitudes below the first edge."""

    edges: np.ndarray
    counts: np.ndarray
    zeros: int = 0
    below: int = 0
    total: int = 0

    @classmethod
    def empty(cls, edges: np.ndarray) -> "Histogram":
        return cls(edges, np.zeros(len(edges) - 1, np.int64))

    def add_log10(self, logs: np.ndarray, size: int) -> None:
        """Count a matrix of ``size`` entries given log10 of the magnitudes of its nonzero entries."""
        # the edges are evenly spaced: numpy's equal-bin path (same edges, same counts, several times faster)
        self.counts += np.histogram(logs, bins=len(self.edges) - 1, range=(self.edges[0], self.edges[-1]))[0]
        self.zeros += int(size) - logs.size
        self.below += int(np.count_nonzero(logs < self.edges[0]))
        self.total += int(size)

    def fraction_below(self) -> np.ndarray:
        """Fraction of entries with magnitude < 10**edge at every edge (zeros included)."""
        cum = np.concatenate([[0], np.cumsum(self.counts)])
        return (self.zeros + self.below + cum) / max(self.total, 1)


@dataclasses.dataclass
class SourceStats:
    """All statistics of one source.

    Attributes:
      info: the source's metadata.   kind: "llm", "hand", "trained" or "synthetic".
      n_layers: layers read.         records: one :class:`MatrixRecord` per matrix.
      spectra: matrix -> singular values s / s_1 of every matrix of that kind (for the spectrum figure).
      rel_hist / abs_hist: matrix -> :class:`Histogram` of log10(|w| / RMS) / log10 |w| (whole-layer matrices).
      examples: "W_K^T W_Q L0 h0" -> the matrix (heat maps; only matrices up to MAX_EXAMPLE_SIZE).
      seconds: time spent reading and computing (or reading the cache).
      cached: whether the statistics came from the on-disk cache (:mod:`~iclgd_synth.weights.cache`).
    """

    info: ModelInfo
    kind: str
    n_layers: int = 0
    records: list[MatrixRecord] = dataclasses.field(default_factory=list)
    spectra: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    rel_hist: dict[str, Histogram] = dataclasses.field(default_factory=dict)
    abs_hist: dict[str, Histogram] = dataclasses.field(default_factory=dict)
    examples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False

    @property
    def name(self) -> str:
        return self.info.name

    def values(self, matrix: str, stat: str) -> np.ndarray:
        """The statistic over every matrix of that kind (layers, or layers x heads), NaNs dropped."""
        v = np.array([r.stats.get(stat, math.nan) for r in self.records if r.matrix == matrix], np.float64)
        return v[~np.isnan(v)]

    def value(self, matrix: str, stat: str) -> float:
        """One number for the source: the median over its matrices of that kind (NaN if none)."""
        v = self.values(matrix, stat)
        return float(np.median(v)) if v.size else math.nan

    def to_dict(self) -> dict:
        return {"info": self.info.to_dict(), "kind": self.kind, "layers_read": self.n_layers,
                "seconds": round(self.seconds, 3), "cached": self.cached,
                "matrices": [r.to_dict() for r in self.records]}
