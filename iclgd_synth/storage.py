"""Files that survive interruptions: atomic writes, JSON, stable hashes and checkpoints of pytrees.

Every result file is written to a temporary file in its folder and renamed into place, so a reader (or a resumed run)
sees the old file, the new one or none, never half of one. Files are created readable by the group and others
(mode 0644, as a collaborator on a shared machine expects), not with ``mkstemp``'s private 0600.

Checkpoints hold a pytree of arrays serialised by ``flax.serialization`` (msgpack, no pickle) together with a
fingerprint of its structure (paths, shapes, dtypes); restoring into a different structure raises a clear error that
names the file and what differs, instead of silently filling the wrong leaves.

:func:`exclusive_lock` keeps two processes from computing the same run at once: a lock file created with
``O_CREAT | O_EXCL`` holding the owner's pid and host; a lock whose process is gone (same host) is taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: Permission bits of every file written here (rw-r--r--).
FILE_MODE = 0o644


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another run or structure."""


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return write_bytes_atomic(path, text.encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def to_json(obj: Any, indent: int | None = 2) -> str:
    """JSON text of ``obj``; numpy / JAX scalars and arrays become numbers and lists."""
    return json.dumps(obj, indent=indent, default=_json_default)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically."""
    return write_text_atomic(path, to_json(obj) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; an unreadable or invalid file raises ValueError naming it."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); delete it or recompute the run with --force") from e


def stable_hash(obj: Any, length: int = 10) -> str:
    """A short hash of ``obj``'s JSON form (keys sorted), stable across processes and machines."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def tree_fingerprint(tree: Any) -> list[list[str]]:
    """(path, shape, dtype) of every leaf: what a checkpoint must match to be restored into ``tree``."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [[jax.tree_util.keystr(p), str(tuple(np.shape(x))), str(np.asarray(x).dtype)] for p, x in leaves]


def save_checkpoint(path: str | os.PathLike, tree: Any, meta: dict[str, Any]) -> Path:
    """Write the pytree ``tree`` and the JSON-able ``meta`` to ``path`` atomically (msgpack, no pickle)."""
    import jax
    from flax import serialization

    state = {"meta": to_json(meta, indent=None), "structure": to_json(tree_fingerprint(tree), indent=None),
             "leaves": {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}}
    return write_bytes_atomic(path, serialization.msgpack_serialize(state))


def load_checkpoint(path: str | os.PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    Returns (tree, meta). Raises :class:`CheckpointError` naming the file when it cannot be decoded (truncated,
    not a checkpoint) or when its structure differs from ``like``'s, with what to do about it.
    """
    import jax
    import jax.numpy as jnp
    from flax import serialization

    path = Path(path)
    advice = "delete it (or run with --force) to start this run again"
    try:
        state = serialization.msgpack_restore(path.read_bytes())
        meta = json.loads(state["meta"])
        structure = json.loads(state["structure"])
        leaves_in = state["leaves"]
    except Exception as e:  # msgpack / key / JSON errors all mean: not a readable checkpoint
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); {advice}") from e
    expected = tree_fingerprint(like)
    if structure != expected:
        diff = next(((a, b) for a, b in zip(structure, expected) if a != b), None)
        detail = (f"first difference: saved {diff[0]} vs expected {diff[1]}" if diff else
                  f"{len(structure)} saved leaves vs {len(expected)} expected")
        raise CheckpointError(f"checkpoint {str(path)!r} holds another structure than this run's ({detail}); "
                              f"{advice}")
    treedef = jax.tree.structure(like)
    leaves = [jnp.asarray(leaves_in[str(i)], dtype=np.asarray(l).dtype) for i, l in enumerate(jax.tree.leaves(like))]
    return jax.tree.unflatten(treedef, leaves), meta


class LockedError(FileExistsError):
    """The lock is held by another live process."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _read_lock(path: Path) -> tuple[int | None, str]:
    """(pid, host) written in a lock file; (None, "") when it is unreadable or half-written."""
    try:
        fields = path.read_text().split()
        return int(fields[0]), (fields[1] if len(fields) > 1 else "")
    except (OSError, ValueError, IndexError):
        return None, ""


@contextlib.contextmanager
def _guard(folder: Path):
    """Serialise lock taking among processes of this host (flock on the lock's folder), so that two processes taking
    over the same stale lock cannot both end up holding it. A no-op where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no guard
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire_lock(path: str | os.PathLike, what: str = "this run") -> Path:
    """Create the lock file ``path`` holding this process's pid and host, or raise :class:`LockedError` naming the
    owner's pid when another live process holds it. A lock left by a process that no longer exists (on this host) is
    taken over; a lock from another host is never taken over (its process cannot be checked from here)."""
    path = Path(path)
    host = socket.gethostname()
    with _guard(path.parent):
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
            except FileExistsError:
                pid, owner_host = _read_lock(path)
                if pid is not None and (owner_host not in ("", host) or _pid_alive(pid)):
                    where = "" if owner_host in ("", host) else f" on host {owner_host}"
                    raise LockedError(f"another process (pid {pid}{where}) is computing {what}; wait for it to "
                                      f"finish, or, if that process is gone, delete the lock file {str(path)!r}"
                                      ) from None
                with contextlib.suppress(FileNotFoundError):  # stale (or unreadable): take it over
                    os.unlink(path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {host}\n")
            return path
    raise LockedError(f"could not take the lock file {str(path)!r} for {what}; delete it if no process is computing")


def release_lock(path: str | os.PathLike) -> None:
    """Remove the lock file ``path`` if this process holds it (a lock taken over by another process is left alone)."""
    path = Path(path)
    pid, host = _read_lock(path)
    if pid == os.getpid() and host in ("", socket.gethostname()):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str = "this run"):
    """Hold the lock file ``path`` (:func:`acquire_lock`) for the duration of the block; released on any exit."""
    lock = acquire_lock(path, what)
    try:
        yield lock
    finally:
        release_lock(lock)


def writable_folder(path: str | os.PathLike, option: str, what: str) -> Path:
    """Create ``path`` as a folder if needed and check that it can be written; errors name the ``option`` that gave
    it (e.g. "--root") and say what it is for."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {str(path)!r} is a file; give a folder for {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create {what} {option} {str(path)!r}: {e.strerror}") from e
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{what} {option} {str(path)!r} is not writable; give another {option}")
    return path
