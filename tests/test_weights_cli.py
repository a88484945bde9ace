"""The ``iclgd weights`` command and the library report on tiny checkpoints (and on SmolLM2's first layers when the
optional package is installed)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from iclgd_synth import gd_params
from iclgd_synth.weights import collect_stats, command, loaders, report, weights_report
from iclgd_synth.weights.report import fmt, summary_table
from iclgd_synth.weights.resemblance import SUMMARY_ROWS
from iclgd_synth.weights.sources import synthetic_source
from conftest import require_builtin


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def run_cli(argv: list[str]) -> int:
    return command.main(parse(argv))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch, weights_store_kept):
    """Statistics computed here are cached in the test's own folder, never in the user's cache (the weight store
    stays shared, so the built-in weights are not fetched again per test)."""
    monkeypatch.setenv("ICLGD_CACHE", str(tmp_path / "stats-cache"))


@pytest.fixture
def tiny_llama(tmp_path):
    """A 2-layer LLaMA-layout Hugging Face folder with grouped-query attention (4 heads, 2 key/value heads)."""
    sf = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    e, h, g, hd = 16, 4, 2, 4
    tensors = {}
    for i in range(2):
        for name, shape in (("q_proj", (h * hd, e)), ("k_proj", (g * hd, e)), ("v_proj", (g * hd, e)),
                            ("o_proj", (e, h * hd))):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = (0.1 * rng.standard_normal(shape)).astype(
                np.float32)
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    sf.save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": h, "num_key_value_heads": g,
                                                    "hidden_size": e}))
    return folder


def test_cli_writes_json_report_and_figures(tiny_llama, tmp_path, capsys):
    out = tmp_path / "report"
    rc = run_cli(["--llm", str(tiny_llama), "--out", str(out), "--no-trained", "--hand-dims", "11", "--quiet"])
    assert rc == 0
    data = json.loads((out / "weight_stats.json").read_text())
    assert set(data["sources"]) == {"tiny-llama", "hand GD D=11", "hand GD++ D=11"}
    llm = data["sources"]["tiny-llama"]
    assert llm["layers_read"] == 2 and llm["info"]["n_kv_heads"] == 2
    # per layer: 4 whole-layer matrices, 4 + 2 + 2 + 4 head slices, 2 x 4 per-head products
    assert len(llm["matrices"]) == 2 * (4 + 12 + 8)
    assert llm["matrices"][0]["matrix"] == "W_Q" and "stable_rank/n" in llm["matrices"][0]["stats"]
    # W_Q and W_O are 16 x 16 here, but symmetry & co. belong to the per-head products only, everywhere
    for s in data["sources"].values():
        for m in s["matrices"]:
            assert ("symmetry" in m["stats"]) == (m["matrix"] in ("W_K^T W_Q", "W_O W_V")), m["matrix"]
    assert all(r["stat"] != "cos_I" or r["matrix"] in ("W_K^T W_Q", "W_O W_V") for r in data["resemblance"])
    assert "rotary" in llm["info"]["score_omits"]
    assert len(data["summary"]) == len(SUMMARY_ROWS)
    assert data["trained"] == "left out (--no-trained)"
    assert [r["P_yy"] for r in data["n_dependence"]["rows"]][:2] == pytest.approx([6.0, 3.0])
    md = (out / "report.md").read_text()
    assert "## Summary" in md and "hand GD++ D=11" in md and "### `kurtosis`" in md
    assert "leaves out of its attention score: tiny-llama (llama): the rotary position rotation (it is" in md
    assert "log10(|w| / RMS(W))" in md and "tiny-llama layers 0 and 1, head 0" in md
    for png in ("magnitudes", "small_fraction", "spectra", "kq_heatmaps", "ov_heatmaps", "n_dependence"):
        assert (out / f"{png}.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| matrix | statistic |" in printed and "done in" in printed


def test_llm_option_takes_several_names_and_defaults_to_the_installed_builtins(monkeypatch, tmp_path):
    assert parse(["--out", "o", "--llm", "smollm2", "minilm"]).llm == ["smollm2", "minilm"]
    assert parse(["--out", "o", "--llm", "smollm2", "--llm", "x/y"]).llm == ["smollm2", "x/y"]
    assert parse(["--out", "o", "--llm", "smollm2"]).llm == ["smollm2"]  # only SmolLM2
    args = parse(["--out", "o"])
    assert args.llm is None and not args.no_unpermute and not args.no_cache
    assert command.default_llms(["minilm"]) == ["minilm"]
    monkeypatch.setattr(loaders, "installed_builtins", lambda: ["smollm2", "minilm"])
    assert command.default_llms(None) == ["smollm2", "minilm"]
    monkeypatch.setattr(loaders, "installed_builtins", lambda: [])
    with pytest.raises(ModuleNotFoundError, match="--llm PATH"):
        command.default_llms(None)


def test_head_counts_and_unpermute_reach_path_sources_but_not_builtins(monkeypatch, tmp_path, tiny_llama):
    calls = []

    def fake_open(source, **kwargs):
        calls.append((str(source), kwargs))
        return synthetic_source(n_layers=1, hidden=16, n_heads=4, n_kv_heads=2)

    monkeypatch.setattr(report, "open_source", fake_open)
    monkeypatch.setattr(report, "collect_stats", lambda s, **kw: collect_stats(s, progress=False, cache=False))
    rc = run_cli(["--llm", "smollm2", str(tiny_llama), "--n-heads", "4", "--n-kv-heads", "2", "--no-unpermute",
                  "--out", str(tmp_path / "o"), "--no-trained", "--hand-dims", "11", "--no-figures", "--quiet"])
    assert rc == 0
    assert calls[0] == ("smollm2", {"max_layers": None, "unpermute": False})
    assert calls[1] == (str(tiny_llama), {"max_layers": None, "unpermute": False, "n_heads": 4, "n_kv_heads": 2})


def test_cli_n_heads_with_a_builtin_and_a_path(tiny_llama, tmp_path):
    """--n-heads 4 fits the tiny checkpoint; applied to MiniLM (12 heads) it would be an error."""
    require_builtin("minilm")
    out = tmp_path / "o"
    rc = run_cli(["--llm", "minilm", str(tiny_llama), "--n-heads", "4", "--n-kv-heads", "2", "--max-layers", "1",
                  "--out", str(out), "--no-trained", "--hand-dims", "11", "--no-figures", "--quiet"])
    assert rc == 0
    heads = {n: s["info"]["n_heads"] for n, s in json.loads((out / "weight_stats.json").read_text())["sources"].items()
             if s["kind"] == "llm"}
    assert heads == {"all-MiniLM-L6-v2": 12, "tiny-llama": 4}


def test_cli_accepts_trained_params_npz(tiny_llama, tmp_path):
    p = gd_params(10, 1.0, n_context=10).layers[0]
    np.savez(tmp_path / "trained.npz", **{k: np.asarray(p[k]) * 1.1 for k in ("w_q", "w_k", "w_v", "w_p")})
    out = tmp_path / "r"
    rc = run_cli(["--llm", str(tiny_llama), "--out", str(out), "--trained-params", str(tmp_path / "trained.npz"),
                  "--hand-dims", "11", "--no-figures", "--quiet"])
    assert rc == 0
    data = json.loads((out / "weight_stats.json").read_text())
    assert data["sources"]["trained LSA"]["kind"] == "trained"
    row = next(r for r in data["summary"] if (r["matrix"], r["stat"]) == ("W_K^T W_Q", "cos_I"))
    assert row["sources"]["trained LSA"]["value"] == pytest.approx(np.sqrt(10 / 11), rel=1e-6)
    assert not (out / "spectra.png").exists()


def test_cli_reports_missing_checkpoint_and_bad_npz(tmp_path, capsys):
    assert run_cli(["--llm", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-trained",
                    "--quiet"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", w_q=np.zeros((1, 2, 2)))
    assert run_cli(["--llm", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--trained-params",
                    str(tmp_path / "bad.npz"), "--quiet"]) == 2
    assert "lacks arrays" in capsys.readouterr().err


def test_library_report_with_in_memory_sources(tmp_path):
    llm = synthetic_source(n_layers=2, hidden=24, n_heads=2, n_kv_heads=1)
    trained = gd_params(10, 1.0, n_context=10)
    result = weights_report([llm], tmp_path, trained, trained_note="hand weights standing in", hand=[("gd", 11)],
                            figures=False, progress=False)
    assert set(result["stats"]) == {llm.name, "hand GD D=11", "trained LSA"}
    counts = result["inside_counts"]["hand GD D=11"][llm.name]
    assert counts[1] == len(SUMMARY_ROWS) and counts[0] <= 3
    assert result["summary_markdown"].count("\n") == len(SUMMARY_ROWS) + 2
    with pytest.raises(ValueError, match="at least one LLM"):
        weights_report([], tmp_path)


def test_table_formatting():
    assert fmt(float("nan")) == "n/a" and fmt(0.9997) == "0.999700" and fmt(1 - 6e-8) == "1-6.00e-08"
    assert fmt(1.5e-5) == "1.50e-05" and fmt(1 - 5e-16) == "1" and fmt(-1 - 5e-16) == "-1"
    assert fmt(7.19) == "7.19" and fmt(-1.162) == "-1.162" and fmt(4092.0) == "4092" and fmt(3.3e5) == "3.30e+05"
    assert fmt(float("inf")) == "+inf" and fmt(0) == "0" and fmt(0.25) == "0.25"
    rows = [{"matrix": "W_Q", "stat": "zero", "llm": {"A": {"n": 3, "p1": 0.0, "p99": 0.1}},
             "sources": {"h": {"value": 0.9, "positions": {"A": {"inside": False, "percentile": 100.0, "z": 9.0}}}}}]
    table = summary_table(rows, ["A"], ["h"])
    assert "| W_Q | zero | [0, 0.1] | 0.9 ✗ |" in table and "0/1" in table


def test_dispatcher_registers_the_weights_command(tmp_path):
    cli = pytest.importorskip("iclgd_synth.cli")
    try:
        parser = cli.build_parser()
    except ModuleNotFoundError as e:  # another sub-command's module is not there yet
        pytest.skip(f"the dispatcher cannot load every sub-command: {e}")
    args = parser.parse_args(["weights", "--out", str(tmp_path), "--no-trained"])
    assert args._module == "iclgd_synth.weights.command" and args.llm is None and args.hand_dims == [11, 576, 4096]


def test_smollm2_first_two_layers_end_to_end(tmp_path):
    require_builtin("smollm2")
    result = weights_report(["smollm2"], tmp_path, hand=[("gd", 11)], max_layers=2, figures=False, progress=False)
    smol = result["stats"]["SmolLM2-135M-Instruct"]
    assert "zero relative offset" in smol.info.score_omits
    assert smol.n_layers == 2
    assert len(smol.values("W_K^T W_Q", "symmetry")) == 2 * 9
    # real weights: dense, Gaussian-ish, no preference for the identity; the hand weights are outside on these
    assert smol.value("W_Q", "zero") < 0.01
    assert abs(smol.value("W_K^T W_Q", "cos_I")) < 0.2
    row = next(r for r in result["summary"] if (r["matrix"], r["stat"]) == ("W_K^T W_Q", "cos_I"))
    assert row["sources"]["hand GD D=11"]["positions"]["SmolLM2-135M-Instruct"]["inside"] is False
