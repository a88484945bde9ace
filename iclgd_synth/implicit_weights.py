"""Per-layer implicit weights of a Transformer, compared with GD, GD++ and least squares; GD++ as a spectral map.

**Implicit weights.** The read-out after layer l, y_hat_l, is differentiated with respect to the query input x_q by
autodiff (no probe): w_l = d y_hat_l / d x_q. For linear attention whose keys are the context tokens only (the
reference paper's setting, ``include_query=False``), the context tokens never see the query and the query token stays
linear in x_q, so y_hat_l = w_l . x_q exactly: w_l *is* the linear model the first l layers implement. With softmax
attention, LayerNorm, MLPs, clipping or a query key, w_l is the local sensitivity at the given x_q.

They are compared with, per step k = 1..K:
- GD iterates W_k of gradient descent on L(W) = 1/(2N) sum_i ||W x_i - y_i||^2 from W0 = 0 (learners.gd),
- GD++ implicit weights: GD++ ("Transformers learn in-context by gradient descent") transforms every input by
  x <- (I - gamma_k X_k X_k^T) x after step k; its prediction is sum_k Delta w_k . (T_k x_q) with T_k the product of the
  transforms before step k, so its implicit weight is u_k = sum_{m<=k} T_m^T Delta w_m (learners.gdpp),
- minimum-norm least squares (learners.least_squares),
by the cosine and the relative error ||w_l - w_ref|| / ||w_ref||, averaged over tasks.

**GD++ conditions the data covariance by a polynomial map (exact).** With X the N x d matrix of context inputs and
C = X^T X (the d x d matrix the reference paper writes X X^T for d x N inputs, no 1/N), one GD++ input update
X <- X (I - gamma C) gives

    C <- (I - gamma C) C (I - gamma C) = C (I - gamma C)^2,

because (I - gamma C) is symmetric and commutes with C. So the eigenvectors of C never change and each eigenvalue is
mapped by f_gamma(lambda) = lambda (1 - gamma lambda)^2; after L steps lambda -> f_gamma_L o ... o f_gamma_1 (lambda).
f rises on [0, 1/(3 gamma)] to its maximum 4 / (27 gamma), falls to 0 at 1/gamma, so a step shrinks the large
eigenvalues toward the small ones (the small ones barely move, f(lambda) ~ lambda): the condition number of C falls
layer by layer, which is why GD++ converges faster than GD. The zero eigenvalues of a rank-deficient C (N < d) stay
zero; condition numbers here are over the min(N, d) eigenvalues of the range of X.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.learners._common import broadcast_schedule, check_schedule
from iclgd_synth.learners.least_squares import LeastSquares
from iclgd_synth.model import TransformerParams, check_params, check_token_dim, forward
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, validate_batch
from iclgd_synth.tokens import build_tokens, n_context_tokens, read_out
from iclgd_synth.validation import check_float, check_int

# ------------------------------------------------------------------------------------------------ implicit weights


def layer_implicit_weights(params: TransformerParams, batch: TaskBatch, *, form: str = "auto") -> Array:
    """d y_hat_l / d x_q after every layer application l = 1..K: (K, B, d), or (K, B, d_out, d) for vector labels.

    Exact by reverse-mode autodiff; for linear attention without a query key, y_hat_l = w_l . x_q exactly.
    """
    check_params(params)
    batch = validate_batch(batch)
    check_token_dim(params, batch)
    dtype = jnp.result_type(batch.x.dtype, *jax.tree.leaves(params))
    batch = jax.tree.map(lambda a: a.astype(dtype), batch.replace(w=None))
    out = _layer_implicit_weights(params, batch, form=form)  # (K, B, O, d)
    return out if batch.vector_output else out[:, :, 0]


@functools.partial(jax.jit, static_argnames=("form",))
def _layer_implicit_weights(params: TransformerParams, batch: TaskBatch, *, form: str) -> Array:
    layout = params.arch.layout
    n_ctx = n_context_tokens(batch.n_context, layout)

    def summed_predictions(xq_Bxd):
        tokens = build_tokens(batch.replace(x_query=xq_Bxd), layout)
        outs = forward(params, tokens, n_ctx, form=form, return_all=True)
        # Task b's prediction depends on x_q of task b only, so the Jacobian of the sum over tasks is per task.
        return jnp.stack([read_out(o, batch.dim, True).sum(0) for o in outs])  # (K, O)

    jac_KxOxBxd = jax.jacrev(summed_predictions)(batch.x_query)
    return jnp.transpose(jac_KxOxBxd, (0, 2, 1, 3))


def gd_iterates(batch: TaskBatch, eta: Any, steps: int) -> Array:
    """GD iterates W_1..W_K from W0 = 0 (step sizes ``eta``, scalar or (K,)): (K, B, d) or (K, B, d_out, d)."""
    steps = check_int("steps", steps, min_value=1)
    eta = check_schedule("eta", eta, steps)
    batch = validate_batch(batch)
    out = _gd_iterates(batch.replace(w=None), eta, steps=steps)
    return out if batch.vector_output else out[:, :, 0]


@functools.partial(jax.jit, static_argnames=("steps",))
def _gd_iterates(batch: TaskBatch, eta: Any, *, steps: int) -> Array:
    x_BxNxd, y_BxNxO, n = batch.x, batch.labels_BxNxO(), batch.n_context

    def step(w_BxOxd, eta_k):
        resid_BxNxO = jnp.einsum("bod,bnd->bno", w_BxOxd, x_BxNxd) - y_BxNxO
        w_BxOxd = w_BxOxd - eta_k / n * jnp.einsum("bno,bnd->bod", resid_BxNxO, x_BxNxd)
        return w_BxOxd, w_BxOxd

    w0 = jnp.zeros((batch.batch_size, batch.out_dim, batch.dim), x_BxNxd.dtype)
    return jax.lax.scan(step, w0, broadcast_schedule(eta, steps, x_BxNxd.dtype))[1]


def gdpp_iterates(batch: TaskBatch, eta: Any, gamma: Any, steps: int) -> Array:
    """GD++ implicit weights u_1..u_K (prediction after k steps = u_k . x_q, exact): (K, B, d) or (K, B, d_out, d)."""
    steps = check_int("steps", steps, min_value=1)
    eta = check_schedule("eta", eta, steps)
    gamma = check_schedule("gamma", gamma, steps)
    batch = validate_batch(batch)
    out = _gdpp_iterates(batch.replace(w=None), eta, gamma, steps=steps)
    return out if batch.vector_output else out[:, :, 0]


@functools.partial(jax.jit, static_argnames=("steps",))
def _gdpp_iterates(batch: TaskBatch, eta: Any, gamma: Any, *, steps: int) -> Array:
    dtype, n, b, d = batch.x.dtype, batch.n_context, batch.batch_size, batch.dim

    def step(carry, hp):
        x_BxNxd, t_Bxdxd, r_BxNxO, u_BxOxd = carry
        eta_k, gamma_k = hp
        dw_BxOxd = eta_k / n * jnp.einsum("bno,bnd->bod", r_BxNxO, x_BxNxd)
        u_BxOxd = u_BxOxd + jnp.einsum("bod,bde->boe", dw_BxOxd, t_Bxdxd)  # Delta w . (T x_q) = (T^T Delta w) . x_q
        r_BxNxO = r_BxNxO - jnp.einsum("bod,bnd->bno", dw_BxOxd, x_BxNxd)
        c_Bxdxd = jnp.einsum("bnd,bne->bde", x_BxNxd, x_BxNxd)
        x_BxNxd = x_BxNxd - gamma_k * jnp.einsum("bde,bne->bnd", c_Bxdxd, x_BxNxd)
        t_Bxdxd = t_Bxdxd - gamma_k * jnp.einsum("bde,bef->bdf", c_Bxdxd, t_Bxdxd)
        return (x_BxNxd, t_Bxdxd, r_BxNxO, u_BxOxd), u_BxOxd

    eye = jnp.broadcast_to(jnp.eye(d, dtype=dtype), (b, d, d))
    u0 = jnp.zeros((b, batch.out_dim, d), dtype)
    hps = (broadcast_schedule(eta, steps, dtype), broadcast_schedule(gamma, steps, dtype))
    return jax.lax.scan(step, (batch.x, eye, batch.labels_BxNxO(), u0), hps)[1]


def cosine(a: Any, b: Any, eps: float = 1e-30) -> np.ndarray:
    """Cosine between weight vectors over the last axis (and the output axis, when present, flattened with it):
    a and b of shape (..., B, d) or (..., B, O, d) with the same ``vector`` flag, returns (..., B)."""
    a, b = _flat_weights(a, b)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + eps)


def relative_error(a: Any, b: Any, eps: float = 1e-30) -> np.ndarray:
    """||a - b|| / ||b|| per task (b the reference), same shapes as :func:`cosine`."""
    a, b = _flat_weights(a, b)
    return np.linalg.norm(a - b, axis=-1) / (np.linalg.norm(b, axis=-1) + eps)


def _flat_weights(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"weights to compare must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def compare_layers(params: TransformerParams, batch: TaskBatch, *, eta: Any, gamma: Any = None
                   ) -> dict[str, np.ndarray]:
    """Per-layer comparison of the model's implicit weights with GD, GD++ (when ``gamma`` is given) and least squares.

    ``eta`` (and ``gamma``) are the learners' step sizes, scalars or one per layer application (K,). Returns arrays of
    length K: ``cos_gd``, ``relerr_gd``, ``cos_gdpp``, ``relerr_gdpp`` (GD++ only with gamma), ``cos_ls``,
    ``relerr_ls`` (means over tasks), and ``norm`` (mean ||w_l||) and ``norm_ls``. Vector outputs are compared with
    the output axis flattened into the weight vector.
    """
    batch = validate_batch(batch)
    model = layer_implicit_weights(params, batch)
    k = params.depth
    flat = (lambda w: w.reshape(w.shape[:-2] + (-1,))) if batch.vector_output else (lambda w: w)
    model = flat(np.asarray(model, np.float64))
    refs = {"gd": flat(np.asarray(gd_iterates(batch, eta, k), np.float64))}
    if gamma is not None:
        refs["gdpp"] = flat(np.asarray(gdpp_iterates(batch, eta, gamma, k), np.float64))
    ls = np.asarray(LeastSquares().weights(batch), np.float64)  # (B, O, d)
    ls = flat(ls if batch.vector_output else ls[:, 0])
    refs["ls"] = np.broadcast_to(ls, model.shape)
    out: dict[str, np.ndarray] = {}
    for name, ref in refs.items():
        out[f"cos_{name}"] = cosine(model, ref).mean(-1)
        out[f"relerr_{name}"] = relative_error(model, ref).mean(-1)
    out["norm"] = np.linalg.norm(model, axis=-1).mean(-1)
    out["norm_ls"] = np.full(k, np.linalg.norm(ls, axis=-1).mean())
    return out


# ------------------------------------------------------------------------------------ GD++ as a map on the spectrum


def gdpp_eigenvalue_map(eigenvalues: Any, gamma: Any) -> np.ndarray:
    """Eigenvalues of C = X^T X before and after each GD++ input update, exact: lambda -> lambda (1 - gamma_l lambda)^2.

    ``eigenvalues``: any shape (...); ``gamma``: scalar or (L,) per-step values (a scalar means one step).
    Returns (L + 1, ...), row 0 the input.
    """
    lam = np.asarray(check_float("eigenvalues", eigenvalues), np.float64)
    gammas = np.atleast_1d(np.asarray(check_float("gamma", gamma), np.float64))
    if gammas.ndim != 1:
        raise ValueError(f"gamma must be a scalar or have shape (L,), got shape {np.shape(gamma)}")
    out = [lam]
    for g in gammas:
        out.append(out[-1] * (1.0 - g * out[-1]) ** 2)
    return np.stack(out)


def gdpp_input_covariances(x: Any, gamma: Any) -> np.ndarray:
    """C = X^T X before and after each explicit GD++ input update X <- X (I - gamma_l C): (L + 1, B, d, d), float64.

    The direct computation (the reference for :func:`gdpp_eigenvalue_map`); ``x`` is (B, N, d) context inputs.
    """
    x = np.asarray(check_float("x", x), np.float64)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, N, d), got {x.shape}")
    gammas = np.atleast_1d(np.asarray(check_float("gamma", gamma), np.float64))
    covs = [np.einsum("bnd,bne->bde", x, x)]
    for g in gammas:
        x = x - g * x @ covs[-1]
        covs.append(np.einsum("bnd,bne->bde", x, x))
    return np.stack(covs)


def range_eigenvalues(x: Any) -> np.ndarray:
    """The min(N, d) largest eigenvalues of C = X^T X per task (those of the range of X), ascending: (B, min(N, d))."""
    x = np.asarray(check_float("x", x), np.float64)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, N, d), got {x.shape}")
    lam = np.linalg.eigvalsh(np.einsum("bnd,bne->bde", x, x))
    return lam[:, x.shape[2] - min(x.shape[1], x.shape[2]):]


def condition_numbers(eigenvalues: Any) -> np.ndarray:
    """max / min over the last axis (inf where the minimum is 0)."""
    lam = np.asarray(eigenvalues, np.float64)
    lo, hi = lam.min(-1), lam.max(-1)
    with np.errstate(divide="ignore"):
        return np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.inf)


def gdpp_conditioning(x: Any, gamma: Any) -> np.ndarray:
    """Condition number of C = X^T X (on the range of X) before and after each GD++ step: (L + 1, B), exact map."""
    return condition_numbers(gdpp_eigenvalue_map(range_eigenvalues(x), gamma))


def greedy_gdpp_gammas(eigenvalues: Any, n_layers: int, *, n_grid: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A per-layer gamma shared by all tasks, each chosen in turn to minimise the mean log condition number after
    that layer (grid over gamma * median(lambda_max) in [0, 1.5], then refined): the fastest conditioning GD++ can
    give these spectra layer by layer with one gamma per layer (greedy, so an upper bound on the best schedule).

    ``eigenvalues``: (B, r) range eigenvalues (:func:`range_eigenvalues`). Returns (gammas (L,), mean log10
    condition numbers (L + 1,)).
    """
    from scipy.optimize import minimize_scalar

    lam = np.asarray(check_float("eigenvalues", eigenvalues, min_value=0.0), np.float64)
    if lam.ndim != 2:
        raise ValueError(f"eigenvalues must have shape (B, r), got {lam.shape}")
    n_layers = check_int("n_layers", n_layers, min_value=1)
    n_grid = check_int("n_grid", n_grid, min_value=3)

    def score(g, spectrum):
        return float(np.mean(np.log10(condition_numbers(spectrum * (1.0 - g * spectrum) ** 2))))

    gammas, scores = [], [float(np.mean(np.log10(condition_numbers(lam))))]
    for _ in range(n_layers):
        scale = float(np.median(lam.max(-1)))
        grid = np.linspace(0.0, 1.5 / scale, n_grid)
        values = [score(g, lam) for g in grid]
        i = int(np.nanargmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
        best = minimize_scalar(lambda g: score(g, lam), bounds=(lo, hi), method="bounded",
                               options={"xatol": 1e-12 * scale ** -1})
        g = float(best.x) if best.fun <= values[i] else float(grid[i])
        lam = lam * (1.0 - g * lam) ** 2
        gammas.append(g)
        scores.append(score(0.0, lam))
    return np.asarray(gammas), np.asarray(scores)


def context_inputs_per_layer(params: TransformerParams, batch: TaskBatch) -> np.ndarray:
    """The x-part of the context tokens before and after each layer application: (K + 1, B, N, d), concat layout."""
    check_params(params)
    batch = validate_batch(batch)
    check_token_dim(params, batch)
    if params.arch.layout != "concat":
        raise ValueError("context_inputs_per_layer needs the concat layout (context tokens (x_i, y_i))")
    dtype = jnp.result_type(batch.x.dtype, *jax.tree.leaves(params))
    batch = jax.tree.map(lambda a: a.astype(dtype), batch.replace(w=None))
    tokens = build_tokens(batch, "concat")
    outs = forward(params, tokens, batch.n_context, return_all=True)
    n, d = batch.n_context, batch.dim
    return np.stack([np.asarray(batch.x, np.float64)] + [np.asarray(o[:, :n, :d], np.float64) for o in outs])


def token_conditioning(params: TransformerParams, batch: TaskBatch) -> np.ndarray:
    """Condition number of the model's own context-input covariance X_l^T X_l (range of X) per layer: (K + 1, B).

    What a trained deep model does to its inputs, measured; for GD++ weights it equals :func:`gdpp_conditioning`.
    """
    xs = context_inputs_per_layer(params, batch)
    return np.stack([condition_numbers(range_eigenvalues(x)) for x in xs])


def fit_gdpp_gammas(params: TransformerParams, batch: TaskBatch) -> dict[str, np.ndarray]:
    """Least-squares fit, per layer, of the model's context-input update to the GD++ form X <- X - gamma X C.

    Returns ``gamma`` (K,) and ``r2`` (K,), the fraction of the update's squared norm that the fit explains
    (1 for GD++ weights; 1 with gamma = 0 when the inputs do not move).
    """
    xs = context_inputs_per_layer(params, batch)
    gammas, r2 = [], []
    for x0, x1 in zip(xs[:-1], xs[1:]):
        delta = x1 - x0
        basis = -x0 @ np.einsum("bnd,bne->bde", x0, x0)  # -X C
        denom, total = float(np.sum(basis**2)), float(np.sum(delta**2))
        g = float(np.sum(delta * basis)) / denom if denom > 0 else 0.0
        gammas.append(g)
        r2.append(1.0 - float(np.sum((delta - g * basis) ** 2)) / total if total > 0 else 1.0)
    return {"gamma": np.asarray(gammas), "r2": np.asarray(r2)}
