"""The study protocol on the training studies: the main job end to end (its run directory, metrics, report and
golden numbers), every other training preset at tiny size with golden numbers, overrides and seeds, re-rendering a
report without recomputing, a forced recomputation that keeps the old results until the new ones are complete, the
expectations table and the benchmark's quick mode."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from iclgd_synth import config as cfg
from iclgd_synth import metrics as M
from iclgd_synth.reports.expectations import EXPECTATIONS, expectation_rows
from iclgd_synth.studies import protocol, run_study
from iclgd_synth.studies.registry import STUDIES, describe, get_study

MAIN_KEYS = ("gd_eta", "gd_loss", "trained_loss", "hand_loss", "preds_diff", "model_cos", "model_diff",
             "interpolated_loss", "train_seconds")

#: Recorded with the study protocol's code (same quick preset, same seeds) when the random streams became per-task
#: ``fold_in`` keys under a fixed threefry mode (iclgd_synth.rng); every later change must keep every number.
#: Quick vonoswald: 300 steps of 512 tasks, 1000 tuning and 1000 held-out tasks.
MAIN_GOLDEN = {"gd_eta": 6.386718028722276, "gd_loss": 0.2027796357870102, "trained_loss": 0.24041756987571716,
               "model_cos": 0.8941704360339613, "preds_diff": 0.22611531615257263, "kq_cos": 0.8927959847776707}


@pytest.fixture(scope="module")
def quick_main_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return run_study("vonoswald", quick=True, root=str(root), progress=False)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_main_job_writes_config_metrics_figures_and_report(quick_main_run):
    out = quick_main_run
    for name in ("config.json", "metrics.json", "report.md", "loss_lsa.png", "weights_lsa.png", "ood.png",
                 "metrics_lsa.png", "arrays.npz"):
        assert (out / name).exists(), name
    metrics = _metrics(out)
    assert metrics["finished"] is True and metrics["study"] == "vonoswald"
    for key in MAIN_KEYS:
        assert isinstance(metrics[key], float), key
    # The hand-constructed weights are GD: same loss on the same held-out tasks (float32 rounding only).
    assert metrics["hand_loss"] == pytest.approx(metrics["gd_loss"], rel=1e-4)
    assert 0.0 < metrics["gd_loss"] < metrics["zero_loss"]
    report = (out / "report.md").read_text()
    assert "| lsa |" in report and "tuned GD" in report
    assert "| expected (reference paper) | measured | met? |" in report
    assert "trained 1-layer LSA reaches tuned 1-step GD's loss within 2%" in report
    assert "(1 seed)" in report  # one seed: no interval, and the report says so
    assert M.X_DIST_SWEEP in metrics["ood"] and "x_dist" not in metrics["ood"]
    assert "W_K^T W_Q / beta" in report  # the heat-map caption says the products are rescaled


def test_main_job_reports_the_exact_population_optimum_beside_the_sampled_numbers(quick_main_run):
    exact = _metrics(quick_main_run)["exact"]
    # REFERENCE section 12: U(-0.5, 0.5), d = N = 10, noiseless: eta* = 6.06, half-MSE 0.2062 (= 0.20623 exactly).
    assert exact["eta_star"] == pytest.approx(200 / 33, rel=1e-9)
    assert exact["loss_star"] == pytest.approx(0.2062289562289562, rel=1e-9)
    assert exact["tuned_eta_excess"] >= 0 and exact["eval_tuned_excess"] >= 0 and exact["eval_tuning_bias"] <= 0
    assert exact["trained_minus_optimum_se"] > 0
    assert "## Exact population optimum" in (quick_main_run / "report.md").read_text()


def test_main_job_reproduces_its_golden_numbers(quick_main_run):
    metrics = _metrics(quick_main_run)
    for key, value in MAIN_GOLDEN.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key


def test_finished_run_is_not_recomputed_and_a_missing_report_is_re_rendered(quick_main_run, capsys):
    before = (quick_main_run / "metrics.json").stat().st_mtime_ns
    report = (quick_main_run / "report.md").read_text()
    (quick_main_run / "report.md").unlink()
    again = run_study("vonoswald", quick=True, root=str(quick_main_run.parent), progress=False)
    assert again == quick_main_run
    assert (quick_main_run / "metrics.json").stat().st_mtime_ns == before
    assert "re-rendered" in capsys.readouterr().err
    assert (quick_main_run / "report.md").read_text() == report


def test_report_command_re_renders_from_the_metrics_without_training(quick_main_run, monkeypatch):
    from iclgd_synth import train as train_module
    from iclgd_synth.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("re-rendering must not train")

    monkeypatch.setattr(train_module, "train", no_training)
    for png in quick_main_run.glob("*.png"):
        png.unlink()
    assert main(["report", str(quick_main_run)]) == 0
    assert (quick_main_run / "loss_lsa.png").exists() and (quick_main_run / "weights_lsa.png").exists()
    assert "| lsa |" in (quick_main_run / "report.md").read_text()


def test_run_files_are_readable_by_collaborators(quick_main_run):
    for name in ("metrics.json", "report.md", "config.json"):
        assert (quick_main_run / name).stat().st_mode & 0o044 == 0o044, name


def test_every_study_is_registered_with_a_description():
    for name in ("vonoswald", "recurrent", "deep", "softmax", "layernorm", "mlp", "order", "dual", "causal"):
        assert name in STUDIES and len(describe(name)) > 20
        assert get_study(name).name == name


def test_unknown_study_is_a_clear_error_with_the_nearest_names():
    with pytest.raises(ValueError, match=r"unknown study 'vonoswlad' \(did you mean vonoswald"):
        run_study("vonoswlad")


def test_overrides_set_nested_fields_and_reject_unknown_paths_and_bad_values():
    study = get_study("vonoswald")
    c = study.make_config(quick=True, overrides=["train.lr=5e-4", "train.task.noise=0.1", "ood=false",
                                                 "llm_weights=smollm2,minilm"], seeds=[3, 4])
    assert (c.train.lr, c.train.task.noise, c.ood, c.llm_weights, c.train.seeds) == (
        5e-4, 0.1, False, ("smollm2", "minilm"), (3, 4))
    with pytest.raises(ValueError, match="did you mean train.lr"):
        study.make_config(overrides=["train.lrr=1"])
    with pytest.raises(ValueError, match=r"lr must be in \(0.0, inf\]"):
        study.make_config(overrides=["train.lr=-1"])
    with pytest.raises(ValueError, match="must be an integer"):
        study.make_config(overrides=["train.n_steps=1.5"])
    with pytest.raises(ValueError, match="is a section"):
        study.make_config(overrides=["train.task=3"])
    with pytest.raises(ValueError, match="PATH=VALUE"):
        study.make_config(overrides=["train.lr"])
    with pytest.raises(ValueError, match="seeds must be different"):
        study.make_config(seeds=[0, 0])


def test_run_hash_ignores_fields_that_do_not_change_results():
    study = get_study("vonoswald")
    base = study.make_config(quick=True)
    chunked = study.make_config(quick=True, overrides=["train.chunk_steps=7", "train.checkpoint_every=21"])
    other = study.make_config(quick=True, overrides=["train.lr=5e-4"])
    assert protocol.run_dir_for("r", study, base) == protocol.run_dir_for("r", study, chunked)
    assert protocol.run_dir_for("r", study, base) != protocol.run_dir_for("r", study, other)
    assert base.train.hash() == chunked.train.hash() != other.train.hash()


#: Tiny sizes for the end-to-end study tests (same code as ``iclgd run NAME --quick``, fewer steps and tasks).
TINY = ["train.n_steps=30", "train.batch_size=64", "train.chunk_steps=15", "train.checkpoint_every=15",
        "eval_tasks=200", "tune_tasks=200"]


def _golden_tiny() -> dict:
    return json.loads((Path(__file__).parent / "golden" / "training_studies_tiny.json").read_text())


@pytest.mark.parametrize("name", ["recurrent", "deep", "softmax", "layernorm", "mlp"])
def test_every_training_study_runs_end_to_end_with_its_golden_numbers(name, tmp_path):
    study = get_study(name)
    # The OOD sweeps (the same for every study) run in the main-job test and here only where an expectation needs
    # them (LayerNorm on large inputs).
    out = run_study(name, quick=True, root=str(tmp_path), progress=False,
                    overrides=TINY + [f"ood={name == 'layernorm'}"])
    metrics = _metrics(out)
    assert metrics["finished"] is True
    golden = _golden_tiny()[name]
    for key, value in golden.items():
        if key == "models":
            for label, r in value.items():
                assert metrics["models"][label]["trained_loss"] == pytest.approx(r["trained_loss"], rel=1e-5)
        else:
            assert metrics[key] == pytest.approx(value, rel=1e-5), key
    report = (out / "report.md").read_text()
    assert "All losses are half-MSE on the query of 200 held-out tasks" in report
    for e in EXPECTATIONS[name]:
        assert e.expected in report
    config = study.make_config(quick=True, overrides=TINY)
    for label, model in config.models:
        assert (out / f"loss_{label}.png").exists() and (out / f"metrics_{label}.png").exists()
        assert (out / f"weights_{label}.png").exists() == (model.n_heads == 1), label
        if model.n_layers > 1:  # the per-layer branch
            assert len(metrics["models"][label]["per_layer_losses"]) == model.n_layers
            assert (out / f"layers_{label}.png").exists()
    if config.gdpp:  # the GD++ tuning branch: the hand GD++ weights are tuned GD++
        assert metrics["hand_gdpp_loss"] == pytest.approx(metrics["gdpp_loss"], rel=1e-3)
    if name == "layernorm":
        assert (out / "ood.png").exists() and M.X_DIST_SWEEP in metrics["ood"]


def test_seeds_give_means_with_intervals_and_per_seed_values(tmp_path):
    out = run_study("mlp", quick=True, root=str(tmp_path), progress=False, seeds=[0, 1, 2],
                    overrides=TINY + ["ood=false"])
    m = _metrics(out)["models"]["lsa_mlp"]
    per_seed = m["trained_loss_per_seed"]
    assert len(per_seed) == 3 and len(set(per_seed)) == 3  # three different models
    ci = m["ci"]["trained_loss"]
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(np.mean(per_seed))
    assert ci["lo"] < ci["mean"] < ci["hi"]
    assert "(3 seeds)" in (out / "report.md").read_text()
    # The first seed is the one-seed run: seeds are independent streams.
    assert per_seed[0] == pytest.approx(_golden_tiny()["mlp"]["trained_loss"], rel=1e-5)


def test_force_keeps_the_finished_run_until_the_new_one_is_complete(tmp_path):
    from iclgd_synth.studies import gd_comparison

    args = dict(quick=True, root=str(tmp_path), progress=False, overrides=TINY + ["ood=false"])
    out = run_study("layernorm", **args)
    old = _metrics(out)

    def interrupted(config, run):
        (run.dir / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    study = gd_comparison.LAYERNORM.__class__(**{**gd_comparison.LAYERNORM.__dict__, "compute": interrupted})
    with pytest.raises(KeyboardInterrupt):
        protocol.run(study, force=True, quick=True, root=tmp_path, progress=False, overrides=args["overrides"])
    assert _metrics(out) == old and (out / "report.md").exists()  # nothing lost
    assert not (out / "partial.txt").exists()


def test_root_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        run_study("mlp", quick=True, root=str(f), progress=False)


def test_config_paths_list_every_settable_leaf():
    c = get_study("deep").config
    p = cfg.paths(c)
    assert "train.task.noise" in p and "train.model.n_layers" in p and "baseline_steps" in p
    assert cfg.hash_dict(c)["train"].keys() >= {"lr", "seeds"} and "chunk_steps" not in cfg.hash_dict(c)["train"]


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
    from iclgd_synth.studies.gd_comparison import _heatmap_arrays

    hand = gd_params(6, 2.0, n_context=9)
    layer = hand.layers[0]
    scaled = hand.replace(layers=({**layer, "w_q": 3.0 * layer["w_q"], "w_p": layer["w_p"] / 3.0},))
    mats = _heatmap_arrays("m", scaled, hand, None, 6)
    # Same model, scaled products: after rescaling the trained maps are the construction's.
    np.testing.assert_allclose(mats["weights/m/trained L1 W_K^T W_Q / beta"],
                               mats["weights/m/GD construction W_K^T W_Q / beta"], atol=1e-6)
    np.testing.assert_allclose(mats["weights/m/trained L1 beta P W_V"], mats["weights/m/GD construction beta P W_V"],
                               atol=1e-6)
    assert float(mats["weights/m/beta L1"]) == pytest.approx(3.0)


def test_llm_comparison_records_a_missing_or_unreadable_checkpoint_as_skipped(monkeypatch, tmp_path):
    import iclgd_synth.weights.report as weights_report_module
    from iclgd_synth import gd_params
    from iclgd_synth.studies.gd_comparison import _llm_comparison

    config = get_study("vonoswald").config
    out = _llm_comparison(config.replace(llm_weights=(str(tmp_path / "none.gguf"),)),
                          gd_params(10, 6.0, n_context=10), tmp_path / "weights", progress=False)
    assert "none.gguf" in out["skipped"]

    def bad_layout(*args, **kwargs):
        raise ValueError("hidden size 576 is not divisible by n_heads=7")

    monkeypatch.setattr(weights_report_module, "weights_report", bad_layout)
    out = _llm_comparison(config, gd_params(10, 6.0, n_context=10), tmp_path, progress=False)
    assert out == {"skipped": "ValueError: hidden size 576 is not divisible by n_heads=7"}


@pytest.mark.llm
def test_main_job_report_contains_the_llm_comparison_when_it_runs(tmp_path):
    pytest.importorskip("gguf")
    from iclgd_synth.weights.loaders import open_source

    try:
        open_source("smollm2", max_layers=1)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 weights not available here: {e}")
    out = run_study("vonoswald", quick=True, root=str(tmp_path), progress=False,
                    overrides=TINY + ["ood=false", "llm_weights=smollm2", "llm_max_layers=1"])
    metrics = _metrics(out)
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
    assert t["train_form"] == "per-step calls" and t["train_tasks_per_s"] == t["loop_tasks_per_s"]  # CPU backend
    for v in (t["scan_tasks_per_s"], t["loop_tasks_per_s"], t["scan_over_loop"], u["exact_1step_s"],
              u["exact_5step_s"], u["grid_1step_s"], u["exact_1step_eta"]):
        assert isinstance(v, float) and v > 0
    assert [row["N"] for row in r["forward"]] == [10, 100]
    for text in ("as train runs it (per-step calls)", "target >= 1,000,000", "scan-jitted chunks", "tasks/s",
                 "ratio scan / calls", "GD step-size tuning", "dual vs quadratic"):
        assert text in printed, text


def test_bench_times_the_main_job_cold_warm_and_without_the_llm_section(monkeypatch, tmp_path):
    """The end-to-end part with a stand-in for the three fresh processes (the real ones take minutes)."""
    import subprocess

    from iclgd_synth import bench

    calls = []

    def fake_run(cmd, check, stdout, env):
        calls.append((cmd, env["ICLGD_JAX_CACHE"]))
        root = Path(cmd[cmd.index("--root") + 1])
        run = root / "vonoswald-abc"
        run.mkdir(parents=True)
        llm = {"skipped": "no"} if "--no-llm-weights" in cmd else {"seconds": 1.5}
        (run / "metrics.json").write_text(json.dumps({"train_seconds": 2.0, "trained_loss": 0.21, "gd_loss": 0.206,
                                                      "tasks_per_second": 1e6, "llm_weights": llm}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    m = bench.bench_main_job(quick=True)
    cmds, caches = [c for c, _ in calls], [e for _, e in calls]
    assert len(calls) == 3 and ["--no-llm-weights" in c for c in cmds] == [False, False, True]
    assert all("--quick" in c for c in cmds) and "--llm-max-layers" in cmds[0]
    assert len(set(caches)) == 1 and caches[0] not in ("", "0")  # one fresh cache, filled by the first run
    assert m["seconds"] > 0 and m["seconds_cold_cache"] > 0 and m["seconds_no_llm"] > 0
    assert m["llm_section_seconds"] == 1.5
    assert "first run, empty compilation cache" in bench.format_report(
        {"backend": "cpu", "device": "cpu", "n_devices": 1, "training": _FAKE_TRAINING, "tuning": _FAKE_TUNING,
         "forward": [], "main_job": m})


_FAKE_TRAINING = {"batch_size": 8, "steps": 2, "train_form": "per-step calls", "train_tasks_per_s": 1.0,
                  "scan_tasks_per_s": 1.0, "loop_tasks_per_s": 1.0, "scan_over_loop": 1.0}
_FAKE_TUNING = {"n_tasks": 1, "exact_1step_s": 1.0, "exact_1step_eta": 1.0, "exact_5step_s": 1.0,
                "exact_5step_eta": 1.0, "grid_1step_s": 1.0, "grid_1step_eta": 1.0}


@pytest.mark.parametrize("argv, text", [
    (["run", "vonoswald", "--quick", "--steps", "0"], "--steps"),
    (["run", "vonoswald", "--quick", "--llm-max-layers", "two"], "--llm-max-layers"),
    (["run", "vonoswald", "--seeds", "-1"], "--seeds"),
])
def test_run_rejects_bad_counts_with_a_usage_error(argv, text, capsys):
    from iclgd_synth.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert text in capsys.readouterr().err


@pytest.mark.parametrize("argv, text", [
    (["run", "nosuchstudy"], "unknown study 'nosuchstudy'"),
    (["run"], "give a study name"),
    (["run", "vonoswald", "--set", "train.lrr=1"], "did you mean train.lr"),
    (["run", "order", "--no-llm-weights"], "has none"),
    (["report", "/nonexistent/run"], "is not a run directory"),
])
def test_ordinary_mistakes_end_with_one_error_line(argv, text, capsys):
    from iclgd_synth.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def test_study_config_rejects_llm_max_layers_below_one():
    with pytest.raises(ValueError, match="llm_max_layers"):
        get_study("vonoswald").config.replace(llm_max_layers=0)


def test_experiment_scripts_write_runs_beside_the_experiments_folder(monkeypatch, tmp_path):
    from iclgd_synth import cli

    seen, owned = [], []
    monkeypatch.setattr(cli, "main", lambda argv, whole_process: seen.append(argv) or owned.append(whole_process) or 0)
    script = tmp_path / "checkout" / "experiments" / "vonoswald.py"
    assert cli.run_experiment("vonoswald", str(script), ["--quick"]) == 0
    assert seen[-1] == ["run", "vonoswald", "--quick", "--root", str(tmp_path / "checkout" / "runs")]
    cli.run_experiment("vonoswald", str(script), ["--root", "elsewhere"])
    assert seen[-1] == ["run", "vonoswald", "--root", "elsewhere"]
    # Called from other code (here pytest), the script does not own the process: no host devices, no worker.
    assert owned == [False, False]
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(script), raising=False)
    cli.run_experiment("vonoswald", str(script), [])
    assert owned[-1] is True
