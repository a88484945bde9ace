"""Files that survive interruptions: atomic writes, JSON, stable hashes and checkpoints of pytrees.

Every result file is written to a temporary file in its folder and renamed into place, so a reader (or a resumed run)
sees the old file, the new one or none, never half of one. Files are created readable by the group and others
(mode 0644, as a collaborator on a shared machine expects), not with ``mkstemp``'s private 0600.

Checkpoints hold a pytree of arrays serialised by ``flax.serialization`` (msgpack, no pickle) together with a
fingerprint of its structure (paths, shapes, dtypes); restoring into a different structure raises a clear error that
names the file and what differs, instead of silently filling the wrong leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
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
