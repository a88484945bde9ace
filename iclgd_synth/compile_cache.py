"""A persistent JAX compilation cache for the ``iclgd`` command line (and the test suite).

The main job compiles about 80 programs (training step, sampler per task law, metrics, tuning, out-of-distribution
sweeps); on the 2-core development machine that is most of its wall time after training. With the cache on, a second
run of any command loads the compiled programs from disk instead of compiling them again; the numbers do not change
(the same programs run). The command line turns it on for its own process only (:func:`enable`); importing the
library never changes JAX's settings. It is left alone when the user has configured a cache already
(``JAX_COMPILATION_CACHE_DIR`` or ``jax_compilation_cache_dir``), and ``ICLGD_JAX_CACHE=0`` turns it off
(``ICLGD_JAX_CACHE=/some/folder`` moves it).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable: 0 (or empty) turns the cache off, a path moves it.
ENV = "ICLGD_JAX_CACHE"


def default_folder(name: str = "jax") -> Path:
    """``$XDG_CACHE_HOME/iclgd_synth/NAME`` (``~/.cache/iclgd_synth/NAME`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iclgd_synth" / name


def enable(folder: str | os.PathLike | None = None, *, env: str = ENV, default: Path | None = None,
           min_compile_seconds: float = 0.0) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``folder`` (None: the folder in ``$env``, else ``default``, else
    :func:`default_folder`); returns the folder, or None when it was left off (``$env`` set to 0 or empty, a cache
    already configured by the user, or a folder that cannot be created). Programs that compile in less than
    ``min_compile_seconds`` are not stored."""
    import jax

    setting = os.environ.get(env)
    if setting is not None and setting.strip() in ("", "0"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return None
    path = Path(folder or setting or default or default_folder())
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
