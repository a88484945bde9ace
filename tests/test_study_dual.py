"""The ``dual`` study end to end at tiny size (2 seeds): the files it writes, the known answers it rests on (the hand
GD layer's Delta W_ICL is the meta-gradient; adapter fine-tuning of the hand layer is ICL, so SimAOU, Kendall signed
and Rec2FTP read 1 and beat every null; the momentum relations hold to rounding; SimAM_delta is undefined and SimAM
before fine-tuning is 1 at layer 1 only; the exported dual form rebuilds every layer's query update), the headline
metrics against their nulls seed by seed, golden values, the combination over seeds with paired tests, and
re-rendering without training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from iclgd_synth.intervals import combine_seeds, paired_test
from iclgd_synth.studies import dual as S
from iclgd_synth.studies import protocol, run_study
from iclgd_synth.studies.registry import get_study

TINY = ["train.n_steps=20", "train.batch_size=64", "train.chunk_steps=20", "eval_tasks=50", "tune_tasks=50",
        "ft_steps=1", "equivalence_trials=1", "export_tasks=4", "vector_out_dim=2", "ft_lr_points=7"]
IQ = S.IQ_LABEL
#: Recorded from this study at TINY size (see test_golden_values).
GOLDEN = {"gd_eta": 4.766305492106715, "lsa_final_train_loss": 0.42090630531311035,
          "icl_model_loss": 0.26115760768334045, "simaou_ft": [0.13120373116978476, 0.18277757966420943],
          "kendall_signed_seq": [0.2657777777777778, 0.2533333333333333],
          "rec2ftp_expected": [0.43333333333333324, 0.5538461538461539], "hand_n_ft_improves": 33}


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
    assert record["config"]["sequential_passes"] == [1] and record["config"]["vector_out_dim"] == 2
    for name in ("report.md", "dual_form.png", "momentum_training.png", "simaou.png", "dual_form.npz", "arrays.npz"):
        assert (run_dir / name).exists(), name
    assert sorted(p.name for p in run_dir.glob("ckpt_*")) == [f"ckpt_{i}" for i in range(6)]
    report = (run_dir / "report.md").read_text()
    for heading in ("## 3. Momentum attention", "(implementation check: true by construction)", "(findings)",
                    "### sequential SGD, 1 pass (paper's protocol)", "### Vector outputs (d_out = 2)",
                    "query-independent bias, not momentum"):
        assert heading in report, heading


def test_hand_controls_and_exact_relations_read_their_known_answers(metrics):
    me = metrics["momentum_equivalence"]
    for key in ("a1_weighted_gd", "a1_heavy_ball_at_w0", "a2_affine_gd"):
        assert me[key] < 1e-10
    assert max(me["b_heavy_ball_layers"].values()) < 1e-10 and me["a1_distance_to_plain_gd"] > 1e-8
    assert metrics["dual_form"]["hand_block_vs_meta_gradient"] < 1e-12 < metrics["dual_form"]["meta_gradient_scale"]
    assert metrics["dual_form"]["hand_off_block_max"] == 0.0
    assert set(metrics["dual_form"]["relative_reconstruction_error"]) == set(
        get_study("dual").make_config(quick=True, overrides=TINY).models())
    assert max(metrics["dual_form"]["relative_reconstruction_error"].values()) < 1e-10
    # For the hand GD layer, adapter fine-tuning by one step of eta is ICL.
    hc = metrics["icl_vs_ft"]["hand_control"]
    assert hc["simaou"]["mean"] == pytest.approx(1.0, abs=1e-12) and hc["simaou"]["n"] == 50
    assert hc["kendall_signed"]["mean"] == pytest.approx(1.0)
    assert hc["rec2ftp"]["rec2ftp"] == pytest.approx(1.0)
    assert hc["loss"]["ft"] == pytest.approx(hc["loss"]["icl"], rel=1e-12)
    # Fine-tuning that is ICL beats every null of SimAOU and Kendall (measured: the nulls are below 1).
    for name, null in hc["nulls"].items():
        for metric in ("simaou", "simaou_unnormalised", "kendall_signed"):
            if metric in null:
                assert null[metric]["mean"] < 1.0 - 1e-3, (name, metric)


def test_simam_delta_is_undefined_at_layer_one_and_defined_at_layer_two(metrics):
    for variant in ("1", "seq1"):
        ml = metrics["simam_delta_multilayer"]["by_steps"][variant]
        assert ml["max_abs_map_change_icl_vs_zsl"][0] < 1e-12 < ml["max_abs_map_change_icl_vs_zsl"][1]
        assert math.isnan(ml["simam_delta"][0]) and math.isfinite(ml["simam_delta"][1])
        assert math.isnan(ml["simam_delta_random_direction"][0])
        # Dai's SimAM before fine-tuning is 1 at layer 1 by construction (same token), not beyond.
        assert ml["simam_before"][0] == pytest.approx(1.0, abs=1e-12) and ml["simam_before"][1] < 1.0 - 1e-12
        assert metrics["icl_vs_ft"]["by_steps"][variant]["simam"]["before"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["icl_vs_ft"]["by_steps"]["1"]["max_abs_map_change_icl_vs_zsl"] < 1e-12


def test_exported_dual_form_rebuilds_every_layer_of_every_model_from_the_file(run_dir, metrics):
    index = metrics["dual_form_export"]["models"]
    # Every model but the vector-output one (another token width), and the hand GD layer.
    assert len(index) == len(metrics["dual_form"]["relative_reconstruction_error"])
    assert not any("d_out" in label for label in index)
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


def test_headline_metrics_beat_the_nulls_they_should_seed_by_seed(metrics):
    # Kendall ranks demonstrations like FT's influences, above the shuffled influences, the untrained model and
    # ridge's leave-one-out influences, in each seed and both protocols (measured: any of these can fail). SimAOU is
    # not asserted to beat its nulls: at this size it does not beat even the random direction in every seed.
    for variant, cell in metrics["headline"]["icl_vs_ft"].items():
        for metric in ("kendall_signed", "kendall_abs"):
            ft = cell[metric]["FT"]["values"]
            for null in ("shuffled", "untrained model (same protocol)", "ridge"):
                assert all(a > b for a, b in zip(ft, cell[metric][null]["values"])), (variant, metric, null)
    # The paired test over seeds is the difference of the per-seed values.
    cell = metrics["headline"]["icl_vs_ft"]["1"]["simaou"]
    diffs = [a - b for a, b in zip(cell["FT"]["values"], cell["ridge"]["values"])]
    assert cell["ridge"]["ft_minus"]["mean"] == pytest.approx(sum(diffs) / len(diffs))
    # A learner that always improves (ridge on noiseless tasks with N >= d) has ICL's unconditional rate as Rec2FTP.
    rec = metrics["headline"]["icl_vs_ft"]["1"]["rec2ftp"]
    assert rec["ridge"]["values"] == pytest.approx(rec["ICL improves (all tasks)"]["values"])


def test_golden_values(metrics):
    # Recorded from this study at this size (20 steps of 64 tasks, 50 evaluation and tuning tasks, seeds 0 and 1).
    mt = metrics["momentum_training"]["models"]
    head = metrics["headline"]["icl_vs_ft"]
    assert metrics["gd_eta"] == pytest.approx(GOLDEN["gd_eta"], rel=1e-5)
    assert mt["LSA"]["final_train_loss"] == pytest.approx(GOLDEN["lsa_final_train_loss"], rel=1e-5)
    assert metrics["icl_vs_ft"]["icl_model_loss"] == pytest.approx(GOLDEN["icl_model_loss"], rel=1e-5)
    assert head["1"]["simaou"]["FT"]["values"] == pytest.approx(GOLDEN["simaou_ft"], rel=1e-5)
    assert head["seq1"]["kendall_signed"]["FT"]["values"] == pytest.approx(GOLDEN["kendall_signed_seq"], rel=1e-5)
    assert head["1"]["rec2ftp"]["selection-corrected expected"]["values"] == pytest.approx(
        GOLDEN["rec2ftp_expected"], rel=1e-5)
    assert metrics["icl_vs_ft"]["hand_control"]["rec2ftp"]["n_ft_improves"] == GOLDEN["hand_n_ft_improves"]


def test_two_seeds_give_intervals_and_per_seed_values(metrics):
    assert metrics["seeds"] == [0, 1] and metrics["n_seeds"] == 2
    ci = metrics["ci"]
    assert ci["icl_model_loss"]["n"] == 2
    assert ci["icl_model_loss"]["lo"] <= metrics["icl_vs_ft"]["icl_model_loss"] <= ci["icl_model_loss"]["hi"]
    mt = metrics["momentum_training"]["models"]
    assert ci["momentum_test_loss"][IQ]["mean"] == pytest.approx(mt[IQ]["test_loss"])
    head = metrics["headline"]["icl_vs_ft_vector"]["1"]
    assert head["simaou"]["FT"]["n"] == 2 and all(math.isfinite(v) for v in head["simaou"]["FT"]["values"])
    assert metrics["icl_vs_ft_vector"]["out_dim"] == 2


def test_each_seed_evaluation_is_kept_for_resuming_and_feeds_the_headline(run_dir, metrics):
    from iclgd_synth.critiques.dual import headline_numbers

    for i, seed in enumerate(metrics["seeds"]):
        entry = json.loads((run_dir / f"eval_seed{seed}.json").read_text())
        h = headline_numbers(entry["icl_vs_ft"]["seq1"])
        assert metrics["headline"]["icl_vs_ft"]["seq1"]["kendall_abs"]["FT"]["values"][i] == h["kendall_abs"]["FT"]
        un = headline_numbers(entry["icl_vs_ft_untrained"]["1"])["simaou"]["FT"]
        assert metrics["headline"]["icl_vs_ft"]["1"]["simaou"]["untrained model (same protocol)"]["values"][i] == un


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


def _fake_icl_vs_ft(x: float) -> dict:
    """The fields of one icl_vs_ft result that the headline reads, FT at x and the nulls below it."""
    summ = {"mean": x, "sem": 0.1, "n": 10, "n_undefined": 0}
    rec = {"rec2ftp": x, "n_ft_improves": 5, "icl_improves_rate": 0.5, "expected": 0.4, "excess": x - 0.4}
    return {"simaou": summ, "simaou_unnormalised": summ, "kendall_abs": summ, "kendall_signed": summ, "rec2ftp": rec,
            "nulls": {"random direction": {"simaou": {**summ, "mean": x / 2}, "simaou_unnormalised": summ,
                                           "rec2ftp": {**rec, "rec2ftp": 0.5}},
                      "shuffled": {"kendall_abs": {**summ, "mean": 0.0}, "kendall_signed": {**summ, "mean": 0.0}}},
            "y_energy_fraction": {"icl": summ, "ft": summ}, "simam": {"before": 1.0, "after": x},
            "loss": {"icl": x, "zsl": 1.0, "ft": 2 * x}}


def test_seeds_combine_as_means_of_floats_sums_of_counts_and_intervals():
    seeds = [{"icl_vs_ft": {"1": _fake_icl_vs_ft(x)}, "icl_vs_ft_untrained": {"1": _fake_icl_vs_ft(0.1)},
              "icl_model_loss": x, "simam_delta_multilayer": {"1": {
                  k: [float("nan"), x] for k in ("simam_delta", "simaou", "simam_before", "simam_after",
                                                 "simam_after_random_direction")}},
              "momentum_models": {"LSA": {"final_train_loss": x, "test_loss": x}}} for x in (0.2, 0.4, 0.9)]
    combined = combine_seeds([s["icl_vs_ft"] for s in seeds])["1"]
    assert combined["simaou"]["mean"] == pytest.approx(0.5) and combined["simaou"]["n"] == 30
    ci = S._seed_ci(seeds, multilayer=True)
    assert ci["icl_model_loss"]["n"] == 3 and ci["icl_model_loss"]["lo"] < 0.5 < ci["icl_model_loss"]["hi"]
    assert ci["icl_vs_ft"]["1"]["loss_ft"]["mean"] == pytest.approx(1.0)
    assert ci["simam_delta_multilayer"]["1"]["simam_delta"][0]["n"] == 0
    assert ci["momentum_test_loss"]["LSA"]["values"] == [0.2, 0.4, 0.9]
    head = S._headline_ci(seeds)["icl_vs_ft"]["1"]
    assert head["simaou"]["FT"]["values"] == [0.2, 0.4, 0.9]
    assert head["simaou"]["random direction"]["ft_minus"]["mean"] == pytest.approx(0.25)
    assert head["simaou"]["untrained model (same protocol)"]["values"] == [0.1, 0.1, 0.1]
    against_zero = head["kendall_signed"]["shuffled"]["ft_minus"]  # 0.2, 0.4, 0.9 against 0
    assert against_zero["mean"] == pytest.approx(0.5) and against_zero["p"] == pytest.approx(
        paired_test([0.2, 0.4, 0.9], [0.0, 0.0, 0.0])["p"])
    assert head["rec2ftp"]["selection-corrected expected"]["values"] == [0.4, 0.4, 0.4]
    assert "ft_minus" not in head["simaou"]["FT"]
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
    ("vector_out_dim=1", "vector_out_dim must be 0"),
    ("sequential_passes=0", "sequential_passes"),
    ("rec2ftp_bins=0", "rec2ftp_bins"),
])
def test_the_config_rejects_bad_values_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        get_study("dual").make_config(quick=True, overrides=[override])
