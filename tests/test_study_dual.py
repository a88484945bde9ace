"""The ``dual`` study end to end at tiny size: the files it writes, the known answers it rests on (the hand GD layer's
Delta W_ICL is the meta-gradient; adapter fine-tuning of the hand layer is ICL, so SimAOU, Kendall signed and Rec2FTP
read 1; the momentum relations hold to rounding; SimAM_delta is undefined at layer 1 only; the exported dual form
rebuilds every layer's query update), golden values recorded from the study before its port to the protocol, the
combination over seeds, and re-rendering without training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from iclgd_synth.intervals import combine_seeds
from iclgd_synth.studies import dual as S
from iclgd_synth.studies import protocol, run_study
from iclgd_synth.studies.registry import get_study

TINY = ["train.n_steps=20", "train.batch_size=64", "train.chunk_steps=20", "eval_tasks=50", "tune_tasks=50",
        "ft_steps=1", "equivalence_trials=1", "export_tasks=4"]
IQ = S.IQ_LABEL


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_study("dual", quick=True, overrides=TINY, root=tmp_path_factory.mktemp("runs"), progress=False)


@pytest.fixture(scope="module")
def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_writes_config_finished_metrics_report_figures_and_the_dual_form_archive(run_dir, metrics):
    assert metrics["finished"] is True and metrics["study"] == "dual"
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["train"]["n_steps"] == 20 and record["config"]["ft_steps"] == [1]
    for name in ("report.md", "dual_form.png", "momentum_training.png", "simaou.png", "dual_form.npz", "arrays.npz"):
        assert (run_dir / name).exists(), name
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == [f"ckpt_{i}" for i in range(5)]
    assert "## 3. Momentum attention" in (run_dir / "report.md").read_text()


def test_hand_controls_and_exact_relations_read_their_known_answers(metrics):
    me = metrics["momentum_equivalence"]
    for key in ("a1_weighted_gd", "a1_heavy_ball_at_w0", "a2_affine_gd"):
        assert me[key] < 1e-10
    assert max(me["b_heavy_ball_layers"].values()) < 1e-10 and me["a1_distance_to_plain_gd"] > 1e-8
    assert metrics["dual_form"]["hand_block_vs_meta_gradient"] < 1e-12 < metrics["dual_form"]["meta_gradient_scale"]
    assert metrics["dual_form"]["hand_off_block_max"] == 0.0
    assert set(metrics["dual_form"]["relative_reconstruction_error"]) == set(S.DualConfig().quick().models())
    assert max(metrics["dual_form"]["relative_reconstruction_error"].values()) < 1e-10
    # For the hand GD layer, adapter fine-tuning by one step of eta is ICL.
    hc = metrics["icl_vs_ft"]["hand_control"]
    assert hc["simaou"]["mean"] == pytest.approx(1.0, abs=1e-12) and hc["simaou"]["n"] == 50
    assert hc["kendall_signed"]["mean"] == pytest.approx(1.0)
    assert hc["rec2ftp"]["rec2ftp"] == pytest.approx(1.0)
    assert hc["loss"]["ft"] == pytest.approx(hc["loss"]["icl"], rel=1e-12)


def test_simam_delta_is_undefined_at_layer_one_and_defined_at_layer_two(metrics):
    ml = metrics["simam_delta_multilayer"]["by_steps"]["1"]
    assert ml["max_abs_map_change_icl_vs_zsl"][0] < 1e-12 < ml["max_abs_map_change_icl_vs_zsl"][1]
    assert math.isnan(ml["simam_delta"][0]) and math.isfinite(ml["simam_delta"][1])
    assert math.isnan(ml["simam_delta_random_direction"][0])
    assert metrics["icl_vs_ft"]["by_steps"]["1"]["max_abs_map_change_icl_vs_zsl"] < 1e-12


def test_exported_dual_form_rebuilds_every_layer_of_every_model_from_the_file(run_dir, metrics):
    index = metrics["dual_form_export"]["models"]
    assert len(index) == len(metrics["dual_form"]["relative_reconstruction_error"]) + 1  # + the hand GD layer
    with np.load(run_dir / "dual_form.npz") as f:
        assert f["tasks/x"].shape[0] == 4
        for label, v in index.items():
            assert str(f[f"{v['key']}/label"]) == label
            for layer in range(1, v["layers"] + 1):
                e = {k: f[f"{v['key']}/layer{layer}/{k}"] for k in ("w_zsl", "delta_w_icl", "query", "bias",
                                                                     "query_update")}
                rebuilt = np.einsum("bde,be->bd", e["w_zsl"] + e["delta_w_icl"], e["query"]) + e["bias"]
                scale = np.abs(e["query_update"]).max()
                assert scale > 0
                np.testing.assert_allclose(rebuilt, e["query_update"], atol=1e-10 * max(1.0, scale))


def test_golden_values_equal_the_study_before_its_port(metrics):
    # Recorded with the pre-port study (same sizes: 20 steps of 64 tasks, 50 evaluation and tuning tasks, 1 FT step).
    mt = metrics["momentum_training"]["models"]
    assert metrics["gd_eta"] == pytest.approx(6.93388510593425, rel=1e-5)
    assert mt["LSA"]["final_train_loss"] == pytest.approx(0.4124867022037506, rel=1e-5)
    assert mt["LSA + momentum (values, beta 0.5)"]["test_loss"] == pytest.approx(0.32269690342655183, rel=1e-5)
    assert metrics["icl_vs_ft"]["icl_model_loss"] == pytest.approx(0.3228043406122253, rel=1e-5)
    assert metrics["icl_vs_ft"]["by_steps"]["1"]["simaou"]["mean"] == pytest.approx(0.01996764360366434, rel=1e-5)
    assert metrics["icl_vs_ft"]["hand_control"]["rec2ftp"]["n_ft_improves"] == 35


def test_one_seed_intervals_hold_that_seeds_value(metrics):
    assert metrics["seeds"] == [0] and metrics["n_seeds"] == 1
    ci = metrics["ci"]
    assert ci["icl_model_loss"]["n"] == 1 and ci["icl_model_loss"]["mean"] == metrics["icl_vs_ft"]["icl_model_loss"]
    assert math.isnan(ci["icl_model_loss"]["lo"])
    assert ci["icl_vs_ft"]["1"]["simaou"]["mean"] == metrics["icl_vs_ft"]["by_steps"]["1"]["simaou"]["mean"]
    assert ci["momentum_test_loss"][IQ]["values"] == [metrics["momentum_training"]["models"][IQ]["test_loss"]]


def test_report_re_renders_from_metrics_and_arrays_without_training(run_dir):
    before = (run_dir / "report.md").read_text()
    for name in ("report.md", "dual_form.png", "momentum_training.png", "simaou.png"):
        (run_dir / name).unlink()
    protocol.render_run(run_dir)
    assert (run_dir / "report.md").read_text() == before
    assert all((run_dir / name).exists() for name in ("dual_form.png", "momentum_training.png", "simaou.png"))


def test_a_finished_run_is_not_recomputed(run_dir):
    before = (run_dir / "metrics.json").stat().st_mtime_ns
    again = run_study("dual", quick=True, overrides=TINY, root=run_dir.parent, progress=False)
    assert again == run_dir and (run_dir / "metrics.json").stat().st_mtime_ns == before


def test_seeds_combine_as_means_of_floats_sums_of_counts_and_intervals():
    def entry(x, n):
        by = {"1": {key: {"mean": x, "sem": 0.1, "n": n, "n_undefined": 0} for key in S.FT_CI_KEYS}}
        by["1"].update(rec2ftp={"rec2ftp": x, "n_ft_improves": n, "icl_improves_rate": 0.5},
                       loss={"icl": x, "zsl": 1.0, "ft": 2 * x}, simam_delta_defined=False)
        return {"icl_vs_ft": by, "icl_model_loss": x,
                "simam_delta_multilayer": {"1": {"simam_delta": [float("nan"), x], "simaou": [x, x]}},
                "momentum_models": {"LSA": {"final_train_loss": x, "test_loss": x}}}

    seeds = [entry(0.2, 10), entry(0.4, 30)]
    combined = combine_seeds([s["icl_vs_ft"] for s in seeds])["1"]
    assert combined["simaou"]["mean"] == pytest.approx(0.3) and combined["simaou"]["n"] == 40
    assert combined["simam_delta_defined"] is False
    ml = combine_seeds([s["simam_delta_multilayer"] for s in seeds])["1"]
    assert math.isnan(ml["simam_delta"][0]) and ml["simam_delta"][1] == pytest.approx(0.3)
    ci = S._seed_ci(seeds, multilayer=True)
    assert ci["icl_model_loss"]["n"] == 2 and ci["icl_model_loss"]["lo"] < 0.3 < ci["icl_model_loss"]["hi"]
    assert ci["icl_vs_ft"]["1"]["loss_ft"]["mean"] == pytest.approx(0.6)
    assert ci["simam_delta_multilayer"]["1"]["simam_delta"][0]["n"] == 0
    assert ci["momentum_test_loss"]["LSA"]["values"] == [0.2, 0.4]
    # The momentum relations: the worst error over seeds, the smallest distance from plain GD.
    worst = S._worst_relation_errors([{"a1_weighted_gd": 1e-16, "a1_distance_to_plain_gd": 0.1,
                                       "b_heavy_ball_layers": {1: 2e-16}},
                                      {"a1_weighted_gd": 3e-16, "a1_distance_to_plain_gd": 0.05,
                                       "b_heavy_ball_layers": {1: 1e-16}}])
    assert worst == {"a1_weighted_gd": 3e-16, "a1_distance_to_plain_gd": 0.05, "b_heavy_ball_layers": {"1": 2e-16}}


@pytest.mark.parametrize("override, message", [
    ("multilayer_depth=1", "multilayer_depth must be 0"),
    ("train.model.include_query=true", "train.model.include_query must be False"),
    ("beta=1.5", "beta"),
    ("ft_steps=", "ft_steps must hold"),
])
def test_the_config_rejects_bad_values_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        get_study("dual").make_config(quick=True, overrides=[override])
