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
    square M    symmetry        ||(M + M^T) / 2||_F / ||M||_F  (1 symmetric, ~1/sqrt(2) random, 0 antisymmetric)
                cos_I           tr(M) / (||M||_F sqrt(n)): cosine between M and the identity
                diag_energy     ||diag(M)||_2 / ||M||_F: how much of M lies on its diagonal
                top_row_energy  largest squared row norm / ||M||_F^2 (1 when one row carries all of M, as the y-row
                                of the hand-constructed P W_V)

Singular values of sparse matrices (the hand-constructed ones at D = 4096) are computed exactly from the connected
blocks of their nonzero pattern (the singular values of a matrix are those of its blocks), and those of thin products
A B (a head's W_K^T W_Q, rank <= Kq) from two QR factors, so no dense 4096 x 4096 SVD is ever taken.
"""

from __future__ import annotations

import math

import numpy as np

THRESHOLDS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
#: Below this fraction of nonzero entries a matrix is treated as sparse (block SVD, sparse products).
SPARSE_DENSITY = 0.05


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
    "symmetry": "||sym(M)||_F / ||M||_F (square matrices)",
    "cos_I": "cosine between M and the identity, tr(M) / (||M||_F sqrt(n))",
    "diag_energy": "||diag(M)|| / ||M||_F (diagonal dominance)",
    "top_row_energy": "largest row's share of ||M||_F^2",
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
    x = np.asarray(w, np.float64).ravel()
    # Central moments from the nonzero entries plus the zeros' share: exact, and cheap for mostly-zero matrices.
    nonzero = x[x != 0]
    n_zero = x.size - nonzero.size
    mu = nonzero.sum() / x.size
    c = nonzero - mu
    c2 = c * c  # (c * c) ** 2, not c ** 4: the float power is far slower on large arrays
    m2 = (c2.sum() + n_zero * mu ** 2) / x.size
    m4 = (np.sum(c2 * c2) + n_zero * mu ** 4) / x.size
    if m2 <= 1e-300:
        return math.nan
    return float(m4 / m2 ** 2 - 3.0)


def ks_normal_distance(w) -> float:
    """sup_x |F_entries(x) - Phi((x - mean) / std)|, exact with ties (NaN for a constant matrix)."""
    from scipy.special import ndtr

    x = np.asarray(w, np.float64).ravel()
    sd = x.std()
    if sd == 0:
        return math.nan
    # Sort only the nonzero entries (the hand-constructed matrices are almost all zeros) and add the zeros back.
    nonzero = x[x != 0]
    values, counts = np.unique(nonzero, return_counts=True)
    n_zero = x.size - nonzero.size
    if n_zero:
        at = np.searchsorted(values, 0.0)
        values, counts = np.insert(values, at, 0.0), np.insert(counts, at, n_zero)
    upper = np.cumsum(counts) / x.size          # F just at (and including) each distinct value
    lower = upper - counts / x.size             # F just below it
    phi = ndtr((values - x.mean()) / sd)
    return float(max(np.max(np.abs(upper - phi)), np.max(np.abs(lower - phi))))


def entry_stats(w) -> dict[str, float]:
    w = as_matrix(w)
    a = np.abs(w)
    r = float(np.sqrt(np.mean(a * a)))
    out = {"zero": float(np.count_nonzero(a == 0) / a.size)}
    for t in THRESHOLDS:
        out[f"abs<{_t(t)}"] = float(np.count_nonzero(a < t) / a.size)
    for t in THRESHOLDS:
        out[f"rel<{_t(t)}"] = float(np.count_nonzero(a < t * r) / a.size)
    out["kurtosis"] = excess_kurtosis(w)
    out["ks_normal"] = ks_normal_distance(w)
    return out


# --- spectrum -----------------------------------------------------------------------------------------------------


def is_sparse(w) -> bool:
    w = np.asarray(w)
    return np.count_nonzero(w) <= SPARSE_DENSITY * w.size


def singular_values(w, method: str = "auto") -> np.ndarray:
    """All min(rows, cols) singular values, descending. ``method``: "dense", "blocks" or "auto" (blocks if sparse)."""
    w = as_matrix(w)
    if method not in ("auto", "dense", "blocks"):
        raise ValueError(f"method must be 'auto', 'dense' or 'blocks', got {method!r}")
    if method == "dense" or (method == "auto" and not is_sparse(w)):
        return np.linalg.svd(w, compute_uv=False)
    return _block_singular_values(w)


def _block_singular_values(w: np.ndarray) -> np.ndarray:
    """Singular values from the connected components of the bipartite row-column graph of the nonzeros."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    m, n = w.shape
    k = min(m, n)
    rows, cols = np.nonzero(w)
    if rows.size == 0:
        return np.zeros(k)
    graph = coo_matrix((np.ones(rows.size), (rows, cols + m)), shape=(m + n, m + n))
    _, labels = connected_components(graph, directed=False)
    lab = labels[rows]
    per_label = np.bincount(lab)
    single = per_label[lab] == 1  # a component with a single nonzero entry: its singular value is |entry|
    found = [np.abs(w[rows[single], cols[single]])]
    multi = np.unique(lab[~single])
    if multi.size:
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], multi)
        ends = np.searchsorted(lab[order], multi, side="right")
        for lo, hi in zip(bounds, ends):
            idx = order[lo:hi]
            r_set, c_set = np.unique(rows[idx]), np.unique(cols[idx])
            found.append(np.linalg.svd(w[np.ix_(r_set, c_set)], compute_uv=False))
    s = np.concatenate(found)
    return np.sort(np.concatenate([s, np.zeros(k - s.size)]))[::-1]


def product(a, b) -> np.ndarray:
    """A @ B in float64, through scipy.sparse when both factors are sparse."""
    a, b = as_matrix(a), as_matrix(b)
    if a.size > 65536 and is_sparse(a) and is_sparse(b):
        from scipy.sparse import csr_matrix

        return np.asarray((csr_matrix(a) @ csr_matrix(b)).toarray())
    return a @ b


def product_singular_values(a, b) -> np.ndarray:
    """Singular values of A @ B (all min(rows A, cols B) of them), cheaply when the inner size r is small:
    A = Qa Ra and B^T = Qb Rb give A B = Qa (Ra Rb^T) Qb^T, whose singular values are those of the r x r Ra Rb^T."""
    a, b = as_matrix(a), as_matrix(b)
    m, r = a.shape
    n = b.shape[1]
    k = min(m, n)
    if 2 * r > k or is_sparse(a) or is_sparse(b):
        return singular_values(product(a, b))
    ra = np.linalg.qr(a, mode="r")
    rb = np.linalg.qr(b.T, mode="r")
    s = np.linalg.svd(ra @ rb.T, compute_uv=False)
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
    m = as_matrix(m)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"square_stats needs a square matrix, got shape {m.shape}")
    return {"symmetry": symmetry(m), "cos_I": identity_cosine(m), "diag_energy": diagonal_energy(m),
            "top_row_energy": top_row_energy(m)}


# --- bundles ------------------------------------------------------------------------------------------------------


def matrix_stats(w, s=None) -> dict[str, float]:
    """Entry and spectrum statistics of W (``s``: its singular values, if already known); square ones if square."""
    w = as_matrix(w)
    s = singular_values(w) if s is None else s
    out = {**entry_stats(w), **spectrum_stats(s, w.shape)}
    if w.shape[0] == w.shape[1]:
        out.update(square_stats(w))
    return out


def product_stats(a, b) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Statistics of M = A @ B, M itself and its singular values (from the thin factors when that is cheaper)."""
    a, b = as_matrix(a), as_matrix(b)
    m = product(a, b)
    thin = 2 * a.shape[1] <= min(m.shape) and not (is_sparse(a) or is_sparse(b))
    s = product_singular_values(a, b) if thin else singular_values(m)
    return matrix_stats(m, s), m, s
