"""Study runs: the main job's run directory, its metrics and report, and no recomputation of finished runs."""

import json

import pytest

from iclgd_synth.studies import PRESETS, STUDIES, run_study

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
