"""Hugging Face checkpoints: a folder of safetensors files (sharded or not) with its config.json, or one file.

Supported tensor layouts (any name prefix, e.g. ``model.``, ``transformer.``, ``bert.``):

    llama  (LLaMA, Mistral, Qwen, SmolLM, ...)  layers.L.self_attn.{q,k,v,o}_proj.weight         nn.Linear (out, in)
    gpt2                                          h.L.attn.c_attn.weight (fused q|k|v), c_proj.weight  Conv1D (in, out)
    bert   (BERT, MiniLM, RoBERTa, ...)           encoder.layer.L.attention.self.{query,key,value}.weight,
                                                  encoder.layer.L.attention.output.dense.weight  nn.Linear (out, in)

Head counts come from config.json (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``; GPT-2's
``n_head``) or from the ``n_heads`` / ``n_kv_heads`` arguments; the per-head sizes follow from the tensor shapes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from iclgd_synth.weights.checkpoint import (
    INSTALL_WEIGHTS, LayerWeights, ModelInfo, WeightSource, check_layer_shapes, require, score_omissions,
    split_heads_cols, split_heads_rows,
)

#: layout -> (tensor-name pattern, {name part: role}); roles q, k, v, o, or qkv (fused).
LAYOUTS = {
    "llama": (re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.self_attn\."
                         r"(?P<part>q_proj|k_proj|v_proj|o_proj)\.weight$"),
              {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}),
    "gpt2": (re.compile(r"^(?P<prefix>(?:.*\.)?)h\.(?P<layer>\d+)\.attn\.(?P<part>c_attn|c_proj)\.weight$"),
             {"c_attn": "qkv", "c_proj": "o"}),
    "bert": (re.compile(r"^(?P<prefix>(?:.*\.)?)encoder\.layer\.(?P<layer>\d+)\.attention\."
                        r"(?P<part>self\.query|self\.key|self\.value|output\.dense)\.weight$"),
             {"self.query": "q", "self.key": "k", "self.value": "v", "output.dense": "o"}),
}


def open_hf(path: str | Path, *, spec: str | None = None, name: str | None = None, n_heads: int | None = None,
            n_kv_heads: int | None = None) -> WeightSource:
    """Open a Hugging Face folder (or one .safetensors file, config.json looked up beside it)."""
    safetensors = require("safetensors", "safetensors", INSTALL_WEIGHTS, "to read safetensors checkpoints")
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = _files(path)
    where = _tensor_files(safetensors, files)
    layout, prefix, n_layers = _detect_layout(where, path)
    pattern_parts = LAYOUTS[layout][1]
    names = {role: part for part, role in pattern_parts.items()}
    config = _config(folder)

    def tname(i: int, role: str) -> str:
        stem = {"llama": f"layers.{i}.self_attn.", "gpt2": f"h.{i}.attn.",
                "bert": f"encoder.layer.{i}.attention."}[layout]
        return f"{prefix}{stem}{names[role]}.weight"

    def shape_dtype(tn: str) -> tuple[tuple[int, ...], str]:
        with safetensors.safe_open(str(where[tn]), framework="numpy") as f:
            s = f.get_slice(tn)
            return tuple(int(x) for x in s.get_shape()), str(s.get_dtype())

    heads = n_heads or config.get("num_attention_heads") or config.get("n_head") or config.get("num_heads")
    if heads is None:
        raise ValueError(f"cannot tell the number of attention heads of {str(path)!r}: no config.json with "
                         "num_attention_heads beside it; pass n_heads (CLI: --n-heads)")
    heads = int(heads)
    kv_heads = int(n_kv_heads or config.get("num_key_value_heads") or heads)
    notes = []
    if layout == "gpt2":
        (r, c), storage = shape_dtype(tname(0, "qkv"))
        conv1d = c == 3 * r
        hidden = r if conv1d else c
        head_dim = value_dim = hidden // heads
        if conv1d:
            notes.append("GPT-2 Conv1D weights (in, out) transposed to (out, in); fused c_attn split into q, k, v")
    else:
        (q_rows, hidden), storage = shape_dtype(tname(0, "q"))
        (v_rows, _), _ = shape_dtype(tname(0, "v"))
        head_dim, value_dim = q_rows // heads, v_rows // kv_heads
    cfg_hidden = config.get("hidden_size") or config.get("n_embd")
    if cfg_hidden is not None and int(cfg_hidden) != hidden:
        raise ValueError(f"{str(path)!r}: config.json says hidden size {cfg_hidden} but the attention weights have "
                         f"{hidden} input columns")
    if storage != "F32":
        notes.append(f"stored as {storage}, read as float32")
    display = name or str(config.get("_name_or_path") or folder.name).rstrip("/").split("/")[-1]
    # LLaMA-layout models (LLaMA, Mistral, Qwen, SmolLM, ...) all use rotary positions; GPT-2 and BERT add learned
    # absolute position embeddings to the hidden state instead, unless the config says otherwise
    rotary = (layout == "llama" or config.get("position_embedding_type") == "rotary"
              or any(k in config for k in ("rope_theta", "rotary_dim", "rope_scaling")))
    biases = any(tname(0, r).removesuffix(".weight") + ".bias" in where for r in (("qkv",) if layout == "gpt2"
                                                                                   else ("q", "k")))
    info = ModelInfo(name=display, source=spec or str(path), format="safetensors", architecture=layout,
                     n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=int(head_dim),
                     value_dim=int(value_dim), hidden_size=int(hidden), storage=storage, notes=tuple(notes),
                     score_omits=score_omissions(rotary=rotary, biases=biases))

    def load(tn: str) -> np.ndarray:
        with safetensors.safe_open(str(where[tn]), framework="numpy") as f:
            return np.asarray(f.get_tensor(tn)).astype(np.float32)

    def read(i: int) -> LayerWeights:
        if layout == "gpt2":
            qkv, o = load(tname(i, "qkv")), load(tname(i, "o"))
            if qkv.shape[1] == 3 * qkv.shape[0]:  # Conv1D stores (in, out)
                qkv, o = qkv.T, o.T
            e = info.hidden_size
            q, k, v = qkv[:e], qkv[e:2 * e], qkv[2 * e:]
        else:
            q, k, v, o = (load(tname(i, r)) for r in "qkvo")
        check_layer_shapes(i, {"q": q.shape, "k": k.shape, "v": v.shape, "o": o.shape}, info.n_heads,
                           info.n_kv_heads, info.head_dim, info.value_dim, info.hidden_size)
        return LayerWeights(i, split_heads_rows(q, info.n_heads, "q"), split_heads_rows(k, info.n_kv_heads, "k"),
                            split_heads_rows(v, info.n_kv_heads, "v"), split_heads_cols(o, info.n_heads, "o"))

    config_file = [str((folder / "config.json").resolve())] if (folder / "config.json").exists() else []
    return WeightSource(info=info, read_layer=read, kind="llm",
                        files=tuple(sorted({str(f.resolve()) for f in files} | set(config_file))))


def _files(path: Path) -> list[Path]:
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_files(path)
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        return _index_files(index[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {str(path)!r}")
    return files


def _index_files(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{str(index)!r} lists shards that are missing: {', '.join(missing[:3])}")
    return files


def _tensor_files(safetensors, files: list[Path]) -> dict[str, Path]:
    where = {}
    for f in files:
        try:
            with safetensors.safe_open(str(f), framework="numpy") as h:
                for k in h.keys():
                    where[k] = f
        except Exception as e:  # SafetensorError (header too small, invalid JSON, ...) and OS errors
            raise ValueError(f"{str(f)!r} is not a readable safetensors file ({type(e).__name__}: {e}); check that "
                             "it is complete (a download cut short leaves a truncated file)") from e
    return where


def _detect_layout(where: dict[str, Path], path: Path) -> tuple[str, str, int]:
    """(layout, name prefix, number of layers) of the best-matching layout: the one with the most complete layers."""
    found: dict[tuple[str, str], dict[int, set]] = defaultdict(lambda: defaultdict(set))
    for tn in where:
        for layout, (pattern, parts) in LAYOUTS.items():
            m = pattern.match(tn)
            if m:
                found[(layout, m["prefix"])][int(m["layer"])].add(parts[m["part"]])
    best = None
    for (layout, prefix), layers in found.items():
        need = set(LAYOUTS[layout][1].values())
        n = 0
        while n in layers and layers[n] >= need:
            n += 1
        key = (n, -len(prefix))
        if n and (best is None or key > best[0]):
            best = (key, layout, prefix, n)
    if best is None:
        examples = ", ".join(sorted(where)[:6])
        raise ValueError(f"unknown tensor layout in {str(path)!r}: no complete attention layer in the LLaMA "
                         "(layers.L.self_attn.q_proj...), GPT-2 (h.L.attn.c_attn...) or BERT "
                         f"(encoder.layer.L.attention.self.query...) naming; tensors found include: {examples}")
    return best[1], best[2], best[3]


def _config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.exists():
        return {}
    config = json.loads(cfg.read_text())
    # Multimodal / wrapper configs keep the language model's settings in a sub-config.
    for sub in ("text_config", "language_config"):
        if isinstance(config.get(sub), dict) and "num_attention_heads" not in config:
            merged = dict(config[sub])
            merged.setdefault("_name_or_path", config.get("_name_or_path"))
            return merged
    return config
