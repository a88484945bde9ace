"""The command line's persistent compilation cache: on in its own folder, off on request, never over the user's."""

import jax
import pytest

from iclgd_synth import compile_cache

KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def jax_cache_settings(monkeypatch):
    saved = {k: getattr(jax.config, k) for k in KEYS}
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_enable_sets_the_folder_from_the_environment(jax_cache_settings, monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.enable() == tmp_path / "c"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


def test_default_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_folder() == tmp_path / "iclgd_synth" / "jax"


@pytest.mark.parametrize("value", ["0", ""])
def test_enable_is_off_on_request(jax_cache_settings, monkeypatch, value):
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None


def test_enable_leaves_a_users_cache_alone(jax_cache_settings, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert compile_cache.enable(tmp_path / "ours") is None
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine") and not (tmp_path / "ours").exists()
