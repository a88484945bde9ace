"""Comparison metrics between any two predictors ("Transformers learn in-context by gradient descent", section 5).

A predictor is anything with the call shape ``f(batch) -> (B,)``: Transformer parameters (``params(batch)``),
``GD(eta, steps)``, ``Ridge(lam)``, ... Averages are over the tasks of the batch.

- preds diff: mean ||f(batch) - g(batch)||_2 (L2 over output dimensions).
- model cos / model diff: cosine and L2 distance between the sensitivities d y_hat / d x_q of the two predictors
  (for linear predictors these are the implicit weights W such that y_hat = W x_q).
- weight alignment and interpolation: for linear attention only the products W_KQ = W_K^T W_Q and W_PV = P W_V
  matter; the trained pair is rescaled by beta (mean diagonal of the x-block of its W_KQ) so it is comparable with
  the construction, the two are compared by cosine, averaged, and the averaged model's loss is reported.
- out-of-distribution sweeps (:func:`ood_sweep`): x scale, w scale, other input laws and label corruption. The
  other laws (normal, Laplace, exponential) are rescaled to the training law's per-coordinate second moment
  E[x_j^2], so that sweep measures the law's shape; the x-scale sweep measures the scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth.attention import head_products
from iclgd_synth.constructions import from_products
from iclgd_synth.losses import half_mse
from iclgd_synth.model import TransformerParams, layer_predictions
from iclgd_synth.shapes import Array, Predictor
from iclgd_synth.similarity import cosine, cosine_rows, mean_defined
from iclgd_synth.tasks import TaskBatch, TaskConfig, input_second_moment, sample, validate_batch  # noqa: F401


def as_predictor(obj: Any) -> Predictor:
    """A jit-compiled predictor: parameters and pytree learners (GD, Ridge, ...) are traced as arguments, so one
    compilation serves every value of their weights or hyper-parameters; other callables pass through unchanged."""
    if callable(obj):
        leaves = jax.tree.leaves(obj)
        if len(leaves) == 1 and leaves[0] is obj:  # not a pytree: call as is
            return obj
        return functools.partial(_jit_call, obj)
    raise TypeError(f"expected TransformerParams or a predictor callable(batch) -> (B,), got {type(obj).__name__}")


@jax.jit
def _jit_call(f: Any, batch: TaskBatch) -> Array:
    return f(batch)


def loss(f: Any, batch: TaskBatch) -> float:
    """Half-MSE of predictor ``f`` on the query labels."""
    batch = validate_batch(batch)
    return float(half_mse(as_predictor(f)(batch), batch.y_query))


def sensitivities(f: Any, batch: TaskBatch) -> Array:
    """d y_hat / d x_q per task: (B, d), or (B, d_out, d) for vector outputs."""
    batch = validate_batch(batch)
    if as_predictor(f) is not f:
        return _jit_sensitivities(f, batch)
    return _sensitivities(f, batch)


@jax.jit
def _jit_sensitivities(f: Any, batch: TaskBatch) -> Array:
    return _sensitivities(f, batch)


def _sensitivities(f: Any, batch: TaskBatch) -> Array:
    def out(xq):
        return f(batch.replace(x_query=xq))

    y, vjp = jax.vjp(out, batch.x_query)
    if y.ndim == 1:
        return vjp(jnp.ones_like(y))[0]
    # Tasks are independent, so one VJP per output dimension gives every task's Jacobian row.
    rows = [vjp(jnp.zeros_like(y).at[:, o].set(1.0))[0] for o in range(y.shape[1])]
    return jnp.stack(rows, axis=1)


def _l2_rows(a: Array) -> Array:
    """Per-task L2 norm over output (and input) dimensions."""
    return jnp.abs(a) if a.ndim == 1 else jnp.linalg.norm(a.reshape(a.shape[0], -1), axis=-1)


def _mean_cos(a: Array, b: Array) -> float:
    """Mean per-task cosine; tasks where either sensitivity is zero are undefined and left out
    (:mod:`iclgd_synth.similarity`)."""
    return mean_defined(cosine_rows(a, b))[0]


def preds_diff(f: Any, g: Any, batch: TaskBatch) -> float:
    """Mean over tasks of the L2 distance between the two predictions."""
    return float(jnp.mean(_l2_rows(as_predictor(f)(batch) - as_predictor(g)(batch))))


def model_cos(f: Any, g: Any, batch: TaskBatch) -> float:
    """Mean over tasks of the cosine between the sensitivities of ``f`` and ``g``."""
    return _mean_cos(sensitivities(f, batch), sensitivities(g, batch))


def model_diff(f: Any, g: Any, batch: TaskBatch) -> float:
    """Mean over tasks of the L2 distance between the sensitivities of ``f`` and ``g``."""
    return float(jnp.mean(_l2_rows(sensitivities(f, batch) - sensitivities(g, batch))))


def compare(f: Any, g: Any, batch: TaskBatch) -> dict[str, float]:
    """All prediction-level metrics of ``f`` against ``g`` (each prediction and sensitivity computed once)."""
    batch = validate_batch(batch)
    pf, pg = as_predictor(f)(batch), as_predictor(g)(batch)
    sf, sg = sensitivities(f, batch), sensitivities(g, batch)
    return {"loss_a": float(half_mse(pf, batch.y_query)), "loss_b": float(half_mse(pg, batch.y_query)),
            "preds_diff": float(jnp.mean(_l2_rows(pf - pg))), "model_cos": _mean_cos(sf, sg),
            "model_diff": float(jnp.mean(_l2_rows(sf - sg)))}


def effective_products(params: TransformerParams, layer: int = 0) -> tuple[Array, Array]:
    """(W_KQ, W_PV) of one linear-attention layer with a single head, each (D, D)."""
    kq, pv = head_products(params.layers[layer])
    if kq.shape[0] != 1:
        raise ValueError("effective_products needs a single-head layer; multi-head layers have one pair per head")
    return kq[0], pv[0]


def rescaled_products(params: TransformerParams, dim: int, layer: int = 0) -> tuple[Array, Array, float]:
    """(W_KQ / beta, beta W_PV, beta) with beta the mean diagonal of the x-block of W_KQ (the product is kept)."""
    kq, pv = effective_products(params, layer)
    beta = jnp.mean(jnp.diagonal(kq)[:dim])
    return kq / beta, pv * beta, float(beta)


def weight_alignment(trained: TransformerParams, hand: TransformerParams, dim: int, layer: int = 0
                     ) -> dict[str, float]:
    """Cosines between trained and constructed W_KQ and W_PV (after rescaling both by their beta), and beta."""
    kq_t, pv_t, beta_t = rescaled_products(trained, dim, layer)
    kq_h, pv_h, _ = rescaled_products(hand, dim, layer)
    return {"kq_cos": cosine(kq_t, kq_h), "pv_cos": cosine(pv_t, pv_h), "beta": beta_t,
            "pv_yy": float(pv_t[dim:, dim:].mean()), "pv_yy_hand": float(pv_h[dim:, dim:].mean())}


def interpolate(trained: TransformerParams, hand: TransformerParams, dim: int, alpha: float = 0.5
                ) -> TransformerParams:
    """Single-layer model whose rescaled products are (1 - alpha) * trained + alpha * hand."""
    kq_t, pv_t, _ = rescaled_products(trained, dim)
    kq_h, pv_h, _ = rescaled_products(hand, dim)
    kq = (1 - alpha) * kq_t + alpha * kq_h
    pv = (1 - alpha) * pv_t + alpha * pv_h
    return from_products(kq, pv, arch=hand.arch)


def per_layer_losses(params: TransformerParams, batch: TaskBatch) -> list[float]:
    """Loss of the read-out after each layer application."""
    batch = validate_batch(batch)
    preds = layer_predictions(params, batch)
    return [float(half_mse(p, batch.y_query)) for p in preds]


#: The sweep over input laws, each rescaled to the training law's second moment (see :func:`ood_task`).
X_DIST_SWEEP = "x_dist_matched_second_moment"

#: Out-of-distribution sweeps of the reference paper: name -> (TaskConfig field, default values).
OOD_SWEEPS: dict[str, tuple[str, tuple]] = {
    "x_scale": ("x_scale", (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)),
    "w_scale": ("w_scale", (0.5, 1.0, 2.0, 3.0, 5.0)),
    X_DIST_SWEEP: ("x_dist", ("uniform", "normal", "laplace", "exponential")),
    "label_corruption": ("label_corruption", (0.0, 0.1, 0.2, 0.3)),
}

#: Per-coordinate second moment E[x_j^2] of the unscaled input laws (uniform: a^2 / 3 with a = x_range).
_TASK_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TaskConfig)}


def ood_task(task: TaskConfig, sweep: str, value: Any) -> TaskConfig:
    """The task law of one point of an out-of-distribution sweep.

    For the input-law sweep (:data:`X_DIST_SWEEP`) the new law is rescaled (through ``x_scale``) so that its
    per-coordinate second moment equals the training law's: drawn at unit scale, a normal, Laplace or exponential
    input would have 12-24 times the second moment of U(-0.5, 0.5), and the sweep would measure that scale change
    (which the x-scale sweep already does) rather than the law's shape.
    """
    if sweep not in OOD_SWEEPS:
        raise ValueError(f"sweep must be one of {sorted(OOD_SWEEPS)}, got {sweep!r}")
    field = OOD_SWEEPS[sweep][0]
    if sweep != X_DIST_SWEEP:
        return task.replace(**{field: value})
    # The anisotropic law's own fields are reset when leaving it (they are rejected with any other law).
    aniso = {} if value == "anisotropic" else {f: _TASK_DEFAULTS[f] for f in ("x_cov", "condition_number", "cov_seed")}
    law = task.replace(x_dist=value, x_scale=1.0, **aniso)
    return law.replace(x_scale=float(np.sqrt(input_second_moment(task) / input_second_moment(law))))


def ood_sweep(predictors: Mapping[str, Any], task: TaskConfig, sweep: str, *, values: tuple | None = None,
              n_tasks: int = 2000, seed: int = 12345) -> dict[str, Any]:
    """Loss of every predictor as one task property moves away from training (same tasks for all predictors).

    ``sweep`` is one of :data:`OOD_SWEEPS`; each point's task law is :func:`ood_task` (the input laws are matched to
    the training law's second moment). Returns {"values": [...], "losses": {name: [...]}}.
    """
    if sweep not in OOD_SWEEPS:
        raise ValueError(f"sweep must be one of {sorted(OOD_SWEEPS)}, got {sweep!r}")
    values = tuple(OOD_SWEEPS[sweep][1] if values is None else values)
    out: dict[str, Any] = {"values": list(values), "losses": {name: [] for name in predictors}}
    for v in values:
        batch = sample(jax.random.PRNGKey(seed), ood_task(task, sweep, v), n_tasks)
        for name, f in predictors.items():
            out["losses"][name].append(loss(f, batch))
    return out


def metric_table(rows: Mapping[str, Mapping[str, float]], columns: list[str]) -> str:
    """A Markdown table: one row per entry, the given metric columns."""
    head = "| | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for name, vals in rows.items():
        cells = []
        for c in columns:
            v = vals.get(c)
            cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, (float, int, np.floating)) else str(v)))
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


def position_sensitivities(f: Any, batch: TaskBatch) -> Array:
    """d y_hat_n / d x_{n+1} for every prefix length n: (B, N + 1, d).

    ``f(batch) -> (B, N + 1)`` predicts y_{n+1} from the first n pairs at every n (a GPT-style model's
    :func:`~iclgd_synth.gpt.gpt_forward` or a prefix baseline of :mod:`iclgd_synth.learners.prefix`); column n is read
    at x_{n+1} (x_{N+1} = x_q). The derivative is taken with respect to that input alone (the same x also enters later
    columns as a demonstration; those paths are not part of column n's sensitivity), one reverse pass per column. For
    a predictor linear in its query input these are its implicit weights.
    """
    batch = validate_batch(batch).replace(w=None)
    xs = jnp.concatenate([batch.x, batch.x_query[:, None]], axis=1)

    def g(xs_BxPxd):
        return f(batch.replace(x=xs_BxPxd[:, :-1], x_query=xs_BxPxd[:, -1]))

    out, vjp = jax.vjp(g, xs)
    if out.ndim != 2 or out.shape != xs.shape[:2]:
        raise ValueError(f"f must return (B, N + 1) = {xs.shape[:2]} predictions (one per prefix), got {out.shape}")

    def column(n):
        return vjp(jnp.zeros_like(out).at[:, n].set(1.0))[0][:, n, :]

    return jax.lax.map(column, jnp.arange(out.shape[1])).transpose(1, 0, 2)
