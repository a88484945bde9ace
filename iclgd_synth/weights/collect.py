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
import math
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from iclgd_synth.weights.checkpoint import LAYER_MATRICES, LayerWeights, WeightSource
from iclgd_synth.weights.records import Histogram, MatrixRecord, SourceStats  # noqa: F401  (re-exported)
from iclgd_synth.weights.stats import (
    SparseMatrix, is_sparse, matrix_stats, product, product_stats, singular_values, thin_r,
)

HEAD_MATRICES = tuple(f"{m} head" for m in LAYER_MATRICES)
PRODUCTS = ("W_K^T W_Q", "W_O W_V")
MATRICES = LAYER_MATRICES + HEAD_MATRICES + PRODUCTS
#: log10 bin edges of |w| / RMS(W) (histograms) and of |w| (cumulative small-magnitude curves).
REL_EDGES = np.linspace(-8.0, 2.0, 101)
ABS_EDGES = np.linspace(-10.0, 1.0, 111)
#: Matrices kept whole for heat maps only up to this size.
MAX_EXAMPLE_SIZE = 1024


def collect_stats(source: WeightSource, *, heads: bool = True, progress: bool = False,
                  cache: bool | str | Path | None = None, workers: int | None = None) -> SourceStats:
    """Read ``source`` layer by layer and compute every statistic (tqdm progress over layers if ``progress``).

    Sources read from checkpoint files go through the on-disk cache (:mod:`~iclgd_synth.weights.cache`): ``cache``
    None / True uses the folder from ``$ICLGD_CACHE`` (``0`` disables) or the user cache folder, a path uses that
    folder, False computes afresh and stores nothing. In-memory sources are always computed.

    ``workers`` threads read and process layers side by side (None: one per available core, at most
    :data:`MAX_WORKERS`); NumPy releases the GIL in the sorts, reductions and LAPACK calls that take the time. Each
    layer is computed the same way whatever the number of threads, and merged in layer order, so the statistics do
    not depend on it.
    """
    from iclgd_synth.weights.cache import cached_collect

    return cached_collect(source, lambda: _collect(source, heads=heads, progress=progress, workers=workers),
                          heads=heads, cache=cache)


#: Default upper bound on the threads of :func:`collect_stats`.
MAX_WORKERS = 2


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def _collect(source: WeightSource, *, heads: bool, progress: bool, workers: int | None = None) -> SourceStats:
    t0 = time.perf_counter()
    out = SourceStats(info=source.info, kind=source.kind)
    n = source.n_layers
    middle = n // 2
    workers = default_workers() if workers is None else max(1, int(workers))

    def one_layer(i: int) -> SourceStats:
        part = SourceStats(info=source.info, kind=source.kind)
        _layer_stats(source.read_layer(i), part, heads=heads, keep_examples=i in (0, middle))
        return part

    with _single_threaded_blas(), contextlib.ExitStack() as stack:
        if workers > 1 and n > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = stack.enter_context(ThreadPoolExecutor(max_workers=min(workers, n)))
            futures = [pool.submit(one_layer, i) for i in range(n)]
            # on an error, drop the layers not started yet instead of computing them before re-raising
            stack.callback(lambda: [f.cancel() for f in futures])
            parts: Iterable[SourceStats] = (f.result() for f in futures)  # in layer order
        else:
            parts = map(one_layer, range(n))
        if progress:
            from tqdm.auto import tqdm

            parts = tqdm(parts, total=n, desc=source.name, unit="layer", leave=False)
        for part in parts:
            _merge(out, part)
    out.seconds = time.perf_counter() - t0
    return out


def _merge(out: SourceStats, part: SourceStats) -> None:
    """Append one layer's statistics (records, spectra, histogram counts, examples) to ``out``."""
    out.records += part.records
    for matrix, curves in part.spectra.items():
        out.spectra.setdefault(matrix, []).extend(curves)
    for mine, theirs in ((out.rel_hist, part.rel_hist), (out.abs_hist, part.abs_hist)):
        for matrix, h in theirs.items():
            if matrix not in mine:
                mine[matrix] = Histogram.empty(h.edges)
            m = mine[matrix]
            m.counts += h.counts
            m.zeros, m.below, m.total = m.zeros + h.zeros, m.below + h.below, m.total + h.total
    out.examples.update(part.examples)
    out.n_layers += 1


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

    # Whole-layer matrices in float64, or by their nonzero entries when mostly zero (the hand weights)
    whole: dict[str, np.ndarray | SparseMatrix] = {}
    layer_stats = {}
    for name in LAYER_MATRICES:
        w32 = layer.matrix(name)
        w = SparseMatrix.from_dense(w32) if is_sparse(w32) else np.asarray(w32, np.float64)
        whole[name] = w
        s = singular_values(w)
        layer_stats[name] = matrix_stats(w, s)
        add(name, None, w.shape, layer_stats[name], s)
        values = w.vals if isinstance(w, SparseMatrix) else w.ravel()
        logs = np.log10(np.abs(values[values != 0]))  # log10 |w| once; log10 (|w| / RMS) is a shift of it
        rms = math.sqrt(np.dot(values, values) / w.size) if logs.size else 1.0
        out.abs_hist.setdefault(name, Histogram.empty(ABS_EDGES)).add_log10(logs, w.size)
        out.rel_hist.setdefault(name, Histogram.empty(REL_EDGES)).add_log10(logs - math.log10(rms), w.size)

    # Per head: (H, Kq, E), (G, Kq, E), (G, Kv, E), (H, E, Kv) views of the float64 whole-layer matrices
    n_h, n_g = layer.n_heads, layer.n_kv_heads
    one_head = n_h == 1 and n_g == 1
    raw = {"W_Q": layer.w_q, "W_K": layer.w_k, "W_V": layer.w_v, "W_O": layer.w_o}

    def per_head(name: str):
        w = whole[name]
        if isinstance(w, SparseMatrix):
            return [w] if one_head else raw[name].astype(np.float64)
        if name == "W_O":
            return w.reshape(w.shape[0], n_h, -1).transpose(1, 0, 2)
        return w.reshape(raw[name].shape)

    w_q, w_k, w_v, w_o = (per_head(n) for n in LAYER_MATRICES)
    # R factors of the thin QR of the (E x K) orientation: W_Q,h^T, W_K,g^T, W_V,g^T and W_O,h
    r_q, r_k = _thin_factors(w_q, transpose=True), _thin_factors(w_k, transpose=True)
    r_v, r_o = _thin_factors(w_v, transpose=True), _thin_factors(w_o, transpose=False)
    if heads:
        if one_head:
            for name in LAYER_MATRICES:  # one head: its slice is the whole matrix, same statistics
                add(f"{name} head", 0, whole[name].shape, dict(layer_stats[name]))
        else:
            for name, stack, r in (("W_Q", w_q, r_q), ("W_K", w_k, r_k), ("W_V", w_v, r_v), ("W_O", w_o, r_o)):
                # a slice's singular values are those of its R factor (k x k) when it has one
                s_all = np.linalg.svd(r, compute_uv=False) if r is not None else None
                for h, w in enumerate(stack):
                    s = s_all[h] if s_all is not None else singular_values(w)
                    add(f"{name} head", h, w.shape, matrix_stats(w, s), s)
    g_of = [layer.kv_head(h) for h in range(n_h)]
    # Products per query head h with its key/value head g: W_K,g^T W_Q,h = (Qk Rk)(Qq Rq)^T has the singular values
    # of Rk Rq^T (Kq x Kq), and W_O,h W_V,g = (Qo Ro)(Qv Rv)^T those of Ro Rv^T, so each QR is taken once per head.
    s_kq = _product_spectra(r_k, r_q, g_of, None)
    s_ov = _product_spectra(r_o, r_v, None, g_of)
    for h, g in enumerate(g_of):
        for name, (a, b), s in (("W_K^T W_Q", (w_k[g].T, w_q[h]), s_kq), ("W_O W_V", (w_o[h], w_v[g]), s_ov)):
            if s is None:  # sparse or not thin: the general route
                stats, m, sv = product_stats(a, b)
            else:
                m = product(a, b)
                sv = np.concatenate([s[h], np.zeros(min(m.shape) - s.shape[1])])
                stats = matrix_stats(m, sv, square=True)
            add(name, h, m.shape, stats, sv)
            if keep_examples and h == 0 and m.shape[0] * m.shape[1] <= MAX_EXAMPLE_SIZE ** 2:
                dense = m.to_dense() if isinstance(m, SparseMatrix) else m
                out.examples[f"{name} L{i} h{h}"] = np.asarray(dense, np.float32)


def _thin_factors(stack, *, transpose: bool) -> np.ndarray | None:
    """R factors (N, K, K) of the thin QR of each (E x K) matrix of the stack (of each matrix's transpose with
    ``transpose``), or None when the product route would not use them (K > E / 2, or a sparse matrix: those go
    through the general path)."""
    if not isinstance(stack, np.ndarray):
        return None
    stack = stack.transpose(0, 2, 1) if transpose else stack
    _, e, k = stack.shape
    if 2 * k > e or any(is_sparse(w) for w in stack):
        return None
    return thin_r(stack)


def _product_spectra(r_a, r_b, idx_a, idx_b) -> np.ndarray | None:
    """Nonzero singular values (H, K) of the products A_h B_h with R factors r_a[idx_a[h]] and r_b[idx_b[h]]
    (index None: the head itself), or None when either factor stack has no R factors."""
    if r_a is None or r_b is None:
        return None
    a = r_a if idx_a is None else r_a[idx_a]
    b = r_b if idx_b is None else r_b[idx_b]
    return np.linalg.svd(a @ b.transpose(0, 2, 1), compute_uv=False)
