"""GGUF checkpoints (llama.cpp's format), read with the ``gguf`` package one tensor at a time.

Tensors ``blk.L.attn_q/attn_k/attn_v/attn_output.weight`` (or a fused ``blk.L.attn_qkv.weight``); head counts from
the metadata ``<arch>.attention.head_count`` / ``head_count_kv`` / ``key_length`` / ``value_length`` and the hidden
size from ``<arch>.embedding_length``. GGUF lists a tensor's dimensions innermost first (``[576, 192]`` for a key
projection), the reverse of NumPy's order; :func:`gguf.quants.dequantize` returns NumPy order (rows = outputs).

llama.cpp's converter reorders the rows of W_Q and W_K of LLaMA-architecture models inside every head, from the
Hugging Face rotary layout (rotated pairs (i, i + Kq/2)) to its own (pairs (2i, 2i + 1)): :func:`rope_permute` is that
reordering and :func:`rope_unpermute` its inverse, applied on reading so that the matrices match the Hugging Face
checkpoint. (W_K,h^T W_Q,h and every entry statistic are unchanged by it, since both matrices get the same row order.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iclgd_synth.weights.loaders import (
    INSTALL_WEIGHTS, LayerWeights, ModelInfo, WeightSource, check_layer_shapes, require, split_heads_cols,
    split_heads_rows,
)

#: GGUF architectures whose converter permutes the rows of W_Q / W_K for rotary embeddings.
ROPE_PERMUTED_ARCHITECTURES = ("llama",)


def rope_permute(w_RxE: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face row order -> llama.cpp row order, within each of ``n_heads`` heads (rows = n_heads * Kq)."""
    rows = w_RxE.shape[0]
    half = rows // n_heads // 2
    return w_RxE.reshape(n_heads, 2, half, *w_RxE.shape[1:]).swapaxes(1, 2).reshape(w_RxE.shape)


def rope_unpermute(w_RxE: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`rope_permute`: llama.cpp row order -> Hugging Face row order."""
    rows = w_RxE.shape[0]
    half = rows // n_heads // 2
    return w_RxE.reshape(n_heads, half, 2, *w_RxE.shape[1:]).swapaxes(1, 2).reshape(w_RxE.shape)


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value of a :class:`gguf.GGUFReader` (None / ``default`` when absent)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):
        return field.contents()
    part = field.parts[field.data[0]]  # older gguf versions
    return bytes(part).decode() if part.dtype == np.uint8 else part.tolist()[0]


def open_gguf(path: str | Path, *, spec: str | None = None, name: str | None = None, n_heads: int | None = None,
              n_kv_heads: int | None = None, unpermute: bool | None = None) -> WeightSource:
    """Open a GGUF file (or a folder holding exactly one) as a :class:`WeightSource`.

    ``unpermute`` (default: for the architectures in :data:`ROPE_PERMUTED_ARCHITECTURES`) undoes llama.cpp's rotary
    row permutation of W_Q and W_K.
    """
    gguf = require("gguf", "gguf", INSTALL_WEIGHTS, "to read GGUF files")
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"expected exactly one .gguf file in {str(path)!r}, found {len(files)}")
        path = files[0]
    reader = gguf.GGUFReader(str(path))  # memory-maps the file: tensors are read when touched
    arch = field_value(reader, "general.architecture")
    if arch is None:
        raise ValueError(f"{str(path)!r} has no general.architecture metadata; not a model GGUF file")

    def meta(key: str, default: Any = None) -> Any:
        value = field_value(reader, f"{arch}.{key}", default)
        if isinstance(value, list):
            raise ValueError(f"{str(path)!r}: per-layer {arch}.{key} ({value[:4]}...) is not supported")
        return value

    tensors = {t.name: t for t in reader.tensors}
    n_layers = meta("block_count")
    hidden = meta("embedding_length")
    heads = n_heads or meta("attention.head_count")
    if n_layers is None or hidden is None or heads is None:
        raise ValueError(f"{str(path)!r} lacks {arch}.block_count / embedding_length / attention.head_count "
                         "metadata; pass n_heads (CLI: --n-heads) if only the head count is missing")
    kv_heads = n_kv_heads or meta("attention.head_count_kv") or heads
    fused = "blk.0.attn_qkv.weight" in tensors
    needed = ["attn_qkv"] if fused else ["attn_q", "attn_k", "attn_v"]
    missing = [f"blk.0.{t}.weight" for t in needed + ["attn_output"] if f"blk.0.{t}.weight" not in tensors]
    if missing:
        raise ValueError(f"unknown GGUF tensor layout in {str(path)!r}: no {', '.join(missing)}; expected llama.cpp "
                         f"names blk.L.attn_q/attn_k/attn_v/attn_output.weight (found e.g. "
                         f"{', '.join(list(tensors)[:5])})")
    # Per-head sizes: from the metadata, else from the tensor shapes (H Kq need not equal the hidden size)
    rows = {t: int(tensors[f"blk.0.{t}.weight"].shape[-1]) for t in needed}  # GGUF lists the output size last
    head_dim = meta("attention.key_length") or (hidden // heads if fused else rows["attn_q"] // heads)
    value_dim = meta("attention.value_length") or (head_dim if fused else rows["attn_v"] // kv_heads)
    do_unpermute = arch in ROPE_PERMUTED_ARCHITECTURES if unpermute is None else bool(unpermute)
    storage = tensors["blk.0.attn_qkv.weight" if fused else "blk.0.attn_q.weight"].tensor_type.name
    notes = []
    if do_unpermute:
        notes.append("rows of W_Q and W_K un-permuted from llama.cpp's rotary layout to the Hugging Face layout")
    if storage not in ("F32", "F16", "BF16", "F64"):
        notes.append(f"{storage}-quantized: entries lie on a per-block grid, which shapes the small-magnitude and "
                     "exact-zero fractions")
    info = ModelInfo(name=name or str(field_value(reader, "general.name") or path.stem), source=spec or str(path),
                     format="gguf", architecture=str(arch), n_layers=int(n_layers), n_heads=int(heads),
                     n_kv_heads=int(kv_heads), head_dim=int(head_dim), value_dim=int(value_dim),
                     hidden_size=int(hidden), storage=storage, notes=tuple(notes))

    def load(tname: str) -> np.ndarray:
        if tname not in tensors:
            raise ValueError(f"{str(path)!r} has no tensor {tname}")
        t = tensors[tname]
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions innermost first
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)

    def read(i: int) -> LayerWeights:
        if fused:
            qkv = load(f"blk.{i}.attn_qkv.weight")
            nq, nk = heads * head_dim, kv_heads * head_dim
            q, k, v = qkv[:nq], qkv[nq:nq + nk], qkv[nq + nk:]
        else:
            q, k, v = (load(f"blk.{i}.{t}.weight") for t in ("attn_q", "attn_k", "attn_v"))
        o = load(f"blk.{i}.attn_output.weight")
        check_layer_shapes(i, {"q": q.shape, "k": k.shape, "v": v.shape, "o": o.shape}, info.n_heads,
                           info.n_kv_heads, info.head_dim, info.value_dim, info.hidden_size)
        if do_unpermute:
            q, k = rope_unpermute(q, info.n_heads), rope_unpermute(k, info.n_kv_heads)
        return LayerWeights(i, split_heads_rows(q, info.n_heads, "attn_q"),
                            split_heads_rows(k, info.n_kv_heads, "attn_k"),
                            split_heads_rows(v, info.n_kv_heads, "attn_v"),
                            split_heads_cols(o, info.n_heads, "attn_output"))

    return WeightSource(info=info, read_layer=read, kind="llm")
