"""Speed benchmarks on the current JAX backend (``iclgd bench``): figures and ratios, printed and saved as JSON.

- training throughput for the ``vonoswald`` preset (tasks/s) with scan-jitted chunks, and its ratio to a per-step
  Python loop calling the same jitted update;
- the time of GD step-size tuning on 10^4 tasks (exact polynomial method, and the grid method for comparison);
- the LSA forward pass in the dual form vs the quadratic form at N = 10, 100, 1000, 10000 (ratio);
- the main job (``iclgd run vonoswald``) end to end, in a fresh process.

Timings take the best of a few repeats after a warm-up call, so compilation is excluded except for the main job.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax


def _best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def bench_training(steps: int = 200, batch_size: int = 2048) -> dict[str, float]:
    """Tasks/s of scan-jitted chunks vs a Python loop over the same jitted single step."""
    from iclgd_synth.train import TrainConfig, init_state, make_chunk, make_optimizer, make_step

    config = TrainConfig(batch_size=batch_size, n_steps=steps, chunk_steps=steps)
    optimizer = make_optimizer(config)
    params, opt_state, keys = init_state(config)
    chunk = make_chunk(config, optimizer, steps)
    t_scan = _best_time(lambda: chunk(params, opt_state, keys, 0)[2], repeats=2)
    step = jax.jit(jax.vmap(make_step(config, optimizer), in_axes=(0, 0, 0, None)))

    def loop():
        p, o, loss = params, opt_state, None
        for s in range(steps):
            p, o, loss = step(p, o, keys, s)
        return loss

    t_loop = _best_time(loop, repeats=2)
    return {"steps": steps, "batch_size": batch_size, "scan_tasks_per_s": steps * batch_size / t_scan,
            "loop_tasks_per_s": steps * batch_size / t_loop, "scan_over_loop": t_loop / t_scan}


def bench_tuning(n_tasks: int = 10000) -> dict[str, float]:
    from iclgd_synth.learners import tune_gd
    from iclgd_synth.tasks import TASK_PRESETS, sample

    batch = jax.block_until_ready(sample(jax.random.PRNGKey(0), TASK_PRESETS["vonoswald"], n_tasks))
    out: dict[str, float] = {"n_tasks": n_tasks}
    for k in (1, 5):
        t0 = time.perf_counter()
        tuned = tune_gd(batch, k)
        out[f"exact_{k}step_s"] = time.perf_counter() - t0
        out[f"exact_{k}step_eta"] = tuned.eta
    t0 = time.perf_counter()
    out["grid_1step_eta"] = tune_gd(batch, 1, method="grid").eta
    out["grid_1step_s"] = time.perf_counter() - t0
    return out


def bench_forward(ns: tuple[int, ...] = (10, 100, 1000, 10000), dim: int = 10, tokens_per_call: int = 2 ** 17
                  ) -> list[dict[str, float]]:
    """Forward pass of a 1-layer LSA (all tokens updated) in dual vs quadratic form."""
    from iclgd_synth.constructions import gd_params
    from iclgd_synth.model import forward

    params = gd_params(dim, 1.0)
    rows = []
    for n in ns:
        b = max(1, tokens_per_call // (n + 1))
        tokens = jax.random.normal(jax.random.PRNGKey(n), (b, n + 1, dim + 1))
        dual = jax.jit(lambda t: forward(params, t, n, form="dual"))
        quad = jax.jit(lambda t: forward(params, t, n, form="quadratic"))
        t_dual = _best_time(lambda: dual(tokens))
        t_quad = _best_time(lambda: quad(tokens))
        rows.append({"N": n, "batch": b, "dual_s": t_dual, "quadratic_s": t_quad, "quadratic_over_dual": t_quad / t_dual})
    return rows


def bench_main_job(quick: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as root:
        cmd = [sys.executable, "-m", "iclgd_synth.cli", "run", "vonoswald", "--root", root, "--no-progress"]
        if quick:
            cmd.append("--quick")
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        run = next(Path(root).glob("vonoswald-*"))
        metrics = json.loads((run / "metrics.json").read_text())
    return {"seconds": seconds, "quick": quick, "train_seconds": metrics["train_seconds"],
            "trained_loss": metrics["trained_loss"], "gd_loss": metrics["gd_loss"]}


def run_all(quick: bool = False) -> dict[str, Any]:
    dev = jax.devices()[0]
    result: dict[str, Any] = {"backend": jax.default_backend(), "device": str(dev.device_kind),
                              "n_devices": jax.device_count()}
    result["training"] = bench_training(steps=50 if quick else 200, batch_size=2048)
    result["tuning"] = bench_tuning(2000 if quick else 10000)
    result["forward"] = bench_forward((10, 100) if quick else (10, 100, 1000, 10000))
    result["main_job"] = bench_main_job(quick=quick)
    return result


def format_report(r: dict[str, Any]) -> str:
    t, u, m = r["training"], r["tuning"], r["main_job"]
    lines = [f"backend: {r['backend']} ({r['device']}, {r['n_devices']} device(s))", "",
             f"training, vonoswald preset, batch {t['batch_size']}:",
             f"  scan-jitted chunks : {t['scan_tasks_per_s']:,.0f} tasks/s",
             f"  per-step Python loop: {t['loop_tasks_per_s']:,.0f} tasks/s",
             f"  ratio scan / loop   : {t['scan_over_loop']:.2f}x", "",
             f"GD step-size tuning on {u['n_tasks']} tasks:",
             f"  exact, 1 step : {u['exact_1step_s']:.3f} s (eta {u['exact_1step_eta']:.4f})",
             f"  exact, 5 steps: {u['exact_5step_s']:.3f} s (eta {u['exact_5step_eta']:.4f})",
             f"  grid, 1 step  : {u['grid_1step_s']:.3f} s (eta {u['grid_1step_eta']:.4f})", "",
             "LSA forward, dual vs quadratic form:", "  N       batch   dual (ms)  quadratic (ms)  ratio"]
    for row in r["forward"]:
        lines.append(f"  {row['N']:<7d} {row['batch']:<7d} {1e3 * row['dual_s']:9.2f}  {1e3 * row['quadratic_s']:14.2f}"
                     f"  {row['quadratic_over_dual']:6.1f}x")
    lines += ["", f"main job (iclgd run vonoswald{' --quick' if m['quick'] else ''}), fresh process: "
                  f"{m['seconds']:.1f} s (training {m['train_seconds']:.1f} s; trained loss {m['trained_loss']:.4f} "
                  f"vs GD {m['gd_loss']:.4f})"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def main(args: argparse.Namespace) -> int:
    result = run_all(quick=args.quick)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
