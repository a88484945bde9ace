"""The ``causal`` study end to end at tiny size (one run shared by the module): its files, the known answers of the
hand control (forward-order fine-tuning and the explicit GD steps reproduce every layer, standard and layer-causal
fine-tuning layer 1 only), the win counts, golden numbers recorded with the code before the port to the study
protocol, seeds, and re-rendering without training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from iclgd_synth.studies import causal as study_module
from iclgd_synth.studies import protocol, run_study
from iclgd_synth.intervals import combine_seeds
from iclgd_synth.studies.registry import get_study

# The quick preset shrunk further: 30 training steps, 60 tasks, one fine-tuning step, two step sizes.
TINY = ["train.n_steps=30", "eval_tasks=60", "tune_tasks=60", "ft_steps=1", "lr_grid=0.1,3.0"]
MODES = ("standard", "layer_causal", "forward_order")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_study("causal", quick=True, overrides=TINY, root=tmp_path_factory.mktemp("runs"), progress=False)


@pytest.fixture(scope="module")
def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_the_run_writes_config_finished_metrics_report_figures_and_curves(run_dir, metrics):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["study"] == "causal" and config["config"]["train"]["n_steps"] == 30
    assert metrics["finished"] is True and metrics["seeds"] == [0] and metrics["n_seeds"] == 1
    for name in ("simaou_per_layer.png", "hand_control.png", "training.png"):
        assert (run_dir / name).stat().st_size > 0
    report = (run_dir / "report.md").read_text()
    assert "SimAM_delta random dir." in report and "1 seed [0]" in report
    curves = protocol.load_arrays(run_dir, "arrays")
    assert curves["losses/2"].shape == (1, 30) and np.all(np.isfinite(curves["losses/2"]))


def test_hand_gd_model_is_reproduced_exactly_by_forward_order_finetuning_and_the_gd_steps(metrics):
    hand = metrics["hand_control"]["2"]
    assert max(hand["forward_order"]["max_abs_diff"]) < 1e-10
    assert hand["standard"]["rel_distance"][0] < 1e-12 < 1e-2 < hand["standard"]["rel_distance"][1]
    assert hand["exact_layers"] == {"standard": [1], "layer_causal": [1], "forward_order": [1, 2],
                                    "gd_steps": [1, 2]}
    assert hand["gd_steps"]["simaou"] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert max(hand["gd_steps"]["max_abs_diff"]) < 1e-12


def test_layer_causal_count_compares_with_standard_alone_nan_cells_apart(metrics):
    al = metrics["models"]["2"]["alignment"]
    assert set(al) == {f"{p}|1|{mode}" for p in ("attention", "adapters") for mode in MODES}
    assert len(metrics["models"]["2"]["gd_steps"]["simaou"]) == 2
    std = [v for p in ("attention", "adapters") for v in al[f"{p}|1|standard"]["simaou"]]
    lc = [v for p in ("attention", "adapters") for v in al[f"{p}|1|layer_causal"]["simaou"]]
    c = metrics["comparisons"]["layer_causal_vs_standard"]["all"]
    assert c["wins"] == sum(1 for a, b in zip(std, lc) if math.isfinite(a) and math.isfinite(b) and b > a + 1e-12)
    assert c["wins"] + c["losses"] + c["ties"] + c["undefined"] == c["cells"] == 4
    # SimAM_delta: undefined at layer 1 (the same token with and without demonstrations), defined at layer 2.
    assert math.isnan(al["attention|1|standard"]["simam_delta"][0])
    assert math.isfinite(al["attention|1|standard"]["simam_delta"][1])


def test_golden_numbers_recorded_before_the_port(metrics):
    # Recorded with the code before the study protocol (CausalStudy, quick, n_steps=30, n_tasks=60, tune_tasks=60,
    # ft_steps=(1,), lr_grid=(0.1, 3.0)): the same training, evaluation tasks and fine-tuning.
    m = metrics["models"]["2"]
    assert m["icl_loss"] == pytest.approx(0.3913483620688651, rel=1e-5)
    assert m["gd_steps"]["eta"] == pytest.approx(5.7156313986412925, rel=1e-5)
    assert m["gd_steps"]["simaou"] == pytest.approx([0.03322759616687211, 0.11553871961532185], rel=1e-5)
    assert m["alignment"]["adapters|1|forward_order"]["simaou"][1] == pytest.approx(0.12107381777220681, rel=1e-5)
    assert m["alignment"]["adapters|1|standard"]["ft_query_loss"] == pytest.approx(0.2649176747771095, rel=1e-5)
    assert metrics["comparisons"]["mean_simaou_by_depth"]["2"]["standard"] == pytest.approx(0.16458924706680556,
                                                                                             rel=1e-5)


def test_one_seed_reports_its_own_values_and_no_interval(metrics):
    m = metrics["models"]["2"]
    assert len(m["per_seed"]) == 1 and m["per_seed"][0]["icl_loss"] == m["icl_loss"]
    assert m["per_seed"][0]["alignment"]["adapters|1|standard"]["lr"] == m["alignment"]["adapters|1|standard"]["lr"]
    ci = m["ci"]["icl_loss"]
    assert ci["n"] == 1 and ci["mean"] == m["icl_loss"] and math.isnan(ci["lo"])
    win = metrics["comparisons"]["ci"]["forward_order_vs_standard"]["win_fraction"]
    c = metrics["comparisons"]["forward_order_vs_standard"]["all"]
    assert win["mean"] == pytest.approx(c["wins"] / c["cells"]) and win["n"] == 1


def test_report_re_renders_without_training(run_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("re-rendering must not train")

    monkeypatch.setattr(study_module, "train", no_training)
    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    (run_dir / "training.png").unlink()
    protocol.render_run(run_dir)
    assert (run_dir / "report.md").read_text() == before
    assert (run_dir / "training.png").exists()


def test_seeds_are_combined_as_means_of_finite_values_and_sums_of_counts():
    a = {"loss": 1.0, "simaou": [float("nan"), 0.2], "diverged": 1, "key": "x"}
    b = {"loss": 3.0, "simaou": [float("nan"), 0.4], "diverged": 2, "key": "x"}
    out = combine_seeds([a, b])
    assert out["loss"] == 2.0 and out["diverged"] == 3 and out["key"] == "x"
    assert math.isnan(out["simaou"][0]) and out["simaou"][1] == pytest.approx(0.3)
    one = combine_seeds([a])  # one seed: its own values
    assert (one["loss"], one["simaou"][1], one["diverged"]) == (1.0, 0.2, 1) and math.isnan(one["simaou"][0])
    assert combine_seeds([{"v": [1.0, float("nan")]}, {"v": [3.0, 5.0]}])["v"] == [2.0, 5.0]
    with pytest.raises(ValueError, match="same length"):
        combine_seeds([[1.0], [1.0, 2.0]])


@pytest.mark.parametrize("override, message", [
    ("depths=", "depths must hold at least one value"),
    ("depths=2,2", "depths must be different"),
    ("ft_steps=0", "ft_steps"),
    ("lr_grid=0.1,-1", "lr_grid"),
    ("eval_tasks=0", "eval_tasks"),
    ("train.model.mlp=true", "train.model must be linear attention"),
])
def test_bad_config_values_are_refused_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        get_study("causal").make_config(quick=True, overrides=[override])


def test_deep_models_get_their_own_learning_rate_and_token_clip():
    config = get_study("causal").make_config()
    assert config.depths == (2, 3, 5) and config.train.seeds == (0,)
    shallow, deep = config.train_for(2), config.train_for(5)
    assert (shallow.model.n_layers, shallow.model.clip, shallow.lr) == (2, None, 1e-3)
    assert (deep.model.n_layers, deep.model.clip, deep.lr) == (5, 10.0, 5e-4)
    assert deep.model.include_query and deep.batch_size == 512 and deep.n_steps == 4000
