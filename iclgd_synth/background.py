"""Figures drawn in a worker process while the main process goes on computing (the command line's studies).

Drawing the main job's six weight-comparison figures takes about 3 s of Python (matplotlib), time in which the
main process could run its out-of-distribution sweeps. :class:`Jobs` hands such work to one worker process,
started when the study starts (its imports overlap training), and waits for it where the results are needed. The
numbers do not change: the worker draws figures from data the main process computed.

The worker is used only inside :func:`enabled` (the command line turns it on: it knows its ``__main__`` module is
safe to import in a child process, which a user's script or notebook may not be) and never under
``ICLGD_FIGURE_WORKER=0``. Everywhere else, and whenever the worker cannot be started or dies, jobs run inline, in
the calling process, with the same results. An exception raised by a job is raised again by :meth:`Jobs.wait`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterator

#: Environment variable that turns the worker off (0).
ENV = "ICLGD_FIGURE_WORKER"

_enabled = False
_pool: ProcessPoolExecutor | None = None


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Let :class:`Jobs` use the worker process inside this block; the worker is shut down when it ends."""
    global _enabled
    before = _enabled
    _enabled = True
    try:
        yield
    finally:
        _enabled = before
        if not before:
            shutdown()


def worker_allowed() -> bool:
    return _enabled and os.environ.get(ENV, "1").strip() not in ("0", "")


def _worker() -> ProcessPoolExecutor | None:
    global _pool
    if _pool is None and worker_allowed():
        import multiprocessing

        try:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        except (OSError, ValueError):
            return None
    return _pool


def shutdown() -> None:
    """Stop the worker process (waiting for its jobs)."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start processes without their re-running the caller's ``__main__``: a spawned child imports the parent's main
    module (by file or module name) unless it has neither, so both are hidden while the worker starts. Jobs name
    their functions by module, so the worker never needs it."""
    import sys

    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for k in saved:
            if k == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[k]
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _import(module: str) -> None:
    importlib.import_module(module)


class Jobs:
    """Calls ``fn(*args)`` in the worker process when it is allowed, else inline; :meth:`wait` returns the results in
    the order of submission.

    Args:
      preload: modules the worker imports as soon as it starts (so that the first job does not wait for them).
      inline: run every job in this process, whatever :func:`enabled` says.
    """

    def __init__(self, preload: tuple[str, ...] = (), *, inline: bool = False):
        self._pool = None if inline else _worker()
        self._jobs: list[tuple[Callable, tuple, Future | None, Any]] = []
        for module in preload:
            self._submit(_import, module)

    @property
    def in_worker(self) -> bool:
        return self._pool is not None

    def _submit(self, fn: Callable, *args: Any) -> Future | None:
        if self._pool is None:
            return None
        try:
            with _main_hidden():  # the first submission starts the worker process
                return self._pool.submit(fn, *args)
        except RuntimeError:  # the pool was shut down or is broken: run inline
            return None

    def submit(self, fn: Callable, *args: Any) -> None:
        """Start ``fn(*args)`` (in the worker; inline, now, otherwise)."""
        future = self._submit(fn, *args)
        self._jobs.append((fn, args, future, None if future is not None else fn(*args)))

    def wait(self) -> list[Any]:
        """Every job's result; a job whose worker died is run again inline; a job's own exception is raised."""
        from concurrent.futures.process import BrokenProcessPool

        results = []
        for fn, args, future, value in self._jobs:
            if future is None:
                results.append(value)
                continue
            try:
                results.append(future.result())
            except BrokenProcessPool:
                results.append(fn(*args))
        self._jobs = []
        return results
