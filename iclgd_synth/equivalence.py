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
from iclgd_synth.validation import check_float, check_int, int_at_least

#: float64 differences above this make the command exit non-zero (the construction is exact up to rounding).
FLOAT64_TOLERANCE = 1e-10
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
    predictions, for scale), loss (half-MSE of the explicit learner), backend, device. float32 rows are computed
    from float32 tasks and float32 weights; float64 rows from the same tasks in float64.
    """
    batch_size = check_int("batch_size", batch_size, min_value=1)
    max_layers = check_int("max_layers", max_layers, min_value=1)
    check_int("seed", seed, min_value=0)
    check_float("gamma", gamma)
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
                    rows.append({"K": steps, "construction": construction, "dtype": dtype_name, "eta": eta,
                                 "gamma": g, "max_abs_diff": float(out["max_abs_diff"]),
                                 "max_abs_pred": float(out["max_abs_pred"]), "loss": float(out["loss"]),
                                 "backend": backend, "device": device})
    return rows


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
    """Print the table (or JSON); exit status 1 if a float64 difference exceeds FLOAT64_TOLERANCE."""
    rows = equivalence_table(args.batch_size, args.max_layers, seed=getattr(args, "seed", 0),
                             gamma=getattr(args, "gamma", 0.1),
                             matmul_precision=getattr(args, "matmul_precision", None))
    failed = [r for r in rows if r["dtype"] == "float64" and not r["max_abs_diff"] <= FLOAT64_TOLERANCE]
    if args.json:
        json.dump({"backend": rows[0]["backend"], "device": rows[0]["device"], "batch_size": args.batch_size,
                   "tasks": "vonoswald (d = N = 10, x ~ U(-0.5, 0.5), noiseless)",
                   "float64_tolerance": FLOAT64_TOLERANCE, "ok": not failed, "rows": rows}, sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows, args.batch_size))
        if failed:
            print(f"FAILED: {len(failed)} float64 row(s) above {FLOAT64_TOLERANCE:g}")
    return 1 if failed else 0


def format_table(rows: list[dict[str, Any]], batch_size: int) -> str:
    """Plain-text table of :func:`equivalence_table` rows, with the backend and device in the header."""
    lines = [f"hand-constructed LSA vs explicit GD / GD++ on {batch_size} vonoswald tasks (d = N = 10, "
             f"x ~ U(-0.5, 0.5)); backend: {rows[0]['backend']} ({rows[0]['device']})",
             f"{'K':>2}  {'construction':<12}  {'dtype':<7}  {'eta':>6}  {'gamma':>5}  {'max |diff|':>10}  "
             f"{'max |pred|':>10}  {'loss':>7}"]
    for r in rows:
        gamma = "-" if r["gamma"] is None else f"{r['gamma']:.2f}"
        lines.append(f"{r['K']:>2}  {r['construction']:<12}  {r['dtype']:<7}  {r['eta']:>6.3f}  {gamma:>5}  "
                     f"{r['max_abs_diff']:>10.2e}  {r['max_abs_pred']:>10.3f}  {r['loss']:>7.4f}")
    return "\n".join(lines)
