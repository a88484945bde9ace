"""An on-disk cache of the statistics of real checkpoints, so that a repeated report skips the pass over the LLM.

One ``.npz`` file per (checkpoint files, reading options, layers read, statistics code), named by a hash of

    STATS_VERSION, a hash of the source of the modules that compute the statistics (stats, collect and the loaders,
    so an edited statistic never reads a stale entry), each checkpoint file's resolved path, size and mtime, the
    source's metadata (head counts, ...), its reading options (un-permuting), the layers read and the heads flag.

Where: ``$ICLGD_CACHE`` if set (``0``, ``off``, ``false`` or ``no`` disable the cache), else
``$XDG_CACHE_HOME/iclgd_synth``, else ``~/.cache/iclgd_synth``. Entries are written to a temporary file and renamed
into place (atomic: a concurrent run sees the old entry, the new one or none, never half of one), hold no pickles
(JSON metadata and plain arrays), and only the newest :data:`MAX_ENTRIES` are kept. A file that cannot be read is
treated as absent; a cache folder that cannot be written is skipped silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from iclgd_synth.weights.checkpoint import WeightSource
from iclgd_synth.weights.records import Histogram, MatrixRecord, SourceStats

#: Bump when what a cache entry holds changes in a way the module-source hash would not catch.
STATS_VERSION = 1
MAX_ENTRIES = 16
ENV = "ICLGD_CACHE"
_OFF = ("0", "off", "false", "no")
#: Modules whose source enters the key (relative to this package).
_CODE = ("stats.py", "collect.py", "records.py", "checkpoint.py", "loaders.py", "gguf_loader.py", "hf_loader.py",
         "cache.py")


def cache_dir(setting: bool | str | Path | None = None) -> Path | None:
    """The cache folder for ``setting`` (None / True: from the environment; False: no cache; a path: that folder)."""
    if setting is False:
        return None
    if setting is not None and setting is not True:
        return Path(setting).expanduser()
    env = os.environ.get(ENV)
    if env is not None:
        if env.strip().lower() in _OFF or not env.strip():
            return None
        folder = Path(env).expanduser()
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"${ENV} = {env!r} is a file; point it at a folder for the statistics cache, or "
                                     f"set {ENV}=0 to turn the cache off")
        return folder
    return default_dir()


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/iclgd_synth``, else ``~/.cache/iclgd_synth``: the folder when ``$ICLGD_CACHE`` is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iclgd_synth"


@functools.cache
def _code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_key(source: WeightSource, heads: bool = True) -> str | None:
    """The entry name for ``source`` (None for sources not read from files: nothing to key them on)."""
    if not source.files:
        return None
    try:
        files = [[f, (st := os.stat(f)).st_size, st.st_mtime_ns] for f in source.files]
    except OSError:
        return None
    info = {k: v for k, v in source.info.to_dict().items() if k not in ("name", "source")}
    desc = {"version": STATS_VERSION, "code": _code_hash(), "files": files, "info": info, "kind": source.kind,
            "options": [list(o) for o in source.options], "layers": source.n_layers, "heads": bool(heads)}
    return "stats-" + hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def load(folder: Path, key: str, source: WeightSource) -> SourceStats | None:
    """The cached statistics (with ``source``'s current metadata), or None when absent or unreadable."""
    path = folder / f"{key}.npz"
    if not path.exists():
        return None
    t0 = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key:
                return None
            out = SourceStats(info=source.info, kind=source.kind, n_layers=int(meta["n_layers"]), cached=True)
            out.records = [MatrixRecord(m, int(layer), head, tuple(shape), stats)
                           for m, layer, head, shape, stats in meta["records"]]
            for j, (matrix, lengths) in enumerate(meta["spectra"]):
                flat = z[f"spectra_{j}"]
                out.spectra[matrix] = list(np.split(flat, np.cumsum(lengths)[:-1])) if lengths else []
            for which, edges, hists in (("rel", "rel_edges", out.rel_hist), ("abs", "abs_edges", out.abs_hist)):
                for j, (matrix, zeros, below, total) in enumerate(meta[which]):
                    hists[matrix] = Histogram(z[edges].copy(), z[f"{which}_{j}"].copy(), int(zeros), int(below),
                                              int(total))
            for j, name in enumerate(meta["examples"]):
                out.examples[name] = z[f"example_{j}"].copy()
    except (OSError, ValueError, KeyError, TypeError, EOFError, json.JSONDecodeError, zipfile.BadZipFile):
        return None  # a damaged or foreign file is treated as absent
    out.seconds = time.perf_counter() - t0
    return out


def save(folder: Path, key: str, stats: SourceStats) -> Path | None:
    """Write ``stats`` atomically under ``key``; None (and nothing written) when the folder is not writable."""
    arrays: dict[str, Any] = {}
    spectra = []
    for j, (matrix, curves) in enumerate(stats.spectra.items()):
        spectra.append([matrix, [int(c.size) for c in curves]])
        arrays[f"spectra_{j}"] = np.concatenate(curves) if curves else np.zeros(0, np.float32)
    hist_meta = {}
    for which, hists in (("rel", stats.rel_hist), ("abs", stats.abs_hist)):
        hist_meta[which] = []
        for j, (matrix, h) in enumerate(hists.items()):
            hist_meta[which].append([matrix, int(h.zeros), int(h.below), int(h.total)])
            arrays[f"{which}_{j}"] = h.counts
            arrays[f"{which}_edges"] = h.edges
    for which in ("rel", "abs"):
        arrays.setdefault(f"{which}_edges", np.zeros(0))
    names = list(stats.examples)
    for j, name in enumerate(names):
        arrays[f"example_{j}"] = stats.examples[name]
    meta = {"key": key, "n_layers": stats.n_layers, "seconds": stats.seconds, "spectra": spectra, **hist_meta,
            "examples": names,
            "records": [[r.matrix, r.layer, r.head, list(r.shape), r.stats] for r in stats.records]}
    arrays["meta"] = np.array(json.dumps(meta))  # NaN / inf survive as JSON's NaN / Infinity
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, folder / f"{key}.npz")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return None
    _prune(folder)
    return folder / f"{key}.npz"


def _prune(folder: Path) -> None:
    """Keep the newest MAX_ENTRIES entries."""
    try:
        entries = sorted(folder.glob("stats-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in entries[MAX_ENTRIES:]:
            p.unlink()
    except OSError:
        pass


def cached_collect(source: WeightSource, compute, *, heads: bool = True,
                   cache: bool | str | Path | None = None) -> SourceStats:
    """``compute()`` through the cache: the cached statistics of ``source`` when present, else computed and stored."""
    folder = cache_dir(cache)
    key = cache_key(source, heads) if folder is not None else None
    if key is None:
        return compute()
    hit = load(folder, key, source)
    if hit is not None:
        return hit
    fresh = compute()
    save(folder, key, fresh)
    return fresh


