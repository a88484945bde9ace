"""Sweeps: a base config x a grid of overrides x seeds, trained as few compiled programs sharded over every device.

    iclgd sweep vonoswald --quick --grid train.lr=1e-3,5e-4 --grid train.model.n_layers=1,2 --seeds 0 1 2 --out DIR

Python::

    plan = expand("vonoswald", [("train.lr", [1e-3, 5e-4])], seeds=(0, 1, 2), quick=True)
    out = run_sweep(plan, "sweeps/lr")          # or sweep("vonoswald", ..., out=...) in one call

Plan. :func:`expand` builds every run before anything is trained: each grid point (one value per grid entry) and
each seed is a run, its config the base (a study's config, or any config holding a ``train`` TrainConfig, or a
TrainConfig itself) with the grid values set by dotted path through :func:`iclgd_synth.config.override`, so the
constructors' checks apply; a grid entry that does not parse, names an unknown path or builds an invalid config is
refused with an error naming the entry.

Groups. Runs whose training computes the same steps (:meth:`TrainConfig.compute_key` and ``n_steps`` equal; the
seed, the learning rate of a constant schedule and the weight decay aside) are one group and train as ONE compiled
program: their states are stacked on a leading run axis R, and that axis is sharded over every device
(``jax.sharding``: a 1-D mesh named "runs" over ``jax.devices()``), padded to a multiple of the device count with
copies of the first run (padding rows are dropped). Learning rate and weight decay are per-run optimiser state
(``optax.inject_hyperparams``), so a learning-rate grid is one program. Runs that differ in shapes or other static
settings are separate groups, trained one after the other.

Same numbers everywhere. A run's initial parameters and data key come from its seed alone (:func:`seed_keys`, as in
:func:`iclgd_synth.train.train`), step s samples from ``fold_in(data_key, s)``, and every operation acts on one run's
row: a run's numbers do not depend on its group, its row, the padding or the number of devices up to float32
rounding (XLA may vectorise a batch of 4 rows differently from 1: on this CPU 1 and 8 host devices differ by at most
1e-7 relative, and the tests hold them to 1e-6). Evaluation uses fixed held-out tasks (``PRNGKey(EVAL_SEED)``, the
study's ``eval_tasks`` or 10000).

Output folder:

- ``sweep.json``: the plan (base, overrides, grid, seeds, every run's id, point and seed), the device count;
- ``runs.jsonl``: one JSON line per finished run (run_id, overrides, point, seed, group, final_train_loss = mean of
  the last 50 steps, eval_loss, diverged_at, curve = mean training loss per chunk);
- ``runs.csv``, ``summary.md`` (one row per grid point: mean and 95% interval over seeds of each loss) and figures
  with bands (training curves per grid point; evaluation loss against each numeric grid entry);
- ``groups/<id>/checkpoint.msgpack`` while a group trains (removed when its runs are written).

An interrupted sweep resumes: runs already in runs.jsonl are skipped (also when more seeds or grid values are added
to the same folder), and a group interrupted mid-training restarts from its checkpoint. A run whose loss becomes
non-finite does not stop the sweep: it is recorded with ``diverged_at`` (the first bad step) and NaN losses.

Several hosts. Launched on a cluster, :func:`maybe_initialize_distributed` (called by ``iclgd sweep``; call it
yourself first from Python) runs ``jax.distributed.initialize()``; every process runs the same plan, the run axis
spans the devices of all hosts, and process 0 alone writes files (finished runs and checkpoints are read by process
0 and broadcast). It does nothing on one machine. Recipes::

    # SLURM: one process per node (or per GPU), JAX reads the SLURM variables
    srun --nodes=2 --ntasks-per-node=1 .venv/bin/iclgd sweep vonoswald --grid train.lr=1e-3,5e-4 --seeds 0 1 2 3 \\
        --out sweeps/lr
    # Open MPI
    mpirun -np 2 .venv/bin/iclgd sweep vonoswald ... --out sweeps/lr
    # by hand, on every host i = 0 .. n-1
    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i .venv/bin/iclgd sweep vonoswald ...

On one CPU machine, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` gives 8 host devices (for testing the
sharding; on a 2-core CPU it does not add speed).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from iclgd_synth import config as cfg
from iclgd_synth.storage import read_json, stable_hash, to_json, write_json, write_text_atomic

#: Key of the held-out evaluation tasks (the same tasks as the training studies' evaluation in gd_comparison).
EVAL_SEED = 2_000_003
#: Evaluation tasks when the base config has no ``eval_tasks`` field.
DEFAULT_EVAL_TASKS = 10000
#: Steps averaged for a run's final training loss.
FINAL_STEPS = 50
#: Environment variables of a manual multi-host launch.
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


# ---------------------------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a grid point and a seed.

    Attributes:
      index: position in the plan (grid points in order, seeds fastest).
      point: ((path, value), ...) the grid values of this run, as set in the config.
      seed: the run's seed.
      config: the full config (base, overrides, grid values, ``train.seeds = (seed,)``).
      train: its training config (``seeds == (seed,)``).
      run_id: a short hash of everything that determines the run's numbers (training config and evaluation).
    """

    index: int
    point: tuple[tuple[str, Any], ...]
    seed: int
    config: Any
    train: Any
    run_id: str

    @property
    def overrides(self) -> list[str]:
        return [f"{p}={_text(v)}" for p, v in self.point]

    @property
    def point_label(self) -> str:
        return ", ".join(self.overrides) or "base"


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """Every run of a sweep, built and checked by :func:`expand` before anything trains."""

    base: str
    quick: bool
    overrides: tuple[str, ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...]
    eval_tasks: int
    runs: tuple[SweepRun, ...]

    def points(self) -> list[tuple[tuple[str, Any], ...]]:
        """The grid points in order."""
        return list(dict.fromkeys(r.point for r in self.runs))

    def describe(self) -> dict[str, Any]:
        """The JSON form written to sweep.json."""
        return {"base": self.base, "quick": self.quick, "overrides": list(self.overrides),
                "grid": [[p, [_text(v) for v in vs]] for p, vs in self.grid], "seeds": list(self.seeds),
                "eval_tasks": self.eval_tasks, "eval_seed": EVAL_SEED,
                "runs": [{"run_id": r.run_id, "point": {p: _jsonable(v) for p, v in r.point},
                          "overrides": r.overrides, "seed": r.seed} for r in self.runs]}

    def spec_hash(self) -> str:
        d = self.describe()
        return stable_hash({k: d[k] for k in ("base", "quick", "overrides", "grid", "seeds", "eval_tasks")})


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(_text(v) for v in value) + ")"
    return str(value)


def _jsonable(value: Any) -> Any:
    return cfg.to_dict(value)


def parse_grid_entry(text: str) -> tuple[str, list[str]]:
    """``"PATH=V1,V2"`` -> (PATH, ["V1", "V2"]); commas inside brackets stay (``train.seeds=(0,1),(2,3)``)."""
    path, eq, values = str(text).partition("=")
    if not eq or not path.strip():
        raise ValueError(f"a grid entry must read PATH=V1,V2,... (e.g. train.lr=1e-3,5e-4), got {text!r}")
    parts, depth, current = [], 0, ""
    for ch in values:
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    parts = [p.strip() for p in parts]
    if not any(parts):
        raise ValueError(f"grid entry {text!r} has no values; give PATH=V1,V2,...")
    if any(not p for p in parts):
        raise ValueError(f"grid entry {text!r} has an empty value (two commas in a row or a trailing comma)")
    return path.strip(), parts


def _normalise_grid(grid: Any) -> list[tuple[str, tuple[Any, ...]]]:
    if grid is None:
        return []
    items = grid.items() if isinstance(grid, Mapping) else grid
    out: list[tuple[str, tuple[Any, ...]]] = []
    for entry in items:
        if isinstance(entry, str):
            path, values = parse_grid_entry(entry)
        else:
            try:
                path, values = entry
            except (TypeError, ValueError):
                raise TypeError(f"a grid entry must be 'PATH=V1,V2' or (path, [values]), got {entry!r}") from None
            if isinstance(values, str):
                values = parse_grid_entry(f"{path}={values}")[1]
            elif not isinstance(values, Iterable):
                raise TypeError(f"grid entry {path!r}: values must be a list such as [1e-3, 5e-4], got {values!r}")
        values = tuple(values)
        if not values:
            raise ValueError(f"grid entry {path!r} has no values")
        if len(set(map(_text, values))) != len(values):
            raise ValueError(f"grid entry {path!r} repeats a value: {[_text(v) for v in values]}")
        if any(p == path for p, _ in out):
            raise ValueError(f"grid entry {path!r} is given twice; list all its values in one entry")
        out.append((str(path), values))
    return out


def _base_config(base: Any, quick: bool, overrides: Sequence[str]) -> tuple[str, Any]:
    from iclgd_synth.train import TrainConfig

    if isinstance(base, str):
        from iclgd_synth.studies.registry import get_study

        study = get_study(base)
        return base, study.make_config(quick=quick, overrides=overrides)
    if quick:
        raise ValueError("quick=True applies to a study name as base; a config object is used as given")
    if isinstance(base, TrainConfig) or isinstance(getattr(base, "train", None), TrainConfig):
        return type(base).__name__, cfg.override(base, list(overrides))
    raise TypeError(f"base must be a study name, a TrainConfig or a config with a .train TrainConfig, got "
                    f"{type(base).__name__}")


def _train_of(config: Any):
    return config if not hasattr(config, "train") else config.train


def _seeds_path(config: Any) -> str:
    return "seeds" if not hasattr(config, "train") else "train.seeds"


def _entry_error(what: str, error: Exception) -> ValueError:
    message = re.sub(r"^--set [^:]*: ", "", str(error))
    return ValueError(f"{what} cannot be built: {message}")


def expand(base: Any, grid: Any = (), seeds: Sequence[int] = (0,), *, quick: bool = False,
           overrides: Sequence[str] = (), eval_tasks: int | None = None) -> SweepPlan:
    """Every run of base x grid x seeds, built and checked now (see the module docstring).

    ``base``: a study name (its config, the quick version with ``quick``), a TrainConfig, or a config with a
    ``train`` TrainConfig; ``overrides``: ``PATH=VALUE`` strings applied to the base first; ``grid``: entries
    ``(path, [values])``, ``"PATH=V1,V2"`` strings or a {path: [values]} mapping (string values are parsed by the
    field's type, others used as given); ``seeds``: different integers >= 0; ``eval_tasks``: held-out tasks per run
    (default: the base's ``eval_tasks`` field, else 10000). A bad entry raises ValueError naming it.
    """
    from iclgd_synth.train import TrainConfig
    from iclgd_synth.validation import check_int

    name, base_cfg = _base_config(base, quick, list(overrides))
    entries = _normalise_grid(grid)
    if isinstance(seeds, int) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds must be a list of different integers >= 0 such as [0, 1, 2], got {seeds!r}")
    seeds = tuple(check_int("seeds[i]", s, min_value=0) for s in seeds)
    if not seeds:
        raise ValueError("seeds must be a non-empty list of different integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be different integers, got {list(seeds)}")
    for path, values in entries:  # each entry alone first, so the error names the entry that is wrong
        if path in (_seeds_path(base_cfg), "train.seeds", "seeds"):
            raise ValueError(f"grid entry {path!r}: give seeds with seeds=... (--seeds), not as a grid entry")
        for v in values:
            try:
                cfg.override(base_cfg, {path: v})
            except (TypeError, ValueError) as e:
                raise _entry_error(f"grid entry {path}={_text(v)}", e) from None
    if eval_tasks is None:
        eval_tasks = int(getattr(base_cfg, "eval_tasks", DEFAULT_EVAL_TASKS))
    eval_tasks = check_int("eval_tasks", eval_tasks, min_value=1)
    runs, seen = [], {}
    for combo in itertools.product(*[[(p, v) for v in vs] for p, vs in entries]):
        try:
            point_cfg = cfg.override(base_cfg, dict(combo))
        except (TypeError, ValueError) as e:
            label = ", ".join(f"{p}={_text(v)}" for p, v in combo)
            raise _entry_error(f"grid point {label}", e) from None
        point = tuple((p, _value_at(point_cfg, p)) for p, _ in combo)
        for seed in seeds:
            run_cfg = cfg.override(point_cfg, {_seeds_path(point_cfg): (seed,)})
            train_cfg = _train_of(run_cfg)
            if not isinstance(train_cfg, TrainConfig):
                raise TypeError(f"the base's training config must be a TrainConfig, got {type(train_cfg).__name__}")
            run_id = stable_hash({"train": cfg.hash_dict(train_cfg), "eval_tasks": eval_tasks,
                                  "eval_seed": EVAL_SEED})
            if run_id in seen:
                raise ValueError(f"grid points {seen[run_id]} and {', '.join(f'{p}={_text(v)}' for p, v in point)} "
                                 "train the same run (a grid entry that does not change training or evaluation); "
                                 "remove it from the grid")
            seen[run_id] = ", ".join(f"{p}={_text(v)}" for p, v in point) or "base"
            runs.append(SweepRun(index=len(runs), point=point, seed=seed, config=run_cfg, train=train_cfg,
                                 run_id=run_id))
    return SweepPlan(base=name, quick=bool(quick), overrides=tuple(overrides), grid=tuple(entries), seeds=seeds,
                     eval_tasks=eval_tasks, runs=tuple(runs))


def _value_at(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


# -------------------------------------------------------------------------------------------------------------- groups


def group_key(train_cfg) -> tuple[Any, int]:
    """What a run shares with the runs of its compiled program: the compute key with the per-run optimiser settings
    (the learning rate of a constant schedule, the weight decay) set to fixed values, and ``n_steps``."""
    key = train_cfg.compute_key().replace(weight_decay=0.0)
    if key.schedule == "constant":
        key = key.replace(lr=1.0)
    return key, train_cfg.n_steps


def group_runs(runs: Iterable[SweepRun], max_runs: int | None = None) -> list[list[SweepRun]]:
    """Runs partitioned into groups (one compiled program each), in plan order; ``max_runs`` splits larger groups
    into consecutive parts of at most that many runs (a run's numbers do not depend on its group)."""
    groups: dict[Any, list[SweepRun]] = {}
    for r in runs:
        groups.setdefault(group_key(r.train), []).append(r)
    if max_runs is None:
        return list(groups.values())
    return [g[i:i + max_runs] for g in groups.values() for i in range(0, len(g), max_runs)]


def group_id(runs: Sequence[SweepRun]) -> str:
    key, n_steps = group_key(runs[0].train)
    return stable_hash({"key": cfg.hash_dict(key), "n_steps": n_steps})


def group_optimizer(key, lr: Any, weight_decay: Any):
    """AdamW behind the key's gradient clipping, as :func:`iclgd_synth.train.make_optimizer` builds it, with the
    learning rate (constant schedules) and the weight decay as optimiser state, so that every run of a group can
    have its own."""
    import optax

    from iclgd_synth.train import learning_rate_schedule

    static = ("b1", "b2", "eps", "eps_root")
    if key.schedule != "constant":
        static += ("learning_rate",)
        lr = learning_rate_schedule(key)
    adam = optax.inject_hyperparams(optax.adamw, static_args=static)(learning_rate=lr, b1=key.b1, b2=key.b2,
                                                                      weight_decay=weight_decay)
    return adam if key.clip_norm is None else optax.chain(optax.clip_by_global_norm(key.clip_norm), adam)


def run_mesh(devices: Sequence[Any] | None = None):
    """A 1-D mesh named "runs" over ``devices`` (default: every device of every process)."""
    import jax
    from jax.sharding import Mesh

    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), ("runs",))


def _row_sharding(mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P("runs"))


def _replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P())


@functools.lru_cache(maxsize=32)
def _sharded_chunk(key, n: int, mesh):
    """``n`` training steps of every row as one program, rows sharded over ``mesh``:
    (params_R, opt_R, data_keys_R, start) -> (params_R, opt_R, losses_Rxn)."""
    import jax

    from iclgd_synth.train import make_chunk

    rows = _row_sharding(mesh)
    shardings = dict(in_shardings=(rows, rows, rows, _replicated(mesh)), out_shardings=(rows, rows, rows))
    optimizer = group_optimizer(key, 1.0, 0.0)  # lr / weight decay are read from the state
    # One scan per chunk on every backend. Per-step calls (train's CPU form) were slower for sharded groups on the
    # 2-core CPU with 2 host devices: vonoswald, 8 runs x 2048 tasks: 1.81M against 1.99M tasks/s; 2 runs x 128
    # tasks: 0.63M against 1.67M; the transience preset's GPT, 2 runs: 54 against 34 ms per step.
    return jax.jit(make_chunk(key, optimizer, n), **shardings)


@functools.lru_cache(maxsize=32)
def _sharded_eval(key, mesh):
    """The training objective of every row on one replicated batch: (params_R, batch) -> losses_R."""
    import jax

    from iclgd_synth.train import objective_loss

    return jax.jit(jax.vmap(objective_loss(key), in_axes=(0, None)), in_shardings=(_row_sharding(mesh),
                   _replicated(mesh)), out_shardings=_row_sharding(mesh))


def init_rows(key, seeds: Sequence[int], lrs: Sequence[float], weight_decays: Sequence[float]):
    """Host (NumPy) initial parameters, optimiser state and data keys of runs with these seeds, learning rates and
    weight decays, stacked on a leading run axis: the same parameters and keys as :func:`iclgd_synth.train.train`
    draws for each seed (:func:`iclgd_synth.train.seed_keys`)."""
    import jax

    seeds_R = np.asarray([int(s) for s in seeds], np.uint32)
    lr_R = np.asarray(lrs, np.float32)
    wd_R = np.asarray(weight_decays, np.float32)
    return jax.device_get(_init_fn(key)(seeds_R, lr_R, wd_R))


@functools.lru_cache(maxsize=32)
def _init_fn(key):
    """One compiled program for a group's initial state (op by op, vmapped init dispatches dozens of programs)."""
    import jax

    from iclgd_synth.train import init_model, seed_keys

    def init_one(seed, lr, wd):
        k_init, k_data = seed_keys(seed)
        params = init_model(k_init, key.model)
        return params, group_optimizer(key, lr, wd).init(params), k_data

    return jax.jit(jax.vmap(init_one))


def _pad_rows(tree, rows: int):
    """Append copies of row 0 up to ``rows`` rows."""
    import jax

    def pad(a):
        a = np.asarray(a)
        extra = rows - a.shape[0]
        return a if extra == 0 else np.concatenate([a, np.repeat(a[:1], extra, axis=0)])

    return jax.tree.map(pad, tree)


def _to_global(tree, sharding):
    """Host arrays (identical on every process) -> global arrays laid out by ``sharding``."""
    import jax

    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx: a[idx]), tree)


def _to_host(tree):
    """Global arrays -> NumPy on every process (gathered from the other hosts when needed)."""
    import jax

    def get(a):
        if getattr(a, "is_fully_addressable", True):
            return np.asarray(a)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(get, tree)


def _from_process_0(tree):
    """Process 0's values of ``tree`` on every process (identity on one process)."""
    import jax

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.device_get(multihost_utils.broadcast_one_to_all(tree))


def is_writer() -> bool:
    """True on the process that writes files (process 0)."""
    import jax

    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class GroupResult:
    """What a group's training gives: per-run losses (R, n_steps), evaluation losses (R,), the training seconds (all
    chunks), the steps and seconds of the chunks that did not compile a program (throughput without compilation),
    the rows trained (padding included) and the step at the end of every chunk."""

    losses: np.ndarray
    eval_losses: np.ndarray
    seconds: float
    steady_steps: int
    steady_seconds: float
    padded_rows: int
    chunk_ends: list[int]


def _checkpoint_meta(runs: Sequence[SweepRun]) -> str:
    return stable_hash({"group": group_id(runs), "runs": [r.run_id for r in runs]})


def train_group(runs: Sequence[SweepRun], *, mesh=None, eval_tasks: int = DEFAULT_EVAL_TASKS,
                checkpoint: Path | None = None, stop_after: int | None = None, on_chunk=None,
                on_params=None) -> GroupResult | None:
    """Train the runs of one group (:func:`group_runs`) as one program sharded over ``mesh`` and evaluate them.

    ``checkpoint``: a file for the group's state (written by process 0 every ``checkpoint_every`` steps of the first
    run's config and on Ctrl-C; restored if present and written for the same runs). ``stop_after``: return None
    after that many steps (rounded up to a chunk; a checkpoint is written), as an interruption would.
    ``on_chunk(step)`` is called after every chunk, then ``on_params(step, params_R)`` with the parameters of every
    row (the run axis R first, padding rows after the group's runs), e.g. to evaluate over training.
    """
    import jax

    from iclgd_synth.storage import CheckpointError, load_checkpoint, save_checkpoint
    from iclgd_synth.tasks import sample
    from iclgd_synth.train import check_train_memory

    mesh = run_mesh() if mesh is None else mesh
    first = runs[0].train
    key, n_steps = group_key(first)
    n_dev = mesh.devices.size
    padded = int(math.ceil(len(runs) / n_dev) * n_dev)
    try:
        check_train_memory(first.replace(seeds=tuple(range(padded))))
    except MemoryError as e:
        raise MemoryError(f"{e}; or train fewer runs per program: --max-runs-per-program N (run_sweep("
                          f"max_runs_per_program=N); this group has {len(runs)} runs, {padded} rows with padding)"
                          ) from None
    state = init_rows(key, [r.seed for r in runs], [r.train.lr for r in runs], [r.train.weight_decay for r in runs])
    losses = np.full((len(runs), n_steps), np.nan, np.float32)
    start, seconds, chunk_ends = 0, 0.0, []
    meta_id = _checkpoint_meta(runs)
    if checkpoint is not None and is_writer() and checkpoint.exists():
        (params, opt_state, data_keys, saved_losses), meta = load_checkpoint(checkpoint, (*state, losses))
        if meta.get("group") != meta_id:
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} belongs to other runs; delete it to retrain the "
                                  "group")
        state, losses = (params, opt_state, data_keys), np.asarray(saved_losses)
        start, seconds, chunk_ends = int(meta["step"]), float(meta["seconds"]), list(meta["chunk_ends"])
    state, losses, start = _from_process_0((state, losses, np.int64(start)))
    losses, start = np.array(losses, np.float32), int(start)  # a writable copy
    rows = _row_sharding(mesh)
    params, opt_state, data_keys = _to_global(_pad_rows(state, padded), rows)
    last_ckpt = start
    compiled: set[int] = set()  # chunk lengths run in this call: later chunks of that length do not compile
    steady_steps, steady_seconds = 0, 0.0

    def save():
        if checkpoint is None:
            return
        host = _to_host((params, opt_state))  # on several hosts a collective: every process takes part
        if is_writer():
            real = jax.tree.map(lambda a: a[:len(runs)], host)
            save_checkpoint(checkpoint, (*real, state[2], losses),
                            {"group": meta_id, "step": start, "seconds": seconds, "chunk_ends": chunk_ends})

    try:
        while start < n_steps and (stop_after is None or start < stop_after):
            n = min(first.chunk_steps, n_steps - start)
            t0 = time.perf_counter()
            params, opt_state, chunk_losses = _sharded_chunk(key, n, mesh)(params, opt_state, data_keys, start)
            chunk_losses = _to_host(chunk_losses)[:len(runs)]
            dt = time.perf_counter() - t0
            seconds += dt
            if n in compiled:
                steady_steps, steady_seconds = steady_steps + n, steady_seconds + dt
            compiled.add(n)
            losses[:, start:start + n] = chunk_losses
            start += n
            chunk_ends.append(start)
            if on_chunk is not None:
                on_chunk(start)
            if on_params is not None:
                on_params(start, params)
            if start - last_ckpt >= first.checkpoint_every and start < n_steps:
                save()
                last_ckpt = start
    except KeyboardInterrupt:
        if start > last_ckpt:
            save()
        raise
    if start < n_steps:
        if start > last_ckpt:
            save()
        return None
    batch = jax.device_get(sample(jax.random.PRNGKey(EVAL_SEED), key.task, eval_tasks))
    eval_losses = _to_host(_sharded_eval(key, mesh)(params, batch))[:len(runs)]
    return GroupResult(losses=losses, eval_losses=np.asarray(eval_losses, np.float64), seconds=seconds,
                       steady_steps=steady_steps, steady_seconds=steady_seconds, padded_rows=padded,
                       chunk_ends=chunk_ends)


def run_rows(runs: Sequence[SweepRun], result: GroupResult) -> list[dict[str, Any]]:
    """The runs.jsonl rows of a trained group."""
    gid = group_id(runs)
    tasks_per_s = (result.steady_steps * runs[0].train.batch_size * len(runs) / result.steady_seconds
                   if result.steady_seconds > 0 else float("nan"))
    ends = result.chunk_ends
    rows = []
    for i, r in enumerate(runs):
        curve = result.losses[i].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(curve))
        diverged_at = int(bad[0]) if bad.size else None
        chunk_means = [float(curve[a:b].mean()) for a, b in zip([0] + ends[:-1], ends)]
        final = float(curve[-FINAL_STEPS:].mean())
        rows.append({"run_id": r.run_id, "index": r.index, "overrides": r.overrides,
                     "point": {p: _jsonable(v) for p, v in r.point}, "seed": r.seed, "group": gid,
                     "n_steps": r.train.n_steps, "batch_size": r.train.batch_size,
                     "final_train_loss": final if diverged_at is None else float("nan"),
                     "eval_loss": float(result.eval_losses[i]) if diverged_at is None else float("nan"),
                     "diverged_at": diverged_at, "group_runs": len(runs), "group_seconds": result.seconds,
                     "group_tasks_per_s": tasks_per_s, "group_steady_seconds": result.steady_seconds,
                     "group_steady_tasks": result.steady_steps * runs[0].train.batch_size * len(runs), "curve": {"step": list(ends), "loss": chunk_means}})
    return rows


# ------------------------------------------------------------------------------------------------------------ driver


def read_runs(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The finished runs in ``out/runs.jsonl`` by run_id (a line cut by an interruption is ignored)."""
    path = Path(out) / "runs.jsonl"
    rows: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "run_id" in row:
            rows[row["run_id"]] = row
    return rows


def _append_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    path = out / "runs.jsonl"
    if path.exists():
        text = path.read_text()
        if text and not text.endswith("\n"):  # a line cut by an interruption: keep the whole lines only
            write_text_atomic(path, "".join(line + "\n" for line in text.splitlines()[:-1]))
    with open(path, "a") as f:
        for row in rows:
            f.write(to_json(row, indent=None) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _prepare_out(out: Path) -> None:
    from iclgd_synth.storage import writable_folder

    writable_folder(out, "--out", "the sweep")


def default_out(plan: SweepPlan, root: str | os.PathLike = "sweeps") -> Path:
    return Path(root) / f"{plan.base}-{plan.spec_hash()}"


def run_sweep(plan: SweepPlan, out: str | os.PathLike | None = None, *, progress: bool = True, force: bool = False,
              stop_after: int | None = None, mesh=None, figures: bool = True,
              max_runs_per_program: int | None = None) -> Path:
    """Train every run of ``plan`` not yet in ``out/runs.jsonl`` and write the sweep folder (module docstring).

    ``force`` discards finished runs and checkpoints first; ``stop_after`` stops the group in progress after that
    many steps (a checkpoint is written) and returns, as an interruption would; ``mesh``: a 1-D mesh named "runs"
    (default: every device); ``figures=False`` writes the tables only (``render(out)`` draws the figures later);
    ``max_runs_per_program`` bounds the runs trained as one program (memory; default: a whole group). Returns the
    folder.
    """
    import jax

    from iclgd_synth.validation import check_int

    if max_runs_per_program is not None:
        check_int("max_runs_per_program", max_runs_per_program, min_value=1)
    out = default_out(plan) if out is None else Path(out)
    writer = is_writer()
    if writer:
        _prepare_out(out)
        if force:
            for name in ("runs.jsonl", "groups"):
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    mesh = run_mesh() if mesh is None else mesh
    done_ids = set(read_runs(out)) if writer else set()
    done_mask = _from_process_0(np.array([r.run_id in done_ids for r in plan.runs], np.int32)).astype(bool)
    pending = [r for r, done in zip(plan.runs, done_mask) if not done]
    if writer:
        write_json(out / "sweep.json", {**plan.describe(), "devices": int(mesh.devices.size),
                                        "processes": jax.process_count(), "backend": jax.default_backend()})
    bar = _progress_bar(len(plan.runs), len(plan.runs) - len(pending), progress and writer)
    groups = group_runs(pending, max_runs_per_program)
    try:
        for gi, runs in enumerate(groups):
            gid = group_id(runs)
            ckpt = out / "groups" / f"{gid}-{_checkpoint_meta(runs)}" / "checkpoint.msgpack"
            label = f"group {gi + 1}/{len(groups)} ({len(runs)} runs)"
            if bar is not None:
                bar.set_postfix_str(f"{label}: compiling...")

            def on_chunk(step, _label=label, _n=runs[0].train.n_steps):
                if bar is not None:
                    bar.set_postfix_str(f"{_label}: step {step}/{_n}")

            result = train_group(runs, mesh=mesh, eval_tasks=plan.eval_tasks, checkpoint=ckpt,
                                 stop_after=stop_after, on_chunk=on_chunk)
            if result is None:
                return out
            if writer:
                _append_rows(out, run_rows(runs, result))
                shutil.rmtree(ckpt.parent, ignore_errors=True)
                _remove_if_empty(out / "groups")
            if bar is not None:
                bar.update(len(runs))
    finally:
        if bar is not None:
            bar.close()
    if writer:
        render(out, figures=figures)
    return out


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # absent or not empty
        pass


def sweep(base: Any, grid: Any = (), seeds: Sequence[int] = (0,), *, out: str | os.PathLike | None = None,
          quick: bool = False, overrides: Sequence[str] = (), eval_tasks: int | None = None, progress: bool = True,
          force: bool = False) -> Path:
    """:func:`expand` then :func:`run_sweep`; returns the sweep folder."""
    plan = expand(base, grid, seeds, quick=quick, overrides=overrides, eval_tasks=eval_tasks)
    return run_sweep(plan, out, progress=progress, force=force)


def _progress_bar(total: int, done: int, enabled: bool):
    if not enabled or done >= total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="sweep", unit="run", dynamic_ncols=True, miniters=1)


# --------------------------------------------------------------------------------------------------------- summaries


def summarize(out: str | os.PathLike) -> dict[str, Any]:
    """Per grid point of the plan in ``out/sweep.json``: its finished runs and the mean with 95% interval over seeds
    of the final training loss and the evaluation loss (:func:`iclgd_synth.intervals.mean_ci`)."""
    from iclgd_synth.intervals import mean_ci

    out = Path(out)
    plan = read_json(out / "sweep.json")
    rows = read_runs(out)
    points: dict[str, dict[str, Any]] = {}
    for run in plan["runs"]:
        label = ", ".join(run["overrides"]) or "base"
        p = points.setdefault(label, {"point": run["point"], "overrides": run["overrides"], "runs": []})
        if run["run_id"] in rows:
            p["runs"].append(rows[run["run_id"]])
    for p in points.values():
        for metric in ("final_train_loss", "eval_loss"):
            p[metric] = mean_ci([r[metric] for r in p["runs"]]) if p["runs"] else None
        p["seeds"] = [r["seed"] for r in p["runs"]]
        p["diverged"] = sum(r["diverged_at"] is not None for r in p["runs"])
    return {"plan": plan, "points": points, "finished": sum(len(p["runs"]) for p in points.values()),
            "total": len(plan["runs"])}


def render(out: str | os.PathLike, *, figures: bool = True) -> Path:
    """Write runs.csv, summary.md and (with ``figures``) the figures of ``out`` from sweep.json and runs.jsonl
    (nothing recomputed); returns summary.md."""
    from iclgd_synth.intervals import format_ci

    out = Path(out)
    s = summarize(out)
    plan, points = s["plan"], s["points"]
    paths = [p for p, _ in plan["grid"]]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["run_id", *paths, "seed", "group", "n_steps", "final_train_loss", "eval_loss", "diverged_at"])
    for p in points.values():
        for r in p["runs"]:
            writer.writerow([r["run_id"], *[_text(r["point"].get(k)) for k in paths], r["seed"], r["group"],
                             r["n_steps"], r["final_train_loss"], r["eval_loss"],
                             "" if r["diverged_at"] is None else r["diverged_at"]])
    write_text_atomic(out / "runs.csv", buf.getvalue())

    names = _figures(out, plan, points) if figures else []

    cols = [*paths, "seeds", "final training loss", "evaluation loss"]
    lines = [f"# Sweep: {plan['base']}{' (quick)' if plan['quick'] else ''}", "",
             f"{s['finished']} of {s['total']} runs finished; seeds {plan['seeds']}; evaluation on "
             f"{plan['eval_tasks']} held-out tasks (key {plan['eval_seed']}); {plan.get('devices', '?')} device(s)"
             f" ({plan.get('backend', '?')}).", ""]
    if plan["overrides"]:
        lines += ["Base overrides: " + ", ".join(f"`{o}`" for o in plan["overrides"]), ""]
    lines += ["Mean and 95% interval over seeds (Student t); final training loss = mean of the last "
              f"{FINAL_STEPS} steps.", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for p in points.values():
        cells = [_text(p["point"].get(k)) for k in paths]
        n = len(p["runs"])
        seeds = f"{n}" + (f" ({p['diverged']} diverged)" if p["diverged"] else "")
        cells += [seeds] + [format_ci(p[m]) if p[m] else "not run" for m in ("final_train_loss", "eval_loss")]
        lines.append("| " + " | ".join(cells) + " |")
    groups = {r["group"]: r for p in points.values() for r in p["runs"]}
    if groups:
        seconds = sum(r["group_seconds"] for r in groups.values())
        steady_s = sum(r.get("group_steady_seconds", 0.0) for r in groups.values())
        rate = (f"{sum(r.get('group_steady_tasks', 0) for r in groups.values()) / steady_s:,.0f} tasks/s after "
                "each program's first chunk" if steady_s > 0 else "throughput not measured (one chunk per group)")
        lines += ["", f"{len(groups)} compiled program(s) (groups), {seconds:.1f} s of training in all (compilation "
                  f"included); {rate}."]
    lines += [""] + [f"![{f}]({f})" for f in names]
    return write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")


def _figures(out: Path, plan: dict[str, Any], points: dict[str, dict[str, Any]]) -> list[str]:
    """The training curves per grid point and the evaluation loss against each numeric grid entry."""
    from iclgd_synth.plotting import curves_with_bands

    names, curves = [], {}
    for label, p in points.items():
        runs = [r for r in p["runs"] if r["curve"]["step"]]
        if runs and all(r["curve"]["step"] == runs[0]["curve"]["step"] for r in runs):
            curves[label] = (np.asarray(runs[0]["curve"]["step"]), np.asarray([r["curve"]["loss"] for r in runs]).T)
    if curves:
        names.append(curves_with_bands(out / "curves.png", curves, xlabel="training step",
                                       ylabel="training loss (mean per chunk)", title="training loss per grid "
                                       "point (band: min-max over seeds)", logy=True).name)
    for path, _ in plan["grid"]:
        name = _eval_figure(out, path, plan, points, curves_with_bands)
        if name is not None:
            names.append(name)
    return names


def _eval_figure(out: Path, path: str, plan, points, curves_with_bands) -> str | None:
    """Evaluation loss against the values of one numeric grid entry, one line per combination of the others."""
    values = dict(plan["grid"])[path]
    try:
        xs = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if len(xs) < 2:
        return None
    series: dict[str, list] = {}
    for p in points.values():
        others = ", ".join(f"{k}={_text(v)}" for k, v in p["point"].items() if k != path) or "eval loss"
        x = float(p["point"][path])
        series.setdefault(others, []).append((x, [r["eval_loss"] for r in p["runs"]]))
    data = {}
    for name, items in series.items():
        items.sort()
        n = min(len(v) for _, v in items)
        if n == 0:
            continue
        data[name] = (np.asarray([x for x, _ in items]), np.asarray([v[:n] for _, v in items]))
    if not data:
        return None
    fname = "eval_" + re.sub(r"[^A-Za-z0-9_]+", "_", path) + ".png"
    return curves_with_bands(out / fname, data, xlabel=path, ylabel="evaluation loss",
                             title=f"evaluation loss against {path} (band: min-max over seeds)").name


# ------------------------------------------------------------------------------------------------------ multi-host


def maybe_initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when launched as several processes on a cluster (a manual launch with
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; ``srun`` with several tasks; ``mpirun`` with
    several processes), never otherwise. Returns whether it initialised. Call it before any other JAX work."""
    import jax

    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in COORDINATOR_ENV[1:] if not env.get(k)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not: a manual multi-host "
                             "launch sets all three (JAX_NUM_PROCESSES = n, JAX_PROCESS_ID in 0..n-1)")
        n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES - 1] = [0, {n - 1}], got {i}")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
        return True
    slurm = "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    if slurm or mpi:
        jax.distributed.initialize()
        return True
    return False


# ------------------------------------------------------------------------------------------------------------ bench


def bench_sweep(n_runs: int = 8, steps: int = 50, batch_size: int = 2048, repeats: int = 2) -> dict[str, Any]:
    """Training throughput (tasks/s, all runs) of one group of ``n_runs`` seeds on the ``vonoswald`` preset,
    sharded over every device of this process (compilation excluded: best of ``repeats`` after a warm-up)."""
    import jax

    from iclgd_synth.train import TrainConfig

    config = TrainConfig(batch_size=batch_size, n_steps=steps, chunk_steps=steps)
    key, _ = group_key(config)
    mesh = run_mesh()
    padded = int(math.ceil(n_runs / mesh.devices.size) * mesh.devices.size)
    state = init_rows(key, range(padded), [config.lr] * padded, [0.0] * padded)
    params, opt_state, data_keys = _to_global(state, _row_sharding(mesh))
    chunk = _sharded_chunk(key, steps, mesh)
    jax.block_until_ready(chunk(params, opt_state, data_keys, 0))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(chunk(params, opt_state, data_keys, 0))
        best = min(best, time.perf_counter() - t0)
    return {"devices": int(mesh.devices.size), "runs": n_runs, "padded_runs": padded, "steps": steps,
            "batch_size": batch_size, "tasks_per_s": steps * batch_size * n_runs / best}


# -------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from iclgd_synth.validation import int_at_least

    parser.add_argument("base", help="the study whose config is the base (iclgd run --list lists them)")
    parser.add_argument("--grid", action="append", default=[], metavar="PATH=V1,V2",
                        help="a grid entry: a dotted config path and its values, e.g. --grid train.lr=1e-3,5e-4 "
                             "(repeatable: the grid is the product of the entries)")
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0],
                        help="seeds of every grid point (different integers >= 0; default: 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="set a base config field by dotted path before the grid (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the study's CI-sized config as base")
    parser.add_argument("--out", default=None, help="the sweep folder (default: sweeps/BASE-<hash of the sweep>)")
    parser.add_argument("--eval-tasks", type=int_at_least(1), default=None,
                        help="held-out tasks per run (default: the study's eval_tasks, else 10000)")
    parser.add_argument("--max-runs-per-program", type=int_at_least(1), default=None,
                        help="train at most this many runs as one program (bounds memory; default: every run that "
                             "shares the program)")
    parser.add_argument("--force", action="store_true", help="discard finished runs in --out and train them again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    maybe_initialize_distributed()
    plan = expand(args.base, args.grid, args.seeds, quick=args.quick, overrides=args.overrides,
                  eval_tasks=args.eval_tasks)
    out = run_sweep(plan, args.out, progress=not args.no_progress, force=args.force,
                    max_runs_per_program=args.max_runs_per_program)
    if is_writer():
        print(f"sweep: {len(plan.runs)} runs; summary written to {out / 'summary.md'}", file=sys.stderr)
    return 0
