"""Statistics of one weight matrix (NumPy, float64), chosen to be comparable across sources of different scale and size.

A weight matrix's overall scale is arbitrary for linear attention (W_K^T W_Q can be rescaled by s and P W_V by 1/s),
so besides the absolute thresholds that "Do pretrained Transformers Learn In-Context by Gradient Descent?" tabulates,
every statistic here is scale-invariant, and the rank-like ones are also given divided by n = min(rows, columns):

    entries     zero            fraction of entries exactly 0
                abs<t           fraction with |w| < t, t = 1e-2 ... 1e-6 (absolute, as in the critique)
                rel<t           fraction with |w| < t * RMS(W) (scale-invariant)
                kurtosis        excess kurtosis of the entries (0 for a Gaussian, 3 for a Laplace law)
                ks_normal       Kolmogorov-Smirnov distance between the entries and a normal law of the same mean and
                                standard deviation (0 = Gaussian-looking; ~0.5 when nearly all entries are zero)
    spectrum    stable_rank     ||W||_F^2 / ||W||_2^2            stable_rank/n  the same divided by n
                eff_rank        exp(entropy of s / sum(s)) ("The effective rank: a measure of effective dimensionality")
                eff_rank/n      the same divided by n
                rank/n          numerical rank / n (tolerance as numpy.linalg.matrix_rank)
                top10_energy    fraction of sum(s^2) in the largest ceil(n / 10) singular values (0.1 for a flat
                                spectrum, 1 for rank <= n / 10): how fast the spectrum decays
                sv_slope        least-squares slope of log s_k against log k over the numerically nonzero s_k (0 for a
                                flat spectrum, more negative = faster power-law decay; needs >= 3 of them)
    products M  symmetry        ||(M + M^T) / 2||_F / ||M||_F  (1 symmetric, ~1/sqrt(2) random, 0 antisymmetric)
                cos_I           tr(M) / (||M||_F sqrt(n)): cosine between M and the identity
                diag_energy     ||diag(M)||_2 / ||M||_F: how much of M lies on its diagonal
                top_row_energy  largest squared row norm / ||M||_F^2 (1 when one row carries all of M, as the y-row
                                of the hand-constructed P W_V)

The product statistics (last block) are computed only for the per-head products W_K^T W_Q and W_O W_V (E x E, rows
and columns both indexed by the hidden / token coordinates, so that symmetry and the diagonal mean something); a
whole-layer W_Q or W_O that happens to be square (H Kq = E) has head coordinates on one side, where they do not.

Entry statistics sort the nonzero entries once: the small-entry fractions are counted on the sorted array and the
Kolmogorov-Smirnov distance is evaluated exactly, but only on the blocks of the sorted values where a bound says the
supremum can lie. Mostly-zero matrices (the hand-constructed ones; :class:`SparseMatrix`) are handled by their nonzero
entries alone: their singular values are computed exactly from the connected blocks of the nonzero pattern (the
singular values of a matrix are those of its blocks), and those of thin products A B (a head's W_K^T W_Q, rank <= Kq)
from two QR factors, so no dense 4096 x 4096 matrix is formed and no dense SVD of one is ever taken.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

THRESHOLDS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
#: Below this fraction of nonzero entries a matrix is treated as sparse (block SVD, sparse products).
SPARSE_DENSITY = 0.05
#: Statistics defined only for the per-head products (E x E matrices with the same coordinates on both sides).
PRODUCT_STATISTICS = ("symmetry", "cos_I", "diag_energy", "top_row_energy")
#: Sorted entries per block in the exact Kolmogorov-Smirnov search (:func:`ks_normal_distance`).
KS_BLOCK = 128


def _t(t: float) -> str:
    return f"{t:.0e}".replace("e-0", "e-")


#: Statistic key -> one-line description, in report order.
STATISTICS = {
    "zero": "fraction of entries exactly zero",
    **{f"abs<{_t(t)}": f"fraction of entries with |w| < {_t(t)}" for t in THRESHOLDS},
    **{f"rel<{_t(t)}": f"fraction of entries with |w| < {_t(t)} x RMS(W)" for t in THRESHOLDS},
    "kurtosis": "excess kurtosis of the entries (Gaussian 0, Laplace 3)",
    "ks_normal": "Kolmogorov-Smirnov distance of the entries to a normal law with the same mean and std",
    "stable_rank": "stable rank ||W||_F^2 / ||W||_2^2",
    "stable_rank/n": "stable rank / min(rows, cols)",
    "eff_rank": "effective rank exp(entropy of normalised singular values)",
    "eff_rank/n": "effective rank / min(rows, cols)",
    "rank/n": "numerical rank / min(rows, cols)",
    "top10_energy": "fraction of squared singular values in the top 10% (spectrum decay)",
    "sv_slope": "fitted power-law slope of the singular values (log s_k vs log k)",
    "symmetry": "||sym(M)||_F / ||M||_F (per-head products W_K^T W_Q and W_O W_V only)",
    "cos_I": "cosine between M and the identity, tr(M) / (||M||_F sqrt(n))",
    "diag_energy": "||diag(M)|| / ||M||_F (diagonal dominance)",
    "top_row_energy": "largest row's share of ||M||_F^2 (per-head products only)",
}


def as_matrix(w) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a matrix (2-D array), got shape {w.shape}")
    if w.size == 0:
        raise ValueError("expected a non-empty matrix")
    return w


# --- entries ------------------------------------------------------------------------------------------------------


def zero_fraction(w) -> float:
    w = np.asarray(w)
    return float(np.count_nonzero(w == 0) / w.size)


def rms(w) -> float:
    w = np.asarray(w, np.float64)
    return float(np.sqrt(np.mean(w * w)))


def small_fraction(w, threshold: float, *, relative: bool = False) -> float:
    """Fraction of entries with |w| < threshold (times RMS(W) when ``relative``)."""
    w = np.abs(np.asarray(w, np.float64))
    t = threshold * (rms(w) if relative else 1.0)
    return float(np.count_nonzero(w < t) / w.size)


def excess_kurtosis(w) -> float:
    """m4 / m2^2 - 3 over all entries (NaN for a constant matrix)."""
    if isinstance(w, SparseMatrix):
        _, m2, m4 = _moments(w.size, w.vals)
    else:
        x = np.asarray(w, np.float64).ravel()
        _, m2, m4 = _moments(x.size, _nonzero(x))
    return _kurtosis(m2, m4)


def _nonzero(x: np.ndarray) -> np.ndarray:
    """The nonzero entries of a flat array (the array itself, not a copy, when it has no zeros)."""
    return x if np.count_nonzero(x) == x.size else x[x != 0]


def _moments(size: int, nonzero: np.ndarray) -> tuple[float, float, float]:
    """Mean and second and fourth central moments of ``size`` entries given the nonzero ones (the rest are zeros):
    exact, and cheap for mostly-zero matrices. The sums of squares are dot products (one pass each, no temporary
    for the fourth powers; they differ from x.var()'s pairwise sums only by rounding)."""
    n_zero = size - nonzero.size
    mu = nonzero.sum() / size
    c = nonzero - mu
    m2 = (np.dot(c, c) + n_zero * mu ** 2) / size
    np.multiply(c, c, out=c)
    m4 = (np.dot(c, c) + n_zero * mu ** 4) / size
    return float(mu), float(m2), float(m4)


def _kurtosis(m2: float, m4: float) -> float:
    if m2 <= 1e-300:
        return math.nan
    return float(m4 / m2 ** 2 - 3.0)


class _SortedEntries:
    """The entries of a matrix as its sorted nonzero entries plus a count of zeros (the zeros are never materialised:
    the hand-constructed matrices at D = 4096 have 16.7 million entries, all but a few thousand of them zero)."""

    def __init__(self, size: int, nonzero: np.ndarray):
        self.n = int(size)
        self.n_zero = self.n - nonzero.size
        self.s = np.sort(nonzero)

    def count_below(self, v) -> np.ndarray:
        """#entries < v (elementwise over an array of values v)."""
        v = np.asarray(v, np.float64)
        return np.searchsorted(self.s, v, "left") + self.n_zero * (v > 0)

    def count_at_most(self, v) -> np.ndarray:
        """#entries <= v."""
        v = np.asarray(v, np.float64)
        return np.searchsorted(self.s, v, "right") + self.n_zero * (v >= 0)

    def count_abs_below(self, c: float) -> int:
        """#entries with |w| < c."""
        if not c > 0:
            return 0
        return int(self.count_below(c) - self.count_at_most(-c))


def ks_normal_distance(w) -> float:
    """sup_x |F_entries(x) - Phi((x - mean) / std)|, exact with ties (NaN for a constant matrix)."""
    x = np.asarray(w, np.float64).ravel()
    return _ks_normal(x, _SortedEntries(x.size, _nonzero(x)))


def _ks_normal(x: np.ndarray | None, e: _SortedEntries, moments: tuple[float, float, float] | None = None) -> float:
    """The KS distance from the sorted entries: the supremum over the distinct values v of |F(v) - Phi(v)| and
    |F(v-) - Phi(v)|, evaluated exactly (the same arithmetic as a pass over every distinct value) but only where it
    can be attained. Between the ends lo <= hi of a block of KS_BLOCK consecutive sorted values both F and Phi are
    monotone, so every value in the block is within max(F(hi) - Phi(lo), Phi(hi) - F(lo-)) of the supremum's
    candidates; the interiors of blocks whose bound is below the best value found at the block ends are skipped."""
    from scipy.special import ndtr

    if moments is not None:  # x.mean() and x.std() but for rounding
        mean, sd = moments[0], math.sqrt(moments[1])
    else:
        mean, sd = x.mean(), x.std()
    if sd == 0:
        return math.nan
    n, s, n_zero = e.n, e.s, e.n_zero

    def exact(v: np.ndarray, below: np.ndarray, at_most: np.ndarray) -> float:
        """max |F - Phi| at the values v, given #entries < v and <= v."""
        if v.size == 0:
            return -math.inf
        upper = at_most / n                           # F at (and including) v
        lower = upper - (at_most - below) / n         # F just below v
        phi = ndtr((v - mean) / sd)
        return float(max(np.max(np.abs(upper - phi)), np.max(np.abs(lower - phi))))

    ends = [np.array([0.0])] if n_zero else []
    if s.size == 0:
        return exact(ends[0], np.zeros(1), np.full(1, n_zero))
    starts = np.arange(0, s.size, KS_BLOCK)
    stops = np.minimum(starts + KS_BLOCK, s.size) - 1
    lo, hi = s[starts], s[stops]
    v = np.unique(np.concatenate([lo, hi] + ends))
    best = exact(v, e.count_below(v), e.count_at_most(v))
    bound = np.maximum(e.count_at_most(hi) / n - ndtr((lo - mean) / sd),
                       ndtr((hi - mean) / sd) - e.count_below(lo) / n)
    # 1e-12: slack for rounding in Phi at the block ends (Phi is monotone only up to rounding)
    open_blocks = np.flatnonzero((bound + 1e-12 >= best) & (stops - starts > 1))
    if open_blocks.size:
        # interior positions of the open blocks; a value strictly between its block's ends occurs only inside the
        # block, so its first and last positions there give its exact counts (values equal to an end were done)
        a, b = starts[open_blocks], stops[open_blocks]
        lengths = b - a - 1
        idx = np.repeat(a + 1 - np.cumsum(np.concatenate([[0], lengths[:-1]])), lengths) + np.arange(lengths.sum())
        block_lo, block_hi = np.repeat(s[a], lengths), np.repeat(s[b], lengths)
        vals = s[idx]
        keep = (vals > block_lo) & (vals < block_hi)
        first = keep & (vals != s[idx - 1])
        last = keep & (vals != s[idx + 1])
        v = vals[first]
        zeros_below, zeros_at_most = n_zero * (v > 0), n_zero * (v >= 0)
        best = max(best, exact(v, idx[first] + zeros_below, idx[last] + 1 + zeros_at_most))
    return best


def entry_stats(w) -> dict[str, float]:
    """Entry statistics of a dense matrix or a :class:`SparseMatrix` (the same definitions; the sparse one computes
    its RMS, mean and standard deviation from the nonzero entries, which changes them only by rounding)."""
    if isinstance(w, SparseMatrix):
        x, nonzero, size = None, w.vals, w.size
        r = math.sqrt(np.dot(nonzero, nonzero) / size)
    else:
        w = as_matrix(w)
        x = w.ravel()
        nonzero, size = _nonzero(x), x.size
        r = math.sqrt(np.dot(x, x) / size)  # RMS(W) (a dot product: one pass, no temporary)
    e = _SortedEntries(size, nonzero)
    out = {"zero": float(e.n_zero / size)}
    for t in THRESHOLDS:
        out[f"abs<{_t(t)}"] = float(e.count_abs_below(t) / size)
    for t in THRESHOLDS:
        out[f"rel<{_t(t)}"] = float(e.count_abs_below(t * r) / size)
    moments = _moments(size, nonzero)
    out["kurtosis"] = _kurtosis(moments[1], moments[2])
    out["ks_normal"] = _ks_normal(x, e, moments)
    return out


@dataclasses.dataclass(frozen=True)
class SparseMatrix:
    """A mostly-zero matrix as its nonzero entries (coordinate form): the hand-constructed weights at D = 4096 have
    16.7 million entries of which a few thousand are nonzero, and every statistic here follows from those.

    Attributes: rows, cols (int arrays), vals (float64), shape (rows, columns)."""

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, w) -> "SparseMatrix":
        w = np.asarray(w)
        if w.ndim != 2 or w.size == 0:
            raise ValueError(f"expected a non-empty matrix, got shape {w.shape}")
        rows, cols = np.nonzero(w)
        return cls(rows, cols, np.asarray(w[rows, cols], np.float64), (int(w.shape[0]), int(w.shape[1])))

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def T(self) -> "SparseMatrix":
        return SparseMatrix(self.cols, self.rows, self.vals, (self.shape[1], self.shape[0]))

    def csr(self):
        from scipy.sparse import coo_matrix

        return coo_matrix((self.vals, (self.rows, self.cols)), shape=self.shape).tocsr()

    def to_dense(self, dtype=np.float64) -> np.ndarray:
        out = np.zeros(self.shape, dtype)
        out[self.rows, self.cols] = self.vals
        return out


def _from_csr(m) -> SparseMatrix:
    m.eliminate_zeros()
    c = m.tocoo()
    return SparseMatrix(np.asarray(c.row), np.asarray(c.col), np.asarray(c.data, np.float64),
                        (int(m.shape[0]), int(m.shape[1])))


# --- spectrum -----------------------------------------------------------------------------------------------------


def is_sparse(w) -> bool:
    if isinstance(w, SparseMatrix):
        return True
    w = np.asarray(w)
    return np.count_nonzero(w) <= SPARSE_DENSITY * w.size


def singular_values(w, method: str = "auto") -> np.ndarray:
    """All min(rows, cols) singular values, descending. ``method``: "dense", "blocks" or "auto" (blocks if sparse)."""
    if method not in ("auto", "dense", "blocks"):
        raise ValueError(f"method must be 'auto', 'dense' or 'blocks', got {method!r}")
    if isinstance(w, SparseMatrix):
        return _block_singular_values(w) if method != "dense" else np.linalg.svd(w.to_dense(), compute_uv=False)
    w = as_matrix(w)
    if method == "dense" or (method == "auto" and not is_sparse(w)):
        return np.linalg.svd(w, compute_uv=False)
    return _block_singular_values(SparseMatrix.from_dense(w))


def _block_singular_values(w: SparseMatrix) -> np.ndarray:
    """Singular values from the connected components of the bipartite row-column graph of the nonzeros."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    m, n = w.shape
    k = min(m, n)
    rows, cols, vals = w.rows, w.cols, w.vals
    if rows.size == 0:
        return np.zeros(k)
    graph = coo_matrix((np.ones(rows.size), (rows, cols + m)), shape=(m + n, m + n))
    _, labels = connected_components(graph, directed=False)
    lab = labels[rows]
    per_label = np.bincount(lab)
    single = per_label[lab] == 1  # a component with a single nonzero entry: its singular value is |entry|
    found = [np.abs(vals[single])]
    multi = np.unique(lab[~single])
    if multi.size:
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], multi)
        ends = np.searchsorted(lab[order], multi, side="right")
        for lo, hi in zip(bounds, ends):
            idx = order[lo:hi]
            # the block holds every nonzero of its rows and columns: they all belong to this component
            r_set, c_set = np.unique(rows[idx]), np.unique(cols[idx])
            block = np.zeros((r_set.size, c_set.size))
            block[np.searchsorted(r_set, rows[idx]), np.searchsorted(c_set, cols[idx])] = vals[idx]
            found.append(np.linalg.svd(block, compute_uv=False))
    s = np.concatenate(found)
    return np.sort(np.concatenate([s, np.zeros(k - s.size)]))[::-1]


def product(a, b) -> np.ndarray | SparseMatrix:
    """A @ B in float64, through scipy.sparse when both factors are sparse (a :class:`SparseMatrix` when both are)."""
    if isinstance(a, SparseMatrix) or isinstance(b, SparseMatrix):
        a = a if isinstance(a, SparseMatrix) else SparseMatrix.from_dense(as_matrix(a))
        b = b if isinstance(b, SparseMatrix) else SparseMatrix.from_dense(as_matrix(b))
        return _from_csr(a.csr() @ b.csr())
    a, b = as_matrix(a), as_matrix(b)
    if a.size > 65536 and is_sparse(a) and is_sparse(b):
        from scipy.sparse import csr_matrix

        return np.asarray((csr_matrix(a) @ csr_matrix(b)).toarray())
    return a @ b


def thin_r(a) -> np.ndarray:
    """R of the thin QR factorisation of a tall matrix (or of each matrix of a stack): singular values of a equal
    those of R (r x r), and of a product A B those of R_A R_{B^T}^T."""
    return np.linalg.qr(np.asarray(a, np.float64), mode="r")


def is_thin_product(a, b) -> bool:
    """Whether A B (m x r times r x n) goes through two QR factors: r small against min(m, n), both factors dense."""
    (m, r), n = _shape(a), _shape(b)[1]
    return 2 * r <= min(m, n) and not (is_sparse(a) or is_sparse(b))


def _shape(w) -> tuple[int, int]:
    return w.shape if isinstance(w, SparseMatrix) else np.shape(w)


def product_singular_values(a, b) -> np.ndarray:
    """Singular values of A @ B (all min(rows A, cols B) of them), cheaply when the inner size r is small:
    A = Qa Ra and B^T = Qb Rb give A B = Qa (Ra Rb^T) Qb^T, whose singular values are those of the r x r Ra Rb^T."""
    if not is_thin_product(a, b):
        return singular_values(product(a, b))
    a, b = as_matrix(a), as_matrix(b)
    k = min(a.shape[0], b.shape[1])
    s = np.linalg.svd(thin_r(a) @ thin_r(b.T).T, compute_uv=False)
    return np.concatenate([s, np.zeros(k - s.size)])


def numerical_rank(s, shape: tuple[int, int]) -> int:
    s = np.asarray(s, np.float64)
    if s.size == 0 or s[0] == 0:
        return 0
    tol = s[0] * max(shape) * np.finfo(np.float64).eps
    return int(np.count_nonzero(s > tol))


def stable_rank(s) -> float:
    s = np.asarray(s, np.float64)
    return float(np.sum(s * s) / s[0] ** 2) if s.size and s[0] > 0 else math.nan


def effective_rank(s) -> float:
    s = np.asarray(s, np.float64)
    total = s.sum()
    if total <= 0:
        return math.nan
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def top_energy_fraction(s, fraction: float = 0.1) -> float:
    s = np.asarray(s, np.float64)
    total = np.sum(s * s)
    if total <= 0:
        return math.nan
    k = max(1, math.ceil(fraction * s.size))
    return float(np.sum(s[:k] ** 2) / total)


def spectrum_slope(s, shape: tuple[int, int]) -> float:
    s = np.asarray(s, np.float64)
    r = numerical_rank(s, shape)
    if r < 3:
        return math.nan
    k = np.arange(1, r + 1)
    return float(np.polyfit(np.log(k), np.log(s[:r]), 1)[0])


def spectrum_stats(s, shape: tuple[int, int]) -> dict[str, float]:
    s = np.sort(np.asarray(s, np.float64))[::-1]
    n = min(shape)
    sr, er = stable_rank(s), effective_rank(s)
    return {"stable_rank": sr, "stable_rank/n": sr / n, "eff_rank": er, "eff_rank/n": er / n,
            "rank/n": numerical_rank(s, shape) / n, "top10_energy": top_energy_fraction(s),
            "sv_slope": spectrum_slope(s, shape)}


# --- square matrices ----------------------------------------------------------------------------------------------


def symmetry(m) -> float:
    m = as_matrix(m)
    norm = np.linalg.norm(m)
    return float(np.linalg.norm(0.5 * (m + m.T)) / norm) if norm > 0 else math.nan


def identity_cosine(m) -> float:
    m = as_matrix(m)
    norm = np.linalg.norm(m)
    return float(np.trace(m) / (norm * math.sqrt(m.shape[0]))) if norm > 0 else math.nan


def diagonal_energy(m) -> float:
    m = as_matrix(m)
    norm = np.linalg.norm(m)
    return float(np.linalg.norm(np.diag(m)) / norm) if norm > 0 else math.nan


def top_row_energy(m) -> float:
    m = as_matrix(m)
    rows = np.sum(m * m, axis=1)
    total = rows.sum()
    return float(rows.max() / total) if total > 0 else math.nan


def square_stats(m) -> dict[str, float]:
    if isinstance(m, SparseMatrix):
        return _sparse_square_stats(m)
    m = as_matrix(m)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"square_stats needs a square matrix, got shape {m.shape}")
    return {"symmetry": symmetry(m), "cos_I": identity_cosine(m), "diag_energy": diagonal_energy(m),
            "top_row_energy": top_row_energy(m)}


def _sparse_square_stats(m: SparseMatrix) -> dict[str, float]:
    """square_stats from the nonzero entries (the same definitions; sums in another order)."""
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"square_stats needs a square matrix, got shape {m.shape}")
    sq = m.vals * m.vals
    total = float(np.sum(sq))
    if total <= 0:
        return dict.fromkeys(PRODUCT_STATISTICS, math.nan)
    norm = math.sqrt(total)
    sym = m.csr()
    sym = (sym + sym.T) * 0.5
    on_diag = m.rows == m.cols
    rows = np.bincount(m.rows, weights=sq, minlength=m.shape[0])
    return {"symmetry": float(np.sqrt(np.sum(sym.data * sym.data)) / norm),
            "cos_I": float(np.sum(m.vals[on_diag]) / (norm * math.sqrt(m.shape[0]))),
            "diag_energy": float(np.sqrt(np.sum(sq[on_diag])) / norm),
            "top_row_energy": float(rows.max() / rows.sum())}


# --- bundles ------------------------------------------------------------------------------------------------------


def matrix_stats(w, s=None, *, square: bool = False) -> dict[str, float]:
    """Entry and spectrum statistics of W (``s``: its singular values, if already known); with ``square`` also the
    product statistics (symmetry, cosine with I, diagonal and top-row energy), which need a square matrix whose rows
    and columns are the same coordinates (the per-head products; not a whole-layer W_Q that happens to be square)."""
    w = w if isinstance(w, SparseMatrix) else as_matrix(w)
    s = singular_values(w) if s is None else s
    out = {**entry_stats(w), **spectrum_stats(s, w.shape)}
    if square:
        out.update(square_stats(w))
    return out


def product_stats(a, b) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Statistics of M = A @ B (with the product statistics), M itself and its singular values (from the thin
    factors when that is cheaper)."""
    a = a if isinstance(a, SparseMatrix) else as_matrix(a)
    b = b if isinstance(b, SparseMatrix) else as_matrix(b)
    m = product(a, b)
    s = product_singular_values(a, b) if is_thin_product(a, b) else singular_values(m)
    return matrix_stats(m, s, square=True), m, s
