"""``iclgd equivalence``: how closely the hand-constructed LSA weights reproduce explicit GD and GD++.

"Transformers learn in-context by gradient descent" (Proposition 1 and the GD++ construction) says K layers of the
constructed weights *are* K steps of GD (GD++). This command measures the max abs difference between the two on
reference-paper tasks (d = N = 10, x ~ U(-0.5, 0.5), noiseless), for K = 1..max_layers, in float32 and float64, on the
default JAX backend. float64 differences are rounding only (~1e-16); float32 ones show the precision a float32 run
can expect (on GPUs whose float32 matmuls default to TF32 they are much larger: pass ``--matmul-precision highest``).

Step sizes: eta is the exact tuned step of K-step GD on the float64 batch (``tune_gd``); GD++ uses the same eta and
gamma = 0.1 (near the value the reference paper's trained 2-layer models learn at N = 10).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from iclgd_synth.constructions import gd_params, gdpp_params
from iclgd_synth.learners.gd import GD
from iclgd_synth.learners.gdpp import GDPlusPlus
from iclgd_synth.learners.tuning import tune_gd
from iclgd_synth.losses import half_mse
from iclgd_synth.tasks import TASK_PRESETS, TaskBatch, sample
from iclgd_synth.validation import check_float, check_int, int_at_least, warn_slow_compile

#: float64 differences above this times the prediction scale max(1, max |pred|) make the command exit non-zero (the
#: construction is exact up to rounding, which is relative: at gamma = 1e6 the GD++ predictions reach 1e24 and differ
#: by 4e-16 of that).
FLOAT64_TOLERANCE = 1e-10
#: max_layers above which the command warns that compiling takes long (one program per K, construction and dtype,
#: each with K layers unrolled; measured on a 2-core CPU: 87 s for max_layers = 10, 274 s for 20).
SLOW_COMPILE_MAX_LAYERS = 10
CONSTRUCTIONS = ("GD", "GD++")
DTYPES = ("float32", "float64")


@contextlib.contextmanager
def _x64() -> Iterator[None]:
    """float64 available inside the block; the previous setting restored afterwards (callers other than the CLI)."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@functools.partial(jax.jit, static_argnames=("construction", "steps"))
def _compare(batch: TaskBatch, eta, gamma, *, construction: str, steps: int) -> dict[str, jax.Array]:
    """Hand LSA vs the explicit learner on one batch; every array keeps the batch's dtype."""
    d, n, dtype = batch.dim, batch.n_context, batch.x.dtype
    if construction == "GD":
        params = gd_params(d, eta, steps, n_context=n, dtype=dtype)
        explicit = GD(eta=eta, steps=steps)(batch)
    else:
        params = gdpp_params(d, eta, gamma, steps, n_context=n, dtype=dtype)
        explicit = GDPlusPlus(eta=eta, gamma=gamma, steps=steps)(batch)
    hand = params(batch)
    return {"max_abs_diff": jnp.max(jnp.abs(hand - explicit)), "max_abs_pred": jnp.max(jnp.abs(explicit)),
            "loss": half_mse(explicit, batch.y_query), "dtype": jnp.zeros((), hand.dtype)}


def equivalence_table(batch_size: int = 1000, max_layers: int = 5, *, seed: int = 0, gamma: float = 0.1,
                      matmul_precision: str | None = None) -> list[dict[str, Any]]:
    """One row per (K, construction, dtype): the max abs difference between hand LSA and explicit GD / GD++.

    Args:
      batch_size: number of reference-paper tasks (d = N = 10, x ~ U(-0.5, 0.5), noiseless).
      max_layers: K runs over 1..max_layers.
      seed: PRNG seed of the tasks.
      gamma: GD++'s input-transformation strength.
      matmul_precision: None (the backend's default) or a ``jax.default_matmul_precision`` value ("highest", ...).

    Each row: K, construction, dtype, eta, gamma (None for GD), max_abs_diff, max_abs_pred (the size of the
    predictions, for scale), rel_diff (max_abs_diff / max(1, max_abs_pred): what :data:`FLOAT64_TOLERANCE` bounds),
    loss (half-MSE of the explicit learner), backend, device. float32 rows are computed from float32 tasks and float32
    weights; float64 rows from the same tasks in float64. Predictions that overflow (a huge gamma) give NaN / inf
    entries: see :func:`row_status`.
    """
    batch_size = check_int("batch_size", batch_size, min_value=1)
    max_layers = check_int("max_layers", max_layers, min_value=1)
    check_int("seed", seed, min_value=0)
    check_float("gamma", gamma)
    if max_layers > SLOW_COMPILE_MAX_LAYERS:
        seconds = 3.7 * max_layers + 0.5 * max_layers ** 2  # fitted to the two measurements above
        warn_slow_compile(f"max_layers = {max_layers}: a program with K layers unrolled is compiled for every K = "
                          f"1..{max_layers}, construction and dtype, which takes roughly {seconds / 60:.0f} min on a "
                          f"2-core CPU (about 0.5 K^2 s); use a smaller --max-layers for a quick check")
    precision = (jax.default_matmul_precision(matmul_precision) if matmul_precision is not None
                 else contextlib.nullcontext())
    rows = []
    with _x64(), precision:
        backend, device = jax.default_backend(), jax.devices()[0].device_kind
        batch64 = sample(jax.random.PRNGKey(seed), TASK_PRESETS["vonoswald"], batch_size, dtype=jnp.float64)
        batches = {"float64": batch64, "float32": jax.tree.map(lambda a: a.astype(jnp.float32), batch64)}
        for steps in range(1, max_layers + 1):
            eta = tune_gd(batch64, steps).eta
            for construction in CONSTRUCTIONS:
                g = gamma if construction == "GD++" else None
                for dtype_name in DTYPES:
                    batch = batches[dtype_name]
                    dt = batch.x.dtype
                    out = _compare(batch, jnp.asarray(eta, dt), jnp.asarray(gamma, dt), construction=construction,
                                   steps=steps)
                    if out["dtype"].dtype != dt:  # guard: the row must really be computed in its dtype
                        raise RuntimeError(f"{construction} K={steps}: computed in {out['dtype'].dtype}, not {dt}")
                    diff, scale = float(out["max_abs_diff"]), float(out["max_abs_pred"])
                    rows.append({"K": steps, "construction": construction, "dtype": dtype_name, "eta": eta,
                                 "gamma": g, "max_abs_diff": diff, "max_abs_pred": scale,
                                 "rel_diff": diff / max(1.0, scale), "loss": float(out["loss"]),
                                 "backend": backend, "device": device})
    return rows


def row_status(row: dict[str, Any]) -> str:
    """"ok" or "failed" for a float64 row (its difference relative to the prediction scale against
    :data:`FLOAT64_TOLERANCE`), "overflow" when its predictions are not finite (nothing to compare), "" for float32
    rows (no tolerance: they show the precision a float32 run can expect)."""
    if row["dtype"] != "float64":
        return ""
    if not math.isfinite(row["max_abs_pred"]):
        return "overflow"
    return "ok" if row["max_abs_diff"] <= FLOAT64_TOLERANCE * max(1.0, row["max_abs_pred"]) else "failed"


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite real number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite real number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int_at_least(1), default=1000, help="number of tasks (default 1000)")
    parser.add_argument("--max-layers", type=int_at_least(1), default=5,
                        help="K runs over 1..max-layers (default 5)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="PRNG seed of the tasks (default 0)")
    parser.add_argument("--gamma", type=_finite_float, default=0.1,
                        help="GD++ input-transformation strength (default 0.1)")
    parser.add_argument("--matmul-precision", default=None, choices=["default", "high", "highest"],
                        help="jax.default_matmul_precision for the run (default: the backend's own default)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    """Print the table (or JSON); exit status 1 if a float64 difference exceeds FLOAT64_TOLERANCE times the
    prediction scale. Rows whose predictions overflow are reported as not compared (they do not fail)."""
    rows = equivalence_table(args.batch_size, args.max_layers, seed=getattr(args, "seed", 0),
                             gamma=getattr(args, "gamma", 0.1),
                             matmul_precision=getattr(args, "matmul_precision", None))
    failed = [r for r in rows if row_status(r) == "failed"]
    overflow = [r for r in rows if row_status(r) == "overflow"]
    if args.json:
        json.dump({"backend": rows[0]["backend"], "device": rows[0]["device"], "batch_size": args.batch_size,
                   "tasks": "vonoswald (d = N = 10, x ~ U(-0.5, 0.5), noiseless)",
                   "float64_tolerance": FLOAT64_TOLERANCE, "tolerance_is": "relative to max(1, max_abs_pred)",
                   "ok": not failed, "overflow": [[r["K"], r["construction"]] for r in overflow],
                   "rows": [{**r, "status": row_status(r)} for r in rows]}, sys.stdout, indent=2, default=str)
        print()
    else:
        print(format_table(rows, args.batch_size))
        if overflow:
            print(f"not compared: {len(overflow)} float64 row(s) whose predictions overflow float64 ("
                  + ", ".join(f"K={r['K']} {r['construction']}" for r in overflow)
                  + "); the input transformation grows by about gamma per layer, so use a smaller --gamma")
        if failed:
            print(f"FAILED: {len(failed)} float64 row(s) above {FLOAT64_TOLERANCE:g} x max(1, max |pred|)")
    return 1 if failed else 0


def format_table(rows: list[dict[str, Any]], batch_size: int) -> str:
    """Plain-text table of :func:`equivalence_table` rows, with the backend and device in the header."""
    lines = [f"hand-constructed LSA vs explicit GD / GD++ on {batch_size} vonoswald tasks (d = N = 10, "
             f"x ~ U(-0.5, 0.5)); backend: {rows[0]['backend']} ({rows[0]['device']})",
             f"{'K':>2}  {'construction':<12}  {'dtype':<7}  {'eta':>6}  {'gamma':>5}  {'max |diff|':>10}  "
             f"{'max |pred|':>10}  {'rel diff':>9}  {'loss':>9}"]
    for r in rows:
        gamma = "-" if r["gamma"] is None else f"{r['gamma']:.3g}"
        lines.append(f"{r['K']:>2}  {r['construction']:<12}  {r['dtype']:<7}  {r['eta']:>6.3f}  {gamma:>5}  "
                     f"{r['max_abs_diff']:>10.2e}  {r['max_abs_pred']:>10.4g}  {r['rel_diff']:>9.2e}  "
                     f"{r['loss']:>9.4g}  {row_status(r)}".rstrip())
    return "\n".join(lines)
