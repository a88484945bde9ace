"""The three critique studies run end to end (quick presets, shrunk further), write config.json, metrics.json,
figures, a report (and dual_form.npz), record the claims they rest on with their known answers (hand controls: SimAOU,
Kendall, Rec2FTP 1; exact GD steps; SimAM_delta undefined at layer 1 only), and are not recomputed once finished."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from iclgd_synth import studies


def _load(path):
    return json.loads((path / "metrics.json").read_text())


def _files_ok(path):
    assert (path / "config.json").exists() and (path / "report.md").exists()
    assert len(list(path.glob("*.png"))) >= 3
    m = _load(path)
    assert m["finished"] is True
    return m


@pytest.mark.slow
def test_order_study_quick_run(tmp_path):
    out = studies.run_study("order", quick=True, root=str(tmp_path), progress=False, n_steps=30, n_tasks=120,
                            tune_tasks=120, n_sweep=(8,), sweep_tasks=120)
    m = _files_ok(out)
    assert m["checks"] and all(c["holds"] for c in m["checks"].values())
    assert m["predictors"]["GD (full batch, 1 step)"]["relative_spread"] < 1e-12
    assert m["predictors"]["SGD (batch 1, 1 epoch)"]["relative_spread"] > 1e-3
    assert "hand GD, causal, 2 layers" in m["references"]
    # The causal hand models use their own tuned eta (equal to GD's for one layer, where the model is one GD step).
    assert m["hand_eta"]["1"] == pytest.approx(m["hand_eta_noncausal_gd"]["1"])
    assert m["predictors"]["hand GD, causal, 2 layers"]["eta"] == pytest.approx(m["hand_eta"]["2"])
    before = (out / "metrics.json").stat().st_mtime_ns
    again = studies.run_study("order", quick=True, root=str(tmp_path), progress=False, n_steps=30, n_tasks=120,
                              tune_tasks=120, n_sweep=(8,), sweep_tasks=120)
    assert again == out and (out / "metrics.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_dual_study_quick_run(tmp_path):
    out = studies.run_study("dual", quick=True, root=str(tmp_path), progress=False, n_steps=30, n_tasks=100,
                            tune_tasks=100, ft_steps=(1,), equivalence_trials=1)
    m = _files_ok(out)
    me = m["momentum_equivalence"]
    for key in ("a1_weighted_gd", "a1_heavy_ball_at_w0", "a2_affine_gd"):
        assert me[key] < 1e-10
    assert max(me["b_heavy_ball_layers"].values()) < 1e-10
    assert m["dual_form"]["hand_block_vs_meta_gradient"] < 1e-12
    assert max(m["dual_form"]["relative_reconstruction_error"].values()) < 1e-10
    # Known answers: for the hand GD layer, adapter fine-tuning by one step of eta is ICL.
    hc = m["icl_vs_ft"]["hand_control"]
    assert hc["simaou"]["mean"] == pytest.approx(1.0, abs=1e-12) and hc["simaou"]["n"] == 100
    assert hc["kendall_signed"]["mean"] == pytest.approx(1.0)
    assert hc["rec2ftp"]["rec2ftp"] == pytest.approx(1.0)
    # SimAM_delta: undefined at layer 1 (the same token with and without demonstrations), defined at layer 2.
    ml = m["simam_delta_multilayer"]["by_steps"]["1"]
    assert ml["max_abs_map_change_icl_vs_zsl"][0] < 1e-12 < ml["max_abs_map_change_icl_vs_zsl"][1]
    assert math.isnan(ml["simam_delta"][0]) and math.isfinite(ml["simam_delta"][1])
    assert math.isnan(ml["simam_delta_random_direction"][0])
    # The exported dual form reproduces every layer's query update of every model from the file alone.
    index = m["dual_form_export"]["models"]
    assert len(index) == len(m["dual_form"]["relative_reconstruction_error"]) + 1  # + the hand GD layer
    with np.load(out / "dual_form.npz") as f:
        for label, v in index.items():
            assert str(f[f"{v['key']}/label"]) == label
            for layer in range(1, v["layers"] + 1):
                e = {k: f[f"{v['key']}/layer{layer}/{k}"] for k in ("w_zsl", "delta_w_icl", "query", "bias",
                                                                     "query_update")}
                rebuilt = np.einsum("bde,be->bd", e["w_zsl"] + e["delta_w_icl"], e["query"]) + e["bias"]
                scale = np.abs(e["query_update"]).max()
                assert scale > 0
                np.testing.assert_allclose(rebuilt, e["query_update"], atol=1e-10 * max(1.0, scale))


@pytest.mark.slow
def test_causal_study_quick_run(tmp_path):
    out = studies.run_study("causal", quick=True, root=str(tmp_path), progress=False, n_steps=30, n_tasks=60,
                            tune_tasks=60, lr_grid=(0.1, 3.0))
    m = _files_ok(out)
    hand = m["hand_control"]["2"]
    assert max(hand["forward_order"]["max_abs_diff"]) < 1e-10
    assert hand["standard"]["rel_distance"][1] > 1e-2
    assert hand["exact_layers"] == {"standard": [1], "layer_causal": [1], "forward_order": [1, 2],
                                    "gd_steps": [1, 2]}
    assert hand["gd_steps"]["simaou"] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert max(hand["gd_steps"]["max_abs_diff"]) < 1e-12
    al = m["models"]["2"]["alignment"]
    assert set(al) == {f"{p}|2|{mode}" for p in ("attention", "adapters")
                       for mode in ("standard", "layer_causal", "forward_order")}
    assert len(m["models"]["2"]["gd_steps"]["simaou"]) == 2
    # The layer-causal count compares layer-causal with standard alone, NaN cells apart.
    std = [v for p in ("attention", "adapters") for v in al[f"{p}|2|standard"]["simaou"]]
    lc = [v for p in ("attention", "adapters") for v in al[f"{p}|2|layer_causal"]["simaou"]]
    c = m["comparisons"]["layer_causal_vs_standard"]["all"]
    assert c["wins"] == sum(1 for a, b in zip(std, lc) if math.isfinite(a) and math.isfinite(b) and b > a + 1e-12)
    assert c["wins"] + c["losses"] + c["ties"] + c["undefined"] == c["cells"] == 4
    assert "SimAM_delta random dir." in (out / "report.md").read_text()


def test_unknown_override_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="unknown override"):
        studies.run_study("order", quick=True, root=str(tmp_path), progress=False, bogus=1)
