"""The three critique studies run end to end (quick presets, shrunk further), write config.json, metrics.json,
figures and a report, record the claims they rest on, and are not recomputed once finished."""

from __future__ import annotations

import json

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
    r = m["icl_vs_ft"]["by_steps"]["1"]
    assert -1.0 <= r["simaou"]["mean"] <= 1.0


@pytest.mark.slow
def test_causal_study_quick_run(tmp_path):
    out = studies.run_study("causal", quick=True, root=str(tmp_path), progress=False, n_steps=30, n_tasks=60,
                            tune_tasks=60, lr_grid=(0.1, 3.0))
    m = _files_ok(out)
    hand = m["hand_control"]["2"]
    assert max(hand["forward_order"]["max_abs_diff"]) < 1e-10
    assert hand["standard"]["rel_distance"][1] > 1e-2
    assert set(m["models"]["2"]["alignment"]) == {f"{p}|2|{mode}" for p in ("attention", "adapters")
                                                  for mode in ("standard", "layer_causal", "forward_order")}


def test_unknown_override_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="unknown override"):
        studies.run_study("order", quick=True, root=str(tmp_path), progress=False, bogus=1)
