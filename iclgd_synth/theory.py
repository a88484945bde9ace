"""Exact population losses for one step of preconditioned GD, its optimal preconditioner, and K-step GD.

The predictor family (one layer of linear attention reads out exactly this; the hand-constructed weights are
G = eta I, see :func:`preconditioner_params`):

    y_hat = x_q^T G h,        h = (1/N) sum_i y_i x_i   (d x d matrix G, the "preconditioner")

Task law (as :mod:`iclgd_synth.tasks` samples it): x_i, x_q i.i.d. from the input law, y = w . x + eps with
eps ~ N(0, sigma^2) on context and query labels, w independent of x. Everything below is conditional on nothing but
the law. Notation (all d x d):

    S  = E[x x^T]                       the input *second moment* (not the covariance: the exponential law is not
                                        centred, and y = w . x has no intercept, so the raw moment is what enters)
    W2 = sum_o E[w_o w_o^T]             task second moment, summed over output dimensions (tau^2 d_out I for fresh
                                        tasks; the pool's mean of w w^T for a finite pool)
    F(A) = E[(x^T A x) x x^T]           the fourth-moment map, A symmetric
    S_N = (1/N) sum_i x_i x_i^T

**One step, exact for any input law with finite fourth moments.** Since x_q is independent of the context,

    MSE(G) = E||y_hat - y_q||^2 = c0 - 2 tr(G B) + tr(S G Q G^T),
    c0 = tr(S W2) + d_out sigma^2,   B = S C S,
    Q = E[h h^T] = (1 - 1/N) S U2 S + F(U1) / N + (1 - p) d_out sigma^2 S / N

with C = E[w u_i^T], U1 = E[u_i u_i^T], U2 = E[u_i u_j^T] (i != j) for the weight u_i that produced label i. Without
label corruption (p = 0) u_i = w and C = U1 = U2 = W2, so E[S_N W2 S_N] = (1 - 1/N) S W2 S + F(W2) / N. With a
fraction p of context labels replaced by the noiseless labels of an independent N(0, tau^2 I) task (what the sampler
does), C = (1 - p) W2, U1 = (1 - p) W2 + p tau^2 d_out I, U2 = (1 - p)^2 W2 + p^2 tau^2 d_out I. The loss is convex
in G with minimiser

    G* = C S Q^(-1)       (the minimum-norm solution of G Q = C S when Q is singular), MSE* = c0 - tr(G* B)

and the best multiple of the identity eta* = tr(B) / tr(S Q), MSE(eta*) = c0 - tr(B)^2 / tr(S Q); for an isotropic
law (i.i.d. centred coordinates) G* = eta* I. For x ~ N(0, Sigma), w ~ N(0, I), no corruption, F(A) =
tr(A Sigma) Sigma + 2 Sigma A Sigma gives the closed form of "Trained transformers learn linear models in-context" and
"Transformers learn to implement preconditioned gradient descent for in-context learning",
G* = ((1 + 1/N) Sigma + (tr Sigma + sigma^2) / N I)^(-1) (:func:`gaussian_optimal_preconditioner`).

**The fourth-moment map.** Every input law of the package is x = L z with z of i.i.d. coordinates (cumulants
k1..k4; L = x_scale I, or x_scale times a square root of Sigma for the anisotropic Gaussian). Then
F_x(A) = L F_z(L^T A L) L^T, and by the moment-cumulant formula (mixed cumulants of independent coordinates vanish,
so E[z_a z_b z_j z_k] is a sum over the 15 set partitions of the four positions, a block contributing k_|block| when
its indices are equal), with m = k1, 1 the vector of ones and Diag(v) the diagonal matrix of v:

    F_z(A) = k4 Diag(diag A) + m k3 (diag(A) 1^T + 1 diag(A)^T + 2 Diag(A 1)) + k2^2 (tr(A) I + 2 A)
             + k2 m^2 (tr(A) 1 1^T + (1^T A 1) I + 2 A 1 1^T + 2 1 1^T A) + m^4 (1^T A 1) 1 1^T.

For centred laws it reduces to k2^2 (tr(A) I + 2A) + k4 Diag(diag A), the Gaussian's Isserlis formula plus an
excess-kurtosis term.

**K steps of GD from W0 = 0** (``GD(eta, steps)``): W_K x_q with R = (I - eta S_N)^K, P = eta sum_{k<K} (I - eta S_N)^k,

    MSE(eta) = E[ tr(S R W2 R) + (d_out sigma^2 / N) tr(S P S_N P) ] + d_out sigma^2        (no label corruption)

a polynomial of degree 2K in eta whose coefficients are E tr(S S_N^m W2 S_N^n) and E tr(S S_N^j). For K = 1 these are
the moments above (exact, any law). For K >= 2 they are exact here only for isotropic Gaussian inputs (x_dist
"normal", any x_scale, any W2), where rotation invariance reduces them to the real-Wishart trace moments
E tr(W^j), W = Z Z^T (:func:`wishart_trace_moments`, exact integers from a Gaussian integration-by-parts recursion).
For the other laws the package has no closed form: :func:`estimate_gd_loss` gives an estimator that is exact in
expectation (x_q, w and the noise integrated out in closed form, only the context inputs sampled) with its standard
error.

Every function returns the *half*-MSE, 0.5 * E||y_hat - y_q||^2, the package's loss convention (losses.half_mse).
The anisotropic covariance and a finite task pool are drawn by tasks.py in the sampler's float dtype, and the draws
differ between float32 and float64: pass the ``dtype`` the tasks are sampled in (default: JAX's default float, the
sampler's default).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.attention import head_products
from iclgd_synth.constructions import from_products
from iclgd_synth.model import Arch, TransformerParams, check_params
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, TaskConfig, check_dtype, input_covariance, sample, task_pool, validate_batch
from iclgd_synth.validation import check_float, check_int

#: Cumulants (k1, k2, k3, k4) of one coordinate of each i.i.d. input law at unit x_scale ("uniform" at x_range = 1;
#: U(-a, a) has k2 = a^2 / 3, k4 = -2 a^4 / 15). Laplace has unit scale, the exponential rate 1 (k_n = (n - 1)!).
COORDINATE_CUMULANTS: dict[str, tuple[float, float, float, float]] = {
    "uniform": (0.0, 1.0 / 3.0, 0.0, -2.0 / 15.0),
    "normal": (0.0, 1.0, 0.0, 0.0),
    "anisotropic": (0.0, 1.0, 0.0, 0.0),  # z ~ N(0, I), x = L z
    "laplace": (0.0, 2.0, 0.0, 12.0),
    "exponential": (1.0, 1.0, 2.0, 6.0),
}


# ----------------------------------------------------------------------------------------------------- input law


@dataclasses.dataclass(frozen=True)
class InputMoments:
    """The input law as x = L z, z with i.i.d. coordinates: what the second and fourth moments need (exact).

    Attributes:
      mixing: L, (d, d) float64.
      cumulants: (k1, k2, k3, k4) of one coordinate of z.
    """

    mixing: np.ndarray
    cumulants: tuple[float, float, float, float]

    @property
    def dim(self) -> int:
        return int(self.mixing.shape[0])

    def mean(self) -> np.ndarray:
        """E[x], (d,)."""
        return self.mixing @ np.full(self.dim, self.cumulants[0])

    def second_moment(self) -> np.ndarray:
        """S = E[x x^T] = L (k2 I + k1^2 1 1^T) L^T, (d, d)."""
        k1, k2 = self.cumulants[:2]
        d = self.dim
        return self.mixing @ (k2 * np.eye(d) + k1**2 * np.ones((d, d))) @ self.mixing.T

    def fourth_moment_map(self, a: Any) -> np.ndarray:
        """F(A) = E[(x^T A x) x x^T] for a symmetric (d, d) matrix A (the module docstring's formula), (d, d)."""
        a = np.asarray(a, np.float64)
        if a.shape != (self.dim, self.dim):
            raise ValueError(f"a must have shape (d, d) = {(self.dim, self.dim)}, got {a.shape}")
        a = 0.5 * (a + a.T)  # only the symmetric part enters x^T A x
        lm = self.mixing
        return lm @ _iid_fourth_moment_map(lm.T @ a @ lm, self.cumulants) @ lm.T


def _iid_fourth_moment_map(a: np.ndarray, cumulants: tuple[float, float, float, float]) -> np.ndarray:
    """E[(z^T A z) z z^T] for z with i.i.d. coordinates of the given cumulants and symmetric A."""
    k1, k2, k3, k4 = cumulants
    d = a.shape[0]
    one, eye = np.ones(d), np.eye(d)
    outer1 = np.outer(one, one)
    diag_a, a1, tr_a, sum_a = np.diag(a), a @ one, np.trace(a), one @ a @ one
    out = k4 * np.diag(diag_a) + k2**2 * (tr_a * eye + 2.0 * a)
    if k1 != 0.0:
        out = out + k1 * k3 * (np.outer(diag_a, one) + np.outer(one, diag_a) + 2.0 * np.diag(a1))
        out = out + k2 * k1**2 * (tr_a * outer1 + sum_a * eye + 2.0 * np.outer(a1, one) + 2.0 * np.outer(one, a1))
        out = out + k1**4 * sum_a * outer1
    return out


def input_moments(task: TaskConfig, dtype: Any = None) -> InputMoments:
    """The input law of ``task`` (``x_scale`` included) as :class:`InputMoments`, exact.

    ``dtype``: the float dtype the tasks are sampled in (default JAX's default float); it matters only for the
    anisotropic law built from ``condition_number``, whose random rotation tasks.py draws in that dtype.
    """
    _check_task(task)
    d, scale = task.dim, float(task.x_scale)
    k1, k2, k3, k4 = COORDINATE_CUMULANTS[task.x_dist]
    if task.x_dist == "uniform":
        a = float(task.x_range)
        k1, k2, k3, k4 = k1 * a, k2 * a**2, k3 * a**3, k4 * a**4
    if task.x_dist == "anisotropic":
        cov = np.asarray(input_covariance(task, _dtype(dtype)), np.float64)
        base = np.linalg.cholesky(0.5 * (cov + cov.T))  # a Gaussian law depends on L only through L L^T
    else:
        base = np.eye(d)
    return InputMoments(mixing=scale * base, cumulants=(k1, k2, k3, k4))


def weight_second_moment(task: TaskConfig, dtype: Any = None) -> np.ndarray:
    """W2 = sum over outputs of E[w_o w_o^T], (d, d): tau^2 d_out I for fresh tasks, the pool's mean for a pool."""
    _check_task(task)
    if task.pool_size is None:
        return float(task.w_scale) ** 2 * task.out_dim * np.eye(task.dim)
    pool = np.asarray(task_pool(task, _dtype(dtype)), np.float64)  # (M, d_out, d), w_scale included
    return np.einsum("mod,moe->de", pool, pool) / pool.shape[0]


# -------------------------------------------------------------------------------------- one step: exact quadratic


@dataclasses.dataclass(frozen=True)
class PreconditionedLoss:
    """The exact population MSE of y_hat = x_q^T G h as a quadratic in G: c0 - 2 tr(G B) + tr(S G Q G^T).

    Attributes (float64): ``const`` c0, ``cross`` B, ``second_moment`` S and ``q`` = E[h h^T], each (d, d) but c0.
    """

    const: float
    cross: np.ndarray
    second_moment: np.ndarray
    q: np.ndarray

    def half_mse(self, g: Any) -> float:
        """Half-MSE 0.5 * (c0 - 2 tr(G B) + tr(S G Q G^T)) of the preconditioner ``g`` (d, d); exact."""
        g = _check_matrix("g", g, self.cross.shape[0])
        s, q, b = self.second_moment, self.q, self.cross
        return 0.5 * float(self.const - 2.0 * np.sum(g * b.T) + np.sum((s @ g) * (g @ q)))

    def minimiser(self) -> np.ndarray:
        """G* = C S Q^(-1) (minimum-norm solution of the normal equations S G Q = B when Q is singular)."""
        s = self.second_moment
        rhs = np.linalg.lstsq(s, self.cross, rcond=None)[0]  # C S = S^(-1) B
        return np.linalg.lstsq(self.q, rhs.T, rcond=None)[0].T

    def best_scalar(self) -> tuple[float, float]:
        """(eta*, half-MSE at eta* I): the best multiple of the identity, exact."""
        num, den = float(np.trace(self.cross)), float(np.sum(self.second_moment * self.q.T))
        eta = num / den if den > 0 else 0.0
        return eta, 0.5 * (self.const - eta * num)


def preconditioned_loss_terms(task: TaskConfig, dtype: Any = None) -> PreconditionedLoss:
    """The exact quadratic of :class:`PreconditionedLoss` for ``task`` (any input law, noise, task scale, pool,
    label corruption and output dimension)."""
    mom = input_moments(task, dtype)
    n, p, o = task.n_context, float(task.label_corruption), task.out_dim
    s, w2 = mom.second_moment(), weight_second_moment(task, dtype)
    noise2 = o * float(task.noise) ** 2
    fresh = float(task.w_scale) ** 2 * o * np.eye(task.dim)  # corrupted labels come from a fresh N(0, tau^2 I) task
    c = (1.0 - p) * w2
    u1 = (1.0 - p) * w2 + p * fresh
    u2 = (1.0 - p) ** 2 * w2 + p**2 * fresh
    q = (1.0 - 1.0 / n) * s @ u2 @ s + mom.fourth_moment_map(u1) / n + (1.0 - p) * noise2 / n * s
    return PreconditionedLoss(const=float(np.sum(s * w2)) + noise2, cross=s @ c @ s, second_moment=s,
                              q=0.5 * (q + q.T))


def preconditioned_loss(g: Any, task: TaskConfig, dtype: Any = None) -> float:
    """Exact population half-MSE of the preconditioned one-step predictor ``x_q^T G h`` for ``task``."""
    return preconditioned_loss_terms(task, dtype).half_mse(g)


def optimal_preconditioner(task: TaskConfig, dtype: Any = None) -> np.ndarray:
    """G* minimising the population loss of ``x_q^T G h`` for ``task``, (d, d) float64; exact."""
    return preconditioned_loss_terms(task, dtype).minimiser()


def optimal_preconditioner_loss(task: TaskConfig, dtype: Any = None) -> float:
    """The population half-MSE at G*, exact: the best any one-layer linear-attention model of this family reaches."""
    terms = preconditioned_loss_terms(task, dtype)
    return terms.half_mse(terms.minimiser())


def gaussian_optimal_preconditioner(cov: Any, n_context: int, noise: float = 0.0, w_scale: float = 1.0
                                    ) -> np.ndarray:
    """The closed form for x ~ N(0, Sigma), w ~ N(0, tau^2 I), noise sigma, no corruption, exact:
    G* = ((1 + 1/N) Sigma + (tr Sigma + sigma^2 / tau^2) / N I)^(-1)."""
    cov = np.asarray(cov, np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square (d, d) matrix, got shape {cov.shape}")
    n = check_int("n_context", n_context, min_value=1)
    noise = float(check_float("noise", noise, min_value=0.0))
    w_scale = float(check_float("w_scale", w_scale, min_value=0.0, strict_min=True))
    d = cov.shape[0]
    return np.linalg.inv((1.0 + 1.0 / n) * cov + (np.trace(cov) + noise**2 / w_scale**2) / n * np.eye(d))


# ------------------------------------------------------------------------------------------- K-step GD, exact


def wishart_trace_moments(n: int, d: int, max_power: int) -> list[int]:
    """E tr(W^j) for j = 0..max_power, W = Z Z^T with Z a d x n matrix of i.i.d. N(0, 1) entries; exact integers.

    Gaussian integration by parts (E[Z_ia f(Z)] = E[df/dZ_ia]) on tr(W^k) R, R a product of traces, gives

        E[tr(W^k) R] = (n + k - 1) E[tr(W^(k-1)) R] + sum_{s=0..k-2} E[tr(W^(s+1)) tr(W^(k-2-s)) R]
                       + sum over factors tr(W^m) of R of 2 m E[tr(W^(k+m-1)) R / tr(W^m)],   tr(W^0) = d,

    each term of lower total degree; e.g. E tr(W^2) = n d (n + d + 1).
    """
    n, d = check_int("n", n, min_value=1), check_int("d", d, min_value=1)
    max_power = check_int("max_power", max_power, min_value=0)
    return [d] + [_wishart_product_moment(n, d, (j,)) for j in range(1, max_power + 1)]


@functools.lru_cache(maxsize=None)
def _wishart_product_moment(n: int, d: int, powers: tuple[int, ...]) -> int:
    """E[prod_j tr(W^(powers_j))] for positive powers in non-increasing order."""
    if not powers:
        return 1
    k, rest = powers[0], powers[1:]

    def moment(*ps: int) -> int:
        zeros = sum(1 for p in ps if p == 0)  # tr(W^0) = d
        return d**zeros * _wishart_product_moment(n, d, tuple(sorted((p for p in ps if p > 0), reverse=True)))

    total = (n + k - 1) * moment(k - 1, *rest)
    total += sum(moment(s + 1, k - 2 - s, *rest) for s in range(k - 1))
    for i, m in enumerate(rest):
        total += 2 * m * moment(k + m - 1, *(rest[:i] + rest[i + 1:]))
    return total


def gd_loss_polynomial(task: TaskConfig, steps: int = 1, dtype: Any = None) -> np.ndarray:
    """Coefficients (lowest degree first, length 2K + 1) of the exact population half-MSE of K-step GD from W0 = 0
    as a polynomial in a constant step size eta.

    Exact for K = 1 with any input law, and for any K with isotropic Gaussian inputs (x_dist "normal") and no label
    corruption. Other cases raise ValueError: they have no closed form here; use :func:`estimate_gd_loss`.
    """
    _check_task(task)
    steps = check_int("steps", steps, min_value=1)
    if steps == 1:
        terms = preconditioned_loss_terms(task, dtype)
        return 0.5 * np.array([terms.const, -2.0 * np.trace(terms.cross), np.sum(terms.second_moment * terms.q.T)])
    if task.x_dist != "normal" or task.label_corruption > 0:
        raise ValueError(f"steps = {steps} >= 2 has an exact population loss here only for x_dist='normal' without "
                         f"label corruption (got x_dist={task.x_dist!r}, label_corruption={task.label_corruption}); "
                         f"use estimate_gd_loss(task, steps) for an estimate with its standard error, or steps=1")
    n, d, v = task.n_context, task.dim, float(task.x_scale) ** 2
    noise2 = task.out_dim * float(task.noise) ** 2
    w2_trace = float(np.trace(weight_second_moment(task, dtype)))
    mu = [(v / n) ** j * float(m) for j, m in enumerate(wishart_trace_moments(n, d, 2 * steps))]  # E tr(S_N^j)
    coef = np.zeros(2 * steps + 1)
    for j in range(2 * steps + 1):  # E tr(S R W2 R) = v tr(W2) / d E tr((I - eta S_N)^(2K)), by rotation invariance
        coef[j] += v * w2_trace / d * math.comb(2 * steps, j) * (-1) ** j * mu[j]
    for m in range(1, steps + 1):  # P = sum_m (-1)^(m-1) C(K, m) eta^m S_N^(m-1)
        for k in range(1, steps + 1):
            coef[m + k] += noise2 / n * v * (-1) ** (m + k) * math.comb(steps, m) * math.comb(steps, k) * mu[m + k - 1]
    coef[0] += noise2
    return 0.5 * coef


def gd_population_loss(task: TaskConfig, eta: Any, steps: int = 1, dtype: Any = None) -> np.ndarray:
    """Exact population half-MSE of K-step GD at step size(s) ``eta`` (scalar or array), where
    :func:`gd_loss_polynomial` has a closed form."""
    eta = np.asarray(check_float("eta", eta), np.float64)
    return np.polynomial.polynomial.polyval(eta, gd_loss_polynomial(task, steps, dtype))


def optimal_eta(task: TaskConfig, steps: int = 1, dtype: Any = None) -> float:
    """The population-optimal constant step size of K-step GD from W0 = 0; exact (see :func:`gd_loss_polynomial`).

    For K = 1 this is the best preconditioner of the form eta I (= G* for isotropic laws).
    """
    return minimize_polynomial(gd_loss_polynomial(task, steps, dtype))[0]


def optimal_gd_loss(task: TaskConfig, steps: int = 1, dtype: Any = None) -> float:
    """The population half-MSE of K-step GD at :func:`optimal_eta`; exact."""
    return minimize_polynomial(gd_loss_polynomial(task, steps, dtype))[1]


def minimize_polynomial(coef: Any, eta_max: float | None = None) -> tuple[float, float]:
    """(argmin, min) over eta in [0, eta_max] of a polynomial given lowest degree first (even degree, positive
    leading coefficient when ``eta_max`` is None): the candidates are 0, the real roots of the derivative, eta_max."""
    coef = np.asarray(coef, np.float64)
    if eta_max is None and (coef.size % 2 == 0 or coef[-1] <= 0):
        raise ValueError("minimize_polynomial without eta_max needs an even degree and a positive leading coefficient")
    roots = np.polynomial.polynomial.polyroots(np.polynomial.polynomial.polyder(coef)) if coef.size > 2 else []
    cands = [0.0] + [float(r.real) for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r)) and r.real > 0]
    if eta_max is not None:
        eta_max = float(check_float("eta_max", eta_max, min_value=0.0))
        cands = [c for c in cands if c <= eta_max] + [eta_max]
    values = np.polynomial.polynomial.polyval(np.asarray(cands), coef)
    i = int(np.argmin(values))
    return float(cands[i]), float(values[i])


# ----------------------------------------------------------------------------------- K-step GD, exact in expectation


@dataclasses.dataclass(frozen=True)
class GDLossEstimate:
    """Per-task polynomials in eta whose mean is an unbiased estimate of the population half-MSE of K-step GD.

    Each row is the half-MSE of one sampled context X with the query input, the task weights and the label noise
    integrated out exactly: E[loss | X] = 0.5 (tr(S R W2 R) + (d_out sigma^2 / N) tr(S P S_N P) + d_out sigma^2).

    Attributes:
      per_task: (T, 2K + 1) coefficients, lowest degree first, one row per sampled context.
    """

    per_task: np.ndarray

    @property
    def coefficients(self) -> np.ndarray:
        """The estimated population polynomial (mean over contexts)."""
        return self.per_task.mean(axis=0)

    def loss(self, eta: Any) -> np.ndarray:
        """Estimated population half-MSE at ``eta`` (scalar or array)."""
        return np.polynomial.polynomial.polyval(np.asarray(eta, np.float64), self.coefficients)

    def standard_error(self, eta: Any) -> np.ndarray:
        """Standard error of :meth:`loss` at ``eta`` (sample standard deviation over contexts / sqrt(T))."""
        eta = np.asarray(eta, np.float64)
        values = np.polynomial.polynomial.polyval(eta, self.per_task.T)  # (T, *eta.shape)
        return values.std(axis=0, ddof=1) / np.sqrt(values.shape[0])

    def minimize(self, eta_max: float | None = None) -> tuple[float, float, float]:
        """(eta, estimated loss, its standard error) at the minimiser of the estimated polynomial."""
        eta, value = minimize_polynomial(self.coefficients, eta_max)
        return eta, value, float(self.standard_error(eta))


def estimate_gd_loss(task: TaskConfig, steps: int = 1, *, n_tasks: int = 100_000, seed: int = 0,
                     chunk: int = 20_000, dtype: Any = None) -> GDLossEstimate:
    """Exact-in-expectation estimate of the K-step GD loss polynomial for any input law (no label corruption).

    Context inputs are drawn with the package's sampler (``sample``, keys ``fold_in(PRNGKey(seed), i)`` per chunk);
    everything else is integrated out exactly, so the estimate has less variance than averaging sampled losses.
    """
    _check_task(task)
    steps = check_int("steps", steps, min_value=1)
    n_tasks = check_int("n_tasks", n_tasks, min_value=2)
    seed = check_int("seed", seed, min_value=0)
    chunk = check_int("chunk", chunk, min_value=1)
    if task.label_corruption > 0:
        raise ValueError(f"estimate_gd_loss needs label_corruption = 0, got {task.label_corruption}; for one step "
                         f"gd_loss_polynomial(task, 1) is exact with corruption")
    dtype = check_dtype(dtype)  # None stays None: the sampler's own default, so its compiled program is shared
    s, w2 = input_moments(task, dtype).second_moment(), weight_second_moment(task, dtype)
    n, k = task.n_context, steps
    noise2 = task.out_dim * float(task.noise) ** 2
    rows, done, i = [], 0, 0
    while done < n_tasks:
        b = min(chunk, n_tasks - done)
        x = np.asarray(sample(jax.random.fold_in(jax.random.PRNGKey(seed), i), task, b, dtype).x, np.float64)
        sn = np.einsum("bnd,bne->bde", x, x) / n
        powers = [np.broadcast_to(np.eye(task.dim), sn.shape)]
        for _ in range(2 * k - 1):
            powers.append(powers[-1] @ sn)
        left = [s @ p for p in powers[: k + 1]]  # S S_N^m
        right = [w2 @ p for p in powers[: k + 1]]  # W2 S_N^n
        coef = np.zeros((b, 2 * k + 1))
        for m in range(k + 1):
            for j in range(k + 1):
                tr = np.einsum("bij,bji->b", left[m], right[j])
                coef[:, m + j] += math.comb(k, m) * math.comb(k, j) * (-1) ** (m + j) * tr
        for m in range(1, k + 1):
            for j in range(1, k + 1):
                tr = np.einsum("ij,bji->b", s, powers[m + j - 1])
                coef[:, m + j] += noise2 / n * (-1) ** (m + j) * math.comb(k, m) * math.comb(k, j) * tr
        coef[:, 0] += noise2
        rows.append(0.5 * coef)
        done, i = done + b, i + 1
    return GDLossEstimate(per_task=np.concatenate(rows))


# ------------------------------------------------------------------------- the family as predictor and as weights


def preconditioned_predict(batch: TaskBatch, g: Any) -> Array:
    """y_hat = x_q^T G h with h = (1/N) sum_i y_i x_i, (B,) (or (B, d_out), the same G for every output).

    G = eta I is exactly one GD step from W0 = 0 with step eta (``GD(eta, 1)(batch)``).
    """
    batch = validate_batch(batch)
    g = jnp.asarray(_check_matrix("g", g, batch.dim), batch.x.dtype)
    return _preconditioned_predict(batch.replace(w=None), g)


@jax.jit
def _preconditioned_predict(batch: TaskBatch, g_dxd: Array) -> Array:
    h_BxOxd = jnp.einsum("bno,bnd->bod", batch.labels_BxNxO(), batch.x) / batch.n_context
    pred = jnp.einsum("bd,de,boe->bo", batch.x_query, g_dxd, h_BxOxd)
    return pred if batch.vector_output else pred[:, 0]


def preconditioner_params(g: Any, *, n_context: int | None, out_dim: int = 1, dtype: Any = None
                          ) -> TransformerParams:
    """One linear-attention layer whose prediction is exactly x_q^T G h: W_K^T W_Q = [[G^T, 0], [0, 0]] and
    P W_V = [[0, 0], [0, -I / N]] (``n_context`` given) or P W_V = -I in the y-block with 1/N inside the layer
    (``n_context=None``, ``Arch.normalize``), as in ``gd_params``."""
    g = np.asarray(g, np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g must be a square (d, d) matrix, got shape {g.shape}")
    g = _check_matrix("g", g, g.shape[0])
    o = check_int("out_dim", out_dim, min_value=1)
    if n_context is not None:
        check_int("n_context", n_context, min_value=1)
    d = g.shape[0]
    dtype = _dtype(dtype)
    kq = jnp.zeros((d + o, d + o), dtype).at[:d, :d].set(jnp.asarray(g.T, dtype))
    scale = 1.0 if n_context is None else 1.0 / n_context
    pv = jnp.zeros((d + o, d + o), dtype).at[d:, d:].set(-scale * jnp.eye(o, dtype=dtype))
    return from_products(kq, pv, arch=Arch(normalize=n_context is None))


def effective_preconditioner(params: TransformerParams, n_context: int) -> np.ndarray:
    """The G of a one-layer linear-attention model (trained or constructed), (d, d) float64, scalar outputs.

    With PV = P W_V and KQ = W_K^T W_Q per head, the read-out -[PV C KQ e_q]_y, C = sum_i e_i e_i^T, e_q = (x_q, 0),
    has two terms linear in h = (1/N) sum_i y_i x_i: PV[y, y] N h^T KQ[x, x] x_q (the construction's route) and
    (PV[y, x] . N h)(KQ[y, x] . x_q) (a rank-one route through the label row of KQ), so

        G = -N sum_h (PV_h[y, y] KQ_h[x, x] + PV_h[y, x]^T KQ_h[y, x])^T        (no factor N with ``Arch.normalize``).

    A trained model may carry other terms too, outside the family (PV[y, x] C[x, x] KQ[x, x] x_q, which has no label,
    and PV[y, y] (sum_i y_i^2) KQ[y, x] x_q); they are ignored here, so compare the model's own loss with
    ``preconditioned_loss(effective_preconditioner(...))`` to see what they cost or gain.
    """
    check_params(params)
    n = check_int("n_context", n_context, min_value=1)
    arch = params.arch
    if len(params.layers) != 1 or arch.n_loops != 1 or arch.attention != "linear" or arch.include_query \
            or arch.layout != "concat" or arch.momentum is not None:
        raise ValueError("effective_preconditioner needs one linear-attention layer applied once (n_loops = 1), "
                         "concat layout, no query key, no momentum")
    layer = params.layers[0]
    if "ln_attn" in layer or "mlp" in layer:
        raise ValueError("effective_preconditioner needs a layer without LayerNorm or MLP")
    if params.token_dim < 2:
        raise ValueError(f"params must have tokens of size D = d + 1 >= 2, got D = {params.token_dim}")
    kq, pv = (np.asarray(a, np.float64) for a in head_products(layer))
    d = params.token_dim - 1
    scale = 1.0 if arch.normalize else float(n)
    g_t = np.einsum("h,hde->hde", pv[:, d, d], kq[:, :d, :d]) + np.einsum("hd,he->hde", pv[:, d, :d], kq[:, d, :d])
    return -scale * g_t.sum(0).T


# ------------------------------------------------------------------------------------------------------- checks


def _check_task(task: Any) -> None:
    if not isinstance(task, TaskConfig):
        raise TypeError(f"task must be an iclgd_synth.TaskConfig, got {type(task).__name__}")


def _check_matrix(name: str, g: Any, d: int) -> np.ndarray:
    g = np.asarray(check_float(name, g), np.float64)
    if g.shape != (d, d):
        raise ValueError(f"{name} must have shape (d, d) = {(d, d)}, got {g.shape}")
    return g


def _dtype(dtype: Any) -> Any:
    """A checked float dtype; None means JAX's default float (what the sampler uses)."""
    dtype = check_dtype(dtype)
    return jnp.zeros(()).dtype if dtype is None else dtype
