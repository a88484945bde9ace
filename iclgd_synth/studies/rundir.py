"""Run directories: ``<root>/<study>-<config hash>/`` holding config.json, metrics.json, figures and report.md.

A run is finished when metrics.json exists with ``"finished": true``; a finished run is not recomputed unless asked
(``force``). Files are written atomically (temporary file, then rename), so an interrupted run never leaves a
half-written result behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def run_directory(root: str | os.PathLike, name: str, config: dict[str, Any]) -> Path:
    return Path(root) / f"{name}-{config_hash(config)}"


def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_default, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def is_finished(run_dir: str | os.PathLike) -> bool:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return False
    try:
        return bool(read_json(path).get("finished"))
    except (json.JSONDecodeError, OSError):
        return False


def finish_run(out: Path, name: str, report: str, metrics: dict[str, Any]) -> Path:
    """Write report.md, then metrics.json marked finished (last, so a finished mark means a complete run)."""
    write_text_atomic(Path(out) / "report.md", report)
    write_json(Path(out) / "metrics.json", {**metrics, "finished": True})
    print(f"{name}: report written to {Path(out) / 'report.md'}")
    return Path(out)
