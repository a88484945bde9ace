"""The study protocol and the one driver that runs every study.

A study is

- a frozen **config** dataclass that embeds the task, model and training configs (composed, not copied), with a
  ``quick()`` method giving the CI-sized version of the same code path and a ``train`` field (its ``seeds`` are the
  study's seeds);
- a **compute** function ``compute(config, run) -> metrics``: the science. It trains, evaluates and returns a
  JSON-able dict; arrays the figures need are saved with ``run.save_arrays``; checkpoints go under ``run.dir``;
- a **render** function ``render(config, metrics, run_dir) -> markdown``: the presentation. It writes figures into
  ``run_dir`` and returns the report; it never trains or samples tasks, so ``iclgd report RUN_DIR`` can re-render a
  finished run.

:func:`run` does prepare / skip / force / resume / finish for every study:

- the run directory is ``<root>/<name>-<hash>`` where the hash covers only the config fields that change results;
- a finished run (metrics.json marked finished) is reused; if its report is missing it is re-rendered;
- an unfinished run resumes (training checkpoints in the directory);
- ``force`` recomputes into ``<dir>.new`` and swaps it in only when complete, so an interrupted recomputation never
  loses the earlier finished results;
- metrics.json is written before the report and marked finished last;
- one process computes a run at a time: a lock file in the run directory (:data:`LOCK_FILE`,
  :func:`iclgd_synth.storage.exclusive_lock`) makes a second ``iclgd run`` of the same study and config stop with the
  first one's pid instead of computing everything again; a lock left by a process that died is taken over.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from iclgd_synth import config as cfg
from iclgd_synth.storage import exclusive_lock, read_json, stable_hash, write_json, write_text_atomic

FINISHED = "finished"
#: The lock file held in the run directory while a process computes the run.
LOCK_FILE = ".computing.lock"


@dataclasses.dataclass(frozen=True)
class Study:
    """A named study: its full-size config and its compute and render functions (see the module docstring)."""

    name: str
    description: str
    config: Any
    compute: Callable[[Any, "Run"], dict]
    render: Callable[[Any, dict, Path], str]

    def make_config(self, *, quick: bool = False, overrides: Sequence[str] = (),
                    seeds: Sequence[int] | None = None) -> Any:
        """The preset (its quick version with ``quick``), then ``seeds``, then the ``PATH=VALUE`` overrides."""
        config = self.config.quick() if quick else self.config
        if seeds is not None:
            config = cfg.override(config, {"train.seeds": tuple(int(s) for s in seeds)})
        return cfg.override(config, list(overrides))


@dataclasses.dataclass
class Run:
    """What a compute function gets besides its config: the working directory and the progress setting."""

    dir: Path
    progress: bool = True

    def save_arrays(self, name: str, **arrays: Any) -> Path:
        """Save named arrays to ``<dir>/<name>.npz`` atomically (figures read them back in the renderer)."""
        import io

        from iclgd_synth.storage import write_bytes_atomic

        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        return write_bytes_atomic(self.dir / f"{name}.npz", buf.getvalue())


def load_arrays(run_dir: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """Arrays saved by :meth:`Run.save_arrays` (empty when the file is absent)."""
    path = Path(run_dir) / f"{name}.npz"
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run_dir_for(root: str | os.PathLike, study: Study, config: Any) -> Path:
    return Path(root) / f"{study.name}-{stable_hash(cfg.hash_dict(config))}"


def is_finished(run_dir: str | os.PathLike) -> bool:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return False
    try:
        return bool(read_json(path).get(FINISHED))
    except (ValueError, OSError):
        return False


def _record(study: Study, config: Any, quick: bool, overrides: Sequence[str], seeds) -> dict[str, Any]:
    return {"study": study.name, "quick": quick, "overrides": cfg.describe_overrides(overrides),
            "seeds": None if seeds is None else [int(s) for s in seeds], "config": cfg.to_dict(config)}


def run(study: Study, *, quick: bool = False, overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
        root: str | os.PathLike = "runs", force: bool = False, progress: bool = True) -> Path:
    """Run ``study`` (see the module docstring) and return its run directory."""
    config = study.make_config(quick=quick, overrides=overrides, seeds=seeds)
    out = run_dir_for(root, study, config)
    _check_root(Path(root))
    if is_finished(out) and not force:
        if not (out / "report.md").exists():
            render_run(out)
            _say(f"{study.name}: finished run found in {out}; its report was missing and was re-rendered")
        else:
            _say(f"{study.name}: finished run found in {out} (use --force to recompute)")
        return out
    work = out.with_name(out.name + ".new") if force and out.exists() else out
    out.mkdir(parents=True, exist_ok=True)  # the lock lives in the run directory
    with exclusive_lock(out / LOCK_FILE, f"the run {str(out)!r} (same study and config)"):
        if is_finished(out) and not force:  # finished by another process between the check above and the lock
            _say(f"{study.name}: finished run found in {out} (use --force to recompute)")
            return out
        _compute(study, config, out, work, Run(work, progress), _record(study, config, quick, overrides, seeds))
    _say(f"{study.name}: report written to {out / 'report.md'}")
    return out


def _compute(study: Study, config: Any, out: Path, work: Path, run: Run, record: dict[str, Any]) -> None:
    """Compute into ``work``, write metrics and report, and swap ``work`` in for ``out`` when they differ."""
    if work != out and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "config.json", record)
    t0 = time.perf_counter()
    metrics = study.compute(config, run)
    metrics = {"study": study.name, "description": study.description, **metrics, "total_seconds": time.perf_counter() - t0}
    write_json(work / "metrics.json", metrics)
    write_text_atomic(work / "report.md", study.render(config, metrics, work))
    write_json(work / "metrics.json", {**metrics, FINISHED: True})
    if work != out:
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)


def render_run(run_dir: str | os.PathLike) -> Path:
    """Re-render ``report.md`` and the figures of a finished run from its metrics (nothing is recomputed)."""
    from iclgd_synth.studies.registry import get_study

    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no {name}); give a folder written by "
                                    "'iclgd run NAME'")
    record = read_json(run_dir / "config.json")
    metrics = read_json(run_dir / "metrics.json")
    if not metrics.get(FINISHED):
        raise ValueError(f"the run in {str(run_dir)!r} is not finished; run its study again to finish it")
    study = get_study(record["study"])
    config = study.make_config(quick=record.get("quick", False), overrides=record.get("overrides", ()),
                               seeds=record.get("seeds"))
    if not _same_where_recorded(record["config"], cfg.to_dict(config)):
        raise ValueError(f"the config in {str(run_dir / 'config.json')!r} differs from what study "
                         f"{study.name!r} builds from its preset and overrides today (the preset changed since the "
                         "run); re-run the study instead")
    write_text_atomic(run_dir / "report.md", study.render(config, metrics, run_dir))
    return run_dir / "report.md"


def _same_where_recorded(recorded: Any, current: Any) -> bool:
    """Whether ``current`` agrees with ``recorded`` on every field the record has (fields added to a config since the
    run was made are not in its record and do not count)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return all(k in current and _same_where_recorded(v, current[k]) for k, v in recorded.items())
    if isinstance(recorded, list) and isinstance(current, (list, tuple)):
        return len(recorded) == len(current) and all(_same_where_recorded(a, b) for a, b in zip(recorded, current))
    return recorded == current


def _check_root(root: Path) -> None:
    from iclgd_synth.storage import writable_folder

    writable_folder(root, "--root", "the run directories")


def _say(text: str) -> None:
    print(text, file=sys.stderr)


class History:
    """Rows recorded over training (one JSON line each), kept in ``path`` so that a resumed run keeps the rows of
    the steps before the interruption; :meth:`finish` keeps one row per step, in order, up to ``n_steps``."""

    def __init__(self, path: str | os.PathLike):
        import json

        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by an interruption
                    break

    def append(self, row: dict[str, Any]) -> None:
        from iclgd_synth.storage import to_json

        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(to_json(row, indent=None) + "\n")

    def finish(self, n_steps: int) -> list[dict[str, Any]]:
        from iclgd_synth.storage import to_json

        by_step = {row["step"]: row for row in self.rows if row["step"] <= n_steps}
        self.rows = [by_step[s] for s in sorted(by_step)]
        write_text_atomic(self.path, "".join(to_json(r, indent=None) + "\n" for r in self.rows))
        return self.rows
