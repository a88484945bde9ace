"""GGUF checkpoints (llama.cpp's format), read with the ``gguf`` package one tensor at a time.

Tensors ``blk.L.attn_q/attn_k/attn_v/attn_output.weight`` (or a fused ``blk.L.attn_qkv.weight``); head counts from
the metadata ``<arch>.attention.head_count`` / ``head_count_kv`` / ``key_length`` / ``value_length`` and the hidden
size from ``<arch>.embedding_length``. GGUF lists a tensor's dimensions innermost first (``[576, 192]`` for a key
projection), the reverse of NumPy's order; :func:`gguf.quants.dequantize` returns NumPy order (rows = outputs).

llama.cpp's converter reorders the rows of W_Q and W_K of LLaMA-like models inside every head, from the Hugging Face
rotary layout (rotated pairs (i, i + Kq/2)) to its own (pairs (2i, 2i + 1)): :func:`rope_permute` is that
reordering and :func:`rope_unpermute` its inverse, applied on reading so that the matrices match the Hugging Face
checkpoint. (W_K,h^T W_Q,h and every entry statistic are unchanged by it, since both matrices get the same row order.)
Which architectures are permuted is not recorded in the file; :data:`ROPE_PERMUTED_ARCHITECTURES` lists those whose
converter class permutes (``open_gguf(unpermute=...)`` / ``iclgd weights --no-unpermute`` overrides it).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from iclgd_synth.weights.checkpoint import (
    INSTALL_WEIGHTS, LayerWeights, ModelInfo, WeightSource, check_layer_shapes, require, score_omissions,
    split_heads_cols, split_heads_rows,
)

#: GGUF architectures whose llama.cpp converter (convert_hf_to_gguf.py) applies ``LlamaModel.permute`` (or the same
#: reordering under another name) to q_proj / k_proj: LlamaModel ("llama": LLaMA, Mistral, SmolLM2, ...), DeciModel,
#: GraniteModel and GraniteMoeModel (subclasses of LlamaModel), ArcticModel, ChameleonModel, OlmoModel (OLMo 1, not
#: OLMo 2) and MiniCPMModel. Kept to those checked in the converter's source: other LLaMA-like architectures
#: (Baichuan, InternLM2, Xverse, ...) split or permute fused tensors in their own ways, and architectures with
#: Hugging Face-style rotary pairs (Qwen2/3, Gemma, Phi-3, OLMo 2, LLaMA 4, ...) are stored unpermuted.
ROPE_PERMUTED_ARCHITECTURES = ("llama", "deci", "granite", "granitemoe", "arctic", "chameleon", "olmo", "minicpm")


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
    """A metadata value of a :class:`gguf.GGUFReader` (None / ``default`` when absent): a number, a string, or a list
    for array fields."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):
        return field.contents()
    return _field_contents(field)


def _field_contents(field: Any) -> Any:
    """ReaderField.contents() for gguf versions without it (before 0.11): ``field.data`` indexes the parts that hold
    the value, one part per element for arrays; strings are uint8 parts."""
    from gguf import GGUFValueType

    def one(idx: int) -> Any:
        part = field.parts[idx]
        return bytes(part).decode("utf-8") if part.dtype == np.uint8 and field.types[-1] == GGUFValueType.STRING \
            else part.tolist()[0]

    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return [one(i) for i in field.data]
    return one(field.data[0])


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: ``shape`` in GGUF order (innermost first), ``data`` a view of the file in the layout
    :func:`gguf.quants.dequantize` takes (the gguf package's ReaderTensor.data)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any
    data: np.ndarray


#: Metadata arrays longer than this (the vocabulary, merges, token scores) are read as None: nothing here uses them,
#: and they would make the cached index large.
MAX_ARRAY = 4096
#: Bump when what a cached index holds changes.
INDEX_VERSION = 1


@dataclasses.dataclass(frozen=True)
class GGUFIndex:
    """A GGUF file's metadata (key -> value: a number, a string, or a list for arrays; arrays of more than
    :data:`MAX_ARRAY` elements, e.g. the vocabulary, are skipped and read as None) and its tensors by name."""

    fields: dict[str, Any]
    tensors: dict[str, GGUFTensor]


def read_gguf_index(path: str | Path, cache: bool | str | Path | None = None) -> GGUFIndex:
    """The metadata and tensor index of a GGUF file (the tensors stay in the memory-mapped file). A file that is not
    a readable GGUF (truncated, another format) raises ValueError naming it.

    Parsing the header with ``gguf.GGUFReader`` reads every metadata entry, SmolLM2's 49,152-token vocabulary
    included (1.6 s on an idle 2-core machine, about 5 s under load), so the index is cached as a small JSON file
    (``gguf-index/`` in the statistics cache folder, :func:`iclgd_synth.weights.cache.cache_dir`; ``cache`` as
    there) keyed on the file's resolved path, size and modification time: a later run memory-maps the file and
    builds the same tensor views from the recorded offsets without parsing."""
    path = Path(path)
    entry = _index_entry(path, cache)
    if entry is not None and entry.exists():
        try:
            return _index_from_json(path, json.loads(entry.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable entry is treated as absent
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        index = _index_from_reader(reader)
    except (ValueError, OSError, KeyError, IndexError, TypeError, struct.error) as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e}); check that it is "
                         "complete (a download cut short leaves a truncated file) and in GGUF format") from e
    if entry is not None:
        _write_index(entry, index, reader)
    return index


def _index_entry(path: Path, cache: bool | str | Path | None) -> Path | None:
    from iclgd_synth.storage import stable_hash
    from iclgd_synth.weights.cache import cache_dir

    folder = cache_dir(cache)
    if folder is None:
        return None
    try:
        st = path.resolve().stat()
    except OSError:
        return None
    key = stable_hash({"version": INDEX_VERSION, "path": str(path.resolve()), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns})
    return folder / "gguf-index" / f"{key}.json"


def _write_index(entry: Path, index: GGUFIndex, reader: Any) -> None:
    from iclgd_synth.storage import write_text_atomic

    tensors = [{"name": t.name, "shape": [int(v) for v in t.shape], "type": int(t.tensor_type),
                "offset": int(t.data_offset), "dtype": t.data.dtype.str, "data_shape": list(t.data.shape)}
               for t in reader.tensors]
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(entry, json.dumps({"fields": index.fields, "tensors": tensors}))
    except OSError:
        pass  # a cache folder that cannot be written is skipped


def _index_from_json(path: Path, payload: dict) -> GGUFIndex:
    from gguf import GGMLQuantizationType

    data = np.memmap(path, mode="r")
    tensors = {}
    for t in payload["tensors"]:
        dtype, shape = np.dtype(t["dtype"]), tuple(t["data_shape"])
        n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        view = data[t["offset"]:t["offset"] + n_bytes].view(dtype).reshape(shape)
        tensors[t["name"]] = GGUFTensor(t["name"], tuple(t["shape"]), GGMLQuantizationType(t["type"]), view)
    return GGUFIndex(payload["fields"], tensors)


def _index_from_reader(reader: Any) -> GGUFIndex:
    fields = {k: (None if _is_long_array(reader.fields[k]) else field_value(reader, k)) for k in reader.fields}
    return GGUFIndex(fields, {t.name: GGUFTensor(t.name, tuple(int(s) for s in t.shape), t.tensor_type, t.data)
                              for t in reader.tensors})


def _is_long_array(field: Any) -> bool:
    from gguf import GGUFValueType

    return bool(field.types) and field.types[0] == GGUFValueType.ARRAY and len(field.data) > MAX_ARRAY


def open_gguf(path: str | Path, *, spec: str | None = None, name: str | None = None, n_heads: int | None = None,
              n_kv_heads: int | None = None, unpermute: bool | None = None) -> WeightSource:
    """Open a GGUF file (or a folder holding exactly one) as a :class:`WeightSource`.

    ``unpermute`` (None: for the architectures in :data:`ROPE_PERMUTED_ARCHITECTURES`) undoes llama.cpp's rotary
    row permutation of W_Q and W_K; True / False force it on / off.
    """
    gguf = require("gguf", "gguf", INSTALL_WEIGHTS, "to read GGUF files")
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"expected exactly one .gguf file in {str(path)!r}, found {len(files)}")
        path = files[0]
    index = read_gguf_index(path)  # memory-maps the file: tensors are read when touched
    fields = index.fields
    arch = fields.get("general.architecture")
    if arch is None:
        raise ValueError(f"{str(path)!r} has no general.architecture metadata; not a model GGUF file")

    def meta(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{key}")
        if isinstance(value, list):
            raise ValueError(f"{str(path)!r}: per-layer {arch}.{key} ({value[:4]}...) is not supported")
        return default if value is None else value

    tensors = index.tensors
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
    rotary = do_unpermute or any(k.startswith(f"{arch}.rope.") for k in fields)
    biases = any(f"blk.0.{t}.bias" in tensors for t in ("attn_q", "attn_k", "attn_qkv"))
    info = ModelInfo(name=name or str(fields.get("general.name") or path.stem), source=spec or str(path),
                     format="gguf", architecture=str(arch), n_layers=int(n_layers), n_heads=int(heads),
                     n_kv_heads=int(kv_heads), head_dim=int(head_dim), value_dim=int(value_dim),
                     hidden_size=int(hidden), storage=storage, notes=tuple(notes),
                     score_omits=score_omissions(rotary=rotary, biases=biases))

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

    return WeightSource(info=info, read_layer=read, kind="llm", files=(str(path.resolve()),),
                        options=(("unpermute", do_unpermute),))
