"""Every statistic of every attention matrix of a source, one layer at a time.

Matrices (rows = outputs, E = hidden size; for the linear-attention models W_O,h is P_h and E = D):

    W_Q, W_K, W_V, W_O              the whole layer's projection (H Kq x E, G Kq x E, G Kv x E, E x H Kv)
    W_Q head, W_K head, ...         one head's slice (W_K / W_V: one key/value head)
    W_K^T W_Q                       per query head h: W_K,g^T W_Q,h (E x E, rank <= Kq), g its key/value head
    W_O W_V                         per query head h: W_O,h W_V,g (E x E); P_h W_V,h for the linear-attention models

The last two are all that a linear-attention layer depends on ("Transformers learn in-context by gradient descent",
eq. 6; the dual view of "Why Can GPT Learn In-Context?"), so they are the fair objects to compare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Iterable

import numpy as np

from iclgd_synth.weights.loaders import LAYER_MATRICES, LayerWeights, ModelInfo, WeightSource
from iclgd_synth.weights.stats import matrix_stats, product_stats, singular_values

HEAD_MATRICES = tuple(f"{m} head" for m in LAYER_MATRICES)
PRODUCTS = ("W_K^T W_Q", "W_O W_V")
MATRICES = LAYER_MATRICES + HEAD_MATRICES + PRODUCTS
#: log10 bin edges of |w| / RMS(W) (histograms) and of |w| (cumulative small-magnitude curves).
REL_EDGES = np.linspace(-8.0, 2.0, 101)
ABS_EDGES = np.linspace(-10.0, 1.0, 111)
#: Matrices kept whole for heat maps only up to this size.
MAX_EXAMPLE_SIZE = 1024


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

    def add(self, magnitudes: np.ndarray) -> None:
        a = np.abs(np.asarray(magnitudes, np.float64)).ravel()
        nz = a[a > 0]
        logs = np.log10(nz)
        self.counts += np.histogram(logs, bins=self.edges)[0]
        self.zeros += a.size - nz.size
        self.below += int(np.count_nonzero(logs < self.edges[0]))
        self.total += a.size

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
      seconds: time spent reading and computing.
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
                "seconds": round(self.seconds, 3), "matrices": [r.to_dict() for r in self.records]}


def collect_stats(source: WeightSource, *, heads: bool = True, progress: bool = False) -> SourceStats:
    """Read ``source`` layer by layer and compute every statistic (tqdm progress over layers if ``progress``)."""
    t0 = time.perf_counter()
    out = SourceStats(info=source.info, kind=source.kind)
    layers: Iterable[LayerWeights] = source.layers()
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, total=source.n_layers, desc=source.name, unit="layer", leave=False)
    middle = source.n_layers // 2
    with _single_threaded_blas():
        for layer in layers:
            _layer_stats(layer, out, heads=heads, keep_examples=layer.index in (0, middle))
            out.n_layers += 1
    out.seconds = time.perf_counter() - t0
    return out


def _single_threaded_blas():
    """One BLAS thread while computing: the matrices are small (<= a few hundred rows, or sparse), where threads gain
    little, and on a shared 2-core machine a multi-threaded OpenBLAS SVD ran ~8x slower than a single-threaded one.
    Uses threadpoolctl when it is installed; otherwise changes nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _layer_stats(layer: LayerWeights, out: SourceStats, *, heads: bool, keep_examples: bool) -> None:
    i = layer.index

    def add(matrix: str, head: int | None, shape, stats: dict, s: np.ndarray | None = None) -> None:
        out.records.append(MatrixRecord(matrix, i, head, tuple(int(x) for x in shape), stats))
        if s is not None and s.size and s[0] > 0:
            out.spectra.setdefault(matrix, []).append(np.asarray(s / s[0], np.float32))

    layer_stats = {}
    for name in LAYER_MATRICES:
        w = np.asarray(layer.matrix(name), np.float64)
        s = singular_values(w)
        layer_stats[name] = matrix_stats(w, s)
        add(name, None, w.shape, layer_stats[name], s)
        out.rel_hist.setdefault(name, Histogram.empty(REL_EDGES)).add(w / max(np.sqrt(np.mean(w * w)), 1e-300))
        out.abs_hist.setdefault(name, Histogram.empty(ABS_EDGES)).add(w)
    if heads:
        if layer.n_heads == 1 and layer.n_kv_heads == 1:
            for name in LAYER_MATRICES:  # one head: its slice is the whole matrix, same statistics
                add(f"{name} head", 0, layer.matrix(name).shape, dict(layer_stats[name]))
        else:
            slices = {"W_Q": layer.w_q, "W_K": layer.w_k, "W_V": layer.w_v, "W_O": layer.w_o}
            for name, stack in slices.items():
                for h, w in enumerate(stack):
                    w = np.asarray(w, np.float64)
                    s = singular_values(w)
                    add(f"{name} head", h, w.shape, matrix_stats(w, s), s)
    for h in range(layer.n_heads):
        g = layer.kv_head(h)
        for name, (a, b) in (("W_K^T W_Q", (layer.w_k[g].T, layer.w_q[h])),
                             ("W_O W_V", (layer.w_o[h], layer.w_v[g]))):
            stats, m, s = product_stats(a, b)
            add(name, h, m.shape, stats, s)
            if keep_examples and h == 0 and m.size <= MAX_EXAMPLE_SIZE ** 2:
                out.examples[f"{name} L{i} h{h}"] = np.asarray(m, np.float32)
