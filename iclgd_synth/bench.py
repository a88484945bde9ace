"""Speed benchmarks on the current JAX backend (``iclgd bench``): figures and ratios, printed and saved as JSON.

- training throughput for the ``vonoswald`` preset (tasks/s) in the form ``train`` uses on this backend (per-step
  calls of one jitted update on CPU, scan-jitted chunks on accelerators), with both forms and their ratio;
- the time of GD step-size tuning on 10^4 tasks (exact polynomial method, and the grid method for comparison);
- the LSA forward pass in the dual form vs the quadratic form at N = 10, 100, 1000, 10000 (ratio);
- the main job (``iclgd run vonoswald``) end to end, each run in a fresh process: on an empty compilation cache (the
  first run after install), on the cache it filled (every later run), and without its real-LLM weight comparison;
- with ``--sweep``: sweep throughput (tasks/s, 8 runs of the ``vonoswald`` preset as one program sharded over the
  devices, :func:`iclgd_synth.sweep.bench_sweep`) on 1, 2, 4 and 8 host CPU devices, each in a fresh process with
  ``--xla_force_host_platform_device_count``, and on this process's accelerators when there are any.

Timings take the best of a few repeats after a warm-up call, so compilation is excluded except for the main job.
``--quick`` runs every part at tiny sizes (a smoke test: the figures are not meaningful); its main job is
``iclgd run vonoswald --quick`` with the LLM comparison limited to the first layer of each LLM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def bench_training(steps: int = 200, batch_size: int = 2048, repeats: int = 3) -> dict[str, Any]:
    """Tasks/s of the ``vonoswald`` preset's training step in each form: scan-jitted chunks, a Python loop over one
    jitted step, and (with several host devices) that loop drawing each step's tasks on every device; and the form
    :func:`~iclgd_synth.train.train` uses here."""
    from iclgd_synth.train import (TrainConfig, _jitted_step, init_state, make_chunk, make_optimizer,
                                   sharded_step_loop, step_loop, task_parts, training_devices, uses_step_loop)

    config = TrainConfig(batch_size=batch_size, n_steps=steps, chunk_steps=steps)
    optimizer = make_optimizer(config)
    params, opt_state, keys = init_state(config)
    forms = {"scan": make_chunk(config, optimizer, steps),
             "loop": step_loop(_jitted_step(config.compute_key()), steps)}
    devices = training_devices()
    n_parts = len(task_parts(batch_size, len(devices)))
    if n_parts > 1:
        forms["sharded"] = sharded_step_loop(config.compute_key(), steps, devices)
    rates = {name: steps * batch_size / _best_time(lambda f=f: f(params, opt_state, keys, 0)[2], repeats)
             for name, f in forms.items()}
    used = "scan" if not uses_step_loop() else "sharded" if n_parts > 1 else "loop"
    form = {"scan": "scan", "loop": "per-step calls",
            "sharded": f"per-step calls, tasks drawn on {n_parts} host devices"}[used]
    return {"steps": steps, "batch_size": batch_size, "scan_tasks_per_s": rates["scan"],
            "loop_tasks_per_s": rates["loop"], "sharded_tasks_per_s": rates.get("sharded"),
            "host_devices": len(devices), "scan_over_loop": rates["scan"] / rates["loop"],
            "train_form": form, "train_tasks_per_s": rates[used]}


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


def bench_forward(ns: tuple[int, ...] = (10, 100, 1000, 10000), dim: int = 10, tokens_per_call: int = 2 ** 17,
                  repeats: int = 3) -> list[dict[str, float]]:
    """Forward pass of a 1-layer LSA (all tokens updated) in dual vs quadratic form."""
    from iclgd_synth.constructions import gd_params
    from iclgd_synth.model import forward

    params = gd_params(dim, 1.0)
    rows = []
    for n in ns:
        b = max(1, tokens_per_call // (n + 1))
        # NumPy draws the tokens: jax.random.normal would compile a sampler per shape (seconds on a small CPU).
        tokens = jnp.asarray(np.random.default_rng(n).standard_normal((b, n + 1, dim + 1)), jnp.float32)
        dual = jax.jit(lambda t: forward(params, t, n, form="dual"))
        quad = jax.jit(lambda t: forward(params, t, n, form="quadratic"))
        t_dual = _best_time(lambda: dual(tokens), repeats)
        t_quad = _best_time(lambda: quad(tokens), repeats)
        rows.append({"N": n, "batch": b, "dual_s": t_dual, "quadratic_s": t_quad,
                     "quadratic_over_dual": t_quad / t_dual})
    return rows


def _time_main_job(extra: list[str], cache: str) -> dict[str, Any]:
    """``iclgd run vonoswald EXTRA`` in a fresh process and a fresh run root, with the compilation cache in ``cache``:
    wall seconds and its metrics."""
    with tempfile.TemporaryDirectory() as root:
        cmd = [sys.executable, "-m", "iclgd_synth.cli", "run", "vonoswald", "--root", root, "--no-progress", *extra]
        env = {**os.environ, "ICLGD_JAX_CACHE": cache}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        seconds = time.perf_counter() - t0
        run = next(Path(root).glob("vonoswald-*"))
        metrics = json.loads((run / "metrics.json").read_text())
    return {"seconds": seconds, "metrics": metrics}


def bench_main_job(quick: bool = False) -> dict[str, Any]:
    """The main job end to end, each run in a fresh process: with its real-LLM weight comparison on an empty
    compilation cache (the first run after install), then again on the cache that run filled (every later run), and
    without the LLM comparison (``--no-llm-weights``, warm cache).

    The LLM statistics are cached by the first run (as by any earlier one). ``llm_section_seconds`` is the LLM
    section's own time inside the warm run (None when it was skipped, e.g. the ``llm`` extra is missing). Under
    ``quick`` the runs are ``--quick`` and the LLM section reads one layer per LLM.
    """
    base = ["--quick"] if quick else []
    llm = ["--llm-max-layers", "1"] if quick else []
    with tempfile.TemporaryDirectory() as cache:
        cold = _time_main_job(base + llm, cache)
        warm = _time_main_job(base + llm, cache)
        without_llm = _time_main_job(base + ["--no-llm-weights"], cache)
    m = warm["metrics"]
    section = m.get("llm_weights") or {}
    return {"quick": quick, "seconds": warm["seconds"], "seconds_cold_cache": cold["seconds"],
            "seconds_no_llm": without_llm["seconds"], "llm_section_seconds": section.get("seconds"),
            "llm_skipped": section.get("skipped"), "train_seconds": m["train_seconds"],
            "tasks_per_second": m["tasks_per_second"], "trained_loss": m["trained_loss"], "gd_loss": m["gd_loss"]}


#: Host device counts of the sweep benchmark.
SWEEP_DEVICE_COUNTS = (1, 2, 4, 8)


def bench_sweep_devices(counts: tuple[int, ...] = SWEEP_DEVICE_COUNTS, quick: bool = False) -> list[dict[str, Any]]:
    """Sweep throughput on ``counts`` host CPU devices (a fresh process each), then on this process's accelerators
    (GPU / TPU) when the backend is not the CPU."""
    import os
    import re

    sizes = dict(n_runs=8, steps=5, batch_size=64, repeats=1) if quick else dict(n_runs=8, steps=50, batch_size=2048)
    code = f"import json; from iclgd_synth.sweep import bench_sweep; print(json.dumps(bench_sweep(**{sizes!r})))"
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")).strip()
    rows = []
    for n in counts:
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}
        done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        rows.append({"platform": "cpu", **json.loads(done.stdout.strip().splitlines()[-1])})
    if jax.default_backend() != "cpu":
        from iclgd_synth.sweep import bench_sweep

        rows.append({"platform": jax.default_backend(), **bench_sweep(**sizes)})
    return rows


def run_all(quick: bool = False, main_job: bool = True, sweep: bool = False) -> dict[str, Any]:
    """Every benchmark (``quick``: tiny sizes); ``main_job=False`` leaves out the end-to-end runs, ``sweep=True`` adds
    the sweep throughput per device count."""
    dev = jax.devices()[0]
    result: dict[str, Any] = {"backend": jax.default_backend(), "device": str(dev.device_kind),
                              "n_devices": jax.device_count(), "quick": quick}
    result["training"] = bench_training(steps=20, batch_size=256) if quick else bench_training(200, 2048)
    result["tuning"] = bench_tuning(1000 if quick else 10000)
    result["forward"] = (bench_forward((10, 100), tokens_per_call=2 ** 11, repeats=1) if quick
                         else bench_forward((10, 100, 1000, 10000)))
    if main_job:
        result["main_job"] = bench_main_job(quick=quick)
    if sweep:
        result["sweep"] = bench_sweep_devices(quick=quick)
    return result


def format_report(r: dict[str, Any]) -> str:
    t, u = r["training"], r["tuning"]
    lines = [f"backend: {r['backend']} ({r['device']}, {r['n_devices']} device(s))"
             + (" -- quick: tiny sizes, not meaningful figures" if r.get("quick") else ""), "",
             f"training, vonoswald preset, batch {t['batch_size']}, {t['steps']} steps:",
             f"  as train runs it ({t['train_form']}): {t['train_tasks_per_s']:,.0f} tasks/s"
             f"  [target >= 1,000,000: {'met' if t['train_tasks_per_s'] >= 1e6 else 'NOT met'}]",
             f"  scan-jitted chunks  : {t['scan_tasks_per_s']:,.0f} tasks/s",
             f"  per-step calls      : {t['loop_tasks_per_s']:,.0f} tasks/s (one device)",
             *([f"  per-step calls, tasks drawn on {t['host_devices']} host devices: "
                f"{t['sharded_tasks_per_s']:,.0f} tasks/s"] if t.get("sharded_tasks_per_s") else []),
             f"  ratio scan / calls  : {t['scan_over_loop']:.2f}x", "",
             f"GD step-size tuning on {u['n_tasks']} tasks:",
             f"  exact, 1 step : {u['exact_1step_s']:.3f} s (eta {u['exact_1step_eta']:.4f})",
             f"  exact, 5 steps: {u['exact_5step_s']:.3f} s (eta {u['exact_5step_eta']:.4f})",
             f"  grid, 1 step  : {u['grid_1step_s']:.3f} s (eta {u['grid_1step_eta']:.4f})", "",
             "LSA forward, dual vs quadratic form:", "  N       batch   dual (ms)  quadratic (ms)  ratio"]
    for row in r["forward"]:
        lines.append(f"  {row['N']:<7d} {row['batch']:<7d} {1e3 * row['dual_s']:9.2f}  {1e3 * row['quadratic_s']:14.2f}"
                     f"  {row['quadratic_over_dual']:6.1f}x")
    m = r.get("main_job")
    if m is not None:
        q = " --quick" if m["quick"] else ""
        llm = (f"LLM section {m['llm_section_seconds']:.1f} s" if m["llm_section_seconds"] is not None
               else f"LLM section skipped: {m['llm_skipped']}")
        lines += ["", f"main job (iclgd run vonoswald{q}), fresh process each, LLM statistics cached:",
                  f"  first run, empty compilation cache : {m['seconds_cold_cache']:.1f} s",
                  f"  later runs (cache filled)          : {m['seconds']:.1f} s ({llm})"
                  + ("" if m["quick"] else f"  [target <= 20 s: {'met' if m['seconds'] <= 20 else 'NOT met'}]"),
                  f"  without the LLM section            : {m['seconds_no_llm']:.1f} s",
                  f"  training {m['train_seconds']:.1f} s ({m['tasks_per_second']:,.0f} tasks/s); trained loss "
                  f"{m['trained_loss']:.4f} vs GD {m['gd_loss']:.4f}"]
    rows = r.get("sweep")
    if rows:
        first = rows[0]
        lines += ["", f"sweep: {first['runs']} runs of the vonoswald preset as one program, batch {first['batch_size']}"
                  f", {first['steps']} steps, run axis sharded over the devices:",
                  "  platform  devices  tasks/s (all runs)"]
        lines += [f"  {row['platform']:<9s} {row['devices']:<8d} {row['tasks_per_s']:,.0f}" for row in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test; figures not meaningful)")
    parser.add_argument("--no-main-job", action="store_true", help="leave out the end-to-end main-job runs")
    parser.add_argument("--sweep", action="store_true",
                        help="add sweep throughput on 1, 2, 4 and 8 host devices (a fresh process each; slow)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def check_output_path(path: str | Path, option: str = "--json") -> Path:
    """Refuse, before the benchmark runs, an output file that could not be written (its folder missing or not
    writable, or the path a folder)."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"{option} {str(path)!r} is a folder; give a file name, e.g. "
                                f"{str(path / 'bench.json')!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {str(path)!r}: the folder {str(folder)!r} does not exist; create it first "
                                "or give a path in an existing folder")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{option} {str(path)!r}: the folder {str(folder)!r} is not writable; give another path")
    return path


def main(args: argparse.Namespace) -> int:
    out = check_output_path(args.json) if args.json else None
    result = run_all(quick=args.quick, main_job=not args.no_main_job, sweep=args.sweep)
    print(format_report(result))
    if out is not None:
        from iclgd_synth.storage import write_text_atomic

        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    return 0
