"""The ``causal`` study end to end at tiny size (one run shared by the module, two seeds): its files, the known
answers of the hand control (forward-order fine-tuning and the explicit GD steps reproduce every layer, standard and
layer-causal fine-tuning layer 1 only), the paired win counts, the headline beside its nulls, golden numbers, seeds,
and re-rendering without training."""

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
# Recorded with this code after "Sample under a fixed threefry mode" (TINY, seeds 0 and 1).
GOLDEN = {"icl_loss_seed0": 0.4854886511981591, "gd_eta": 5.861214601119199, "headline_standard": 0.027137878470339754,
          "untrained": -0.012489165738772411}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_study("causal", quick=True, overrides=TINY, root=tmp_path_factory.mktemp("runs"), progress=False)


@pytest.fixture(scope="module")
def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_the_run_writes_config_finished_metrics_report_figures_and_curves(run_dir, metrics):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["study"] == "causal" and config["config"]["train"]["n_steps"] == 30
    assert metrics["finished"] is True and metrics["seeds"] == [0, 1] and metrics["n_seeds"] == 2
    for name in ("simaou_per_layer.png", "hand_control.png", "training.png"):
        assert (run_dir / name).stat().st_size > 0
    report = (run_dir / "report.md").read_text()
    assert "SimAM_delta random dir." in report and "2 seeds [0, 1]" in report
    assert report.index("## Implementation checks") < report.index("## Findings")
    curves = protocol.load_arrays(run_dir, "arrays")
    assert curves["losses/2"].shape == (2, 30) and np.all(np.isfinite(curves["losses/2"]))


def test_hand_gd_model_is_reproduced_exactly_by_forward_order_finetuning_and_the_gd_steps(metrics):
    hand = metrics["hand_control"]["2"]
    assert max(hand["forward_order"]["max_abs_diff"]) < 1e-10
    assert hand["standard"]["rel_distance"][0] < 1e-12 < 1e-2 < hand["standard"]["rel_distance"][1]
    assert hand["exact_layers"] == {"standard": [1], "layer_causal": [1], "forward_order": [1, 2],
                                    "gd_steps": [1, 2]}
    assert hand["gd_steps"]["simaou"] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert max(hand["gd_steps"]["max_abs_diff"]) < 1e-12


def test_layer_causal_counts_are_paired_tests_per_cell_by_parameter_set(metrics):
    al = metrics["models"]["2"]["alignment"]
    assert set(al) == {f"{p}|1|{mode}" for p in ("attention", "adapters") for mode in MODES}
    assert len(metrics["models"]["2"]["gd_steps"]["simaou"]) == 2
    c = metrics["comparisons"]["layer_causal_vs_standard"]
    cells = c["cells"]["2"]
    assert len(cells) == 4 and {x["n_seeds"] for x in cells} == {2}
    for x in cells:
        sig = x["p"] < 0.05
        assert x["verdict"] == ("within noise" if not sig else "win" if x["mean_diff"] > 0 else "loss")
        assert x["lo"] <= x["mean_diff"] <= x["hi"] and x["n_tasks"] <= 60
    raw = c["all"]["raw"]
    assert raw["all"]["wins"] == sum(x["verdict"] == "win" for x in cells)
    assert raw["all"]["cells"] == raw["by_param_set"]["attention"]["cells"] + raw["by_param_set"]["adapters"]["cells"]
    for crit in ("holm", "consistent"):  # stricter criteria never count more wins or losses
        assert c["all"][crit]["all"]["wins"] <= raw["all"]["wins"]
        assert c["all"][crit]["all"]["losses"] <= raw["all"]["losses"]
    # SimAM_delta: undefined at layer 1 (the same token with and without demonstrations), defined at layer 2.
    assert math.isnan(al["attention|1|standard"]["simam_delta"][0])
    assert math.isfinite(al["attention|1|standard"]["simam_delta"][1])


def test_headline_alignment_beats_the_random_direction_and_the_untrained_model(metrics):
    h = metrics["headline"]["2"]
    for col in ("standard", "random_direction", "untrained_model", "nearest_neighbours", "toward_truth"):
        assert h[col]["n"] == 2
    # Even barely trained (30 steps), fine-tuning aligns with ICL above the random direction and the same protocol
    # on the untrained initialisation; the competent-learner nulls are reported beside it (not asserted: that is the
    # finding the full run measures).
    assert h["standard"]["mean"] > h["random_direction"]["mean"] + 0.02
    assert h["standard"]["mean"] > h["untrained_model"]["mean"] + 0.02
    u = metrics["models"]["2"]["untrained"]
    assert set(u["alignment"]) == {f"{p}|1|standard" for p in ("attention", "adapters")}


def test_golden_numbers(metrics):
    # Recorded at this tiny size (seeds 0 and 1).
    m = metrics["models"]["2"]
    assert m["ci"]["icl_loss"]["values"][0] == pytest.approx(GOLDEN["icl_loss_seed0"], rel=1e-5)
    assert m["gd_steps"]["eta"] == pytest.approx(GOLDEN["gd_eta"], rel=1e-5)
    assert metrics["headline"]["2"]["standard"]["mean"] == pytest.approx(GOLDEN["headline_standard"], rel=1e-4)
    assert metrics["headline"]["2"]["untrained_model"]["mean"] == pytest.approx(GOLDEN["untrained"], rel=1e-4)


def test_seeds_give_intervals(metrics):
    m = metrics["models"]["2"]
    assert len(m["per_seed"]) == 2
    ci = m["ci"]["icl_loss"]
    assert ci["n"] == 2 and ci["lo"] <= ci["mean"] <= ci["hi"] and ci["values"][0] != ci["values"][1]
    assert m["icl_loss"] == pytest.approx(np.mean(ci["values"]), rel=1e-12)


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


def test_an_interrupted_run_resumes_from_the_saved_evaluations(run_dir, metrics, monkeypatch):
    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished (depth, seed) evaluation must be read back, not recomputed")

    monkeypatch.setattr(study_module.CA, "evaluate_model", no_evaluation)
    config = get_study("causal").make_config(quick=True, overrides=TINY)
    again = study_module.compute(config, protocol.Run(run_dir, progress=False))
    assert json.loads(json.dumps(again["headline"])) == metrics["headline"]
    assert again["comparisons"]["layer_causal_vs_standard"]["all"] == \
        metrics["comparisons"]["layer_causal_vs_standard"]["all"]


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
    assert config.depths == (2, 3, 5) and config.train.seeds == (0, 1, 2, 3, 4)
    assert config.quick().train.seeds == (0, 1)
    shallow, deep = config.train_for(2), config.train_for(5)
    assert (shallow.model.n_layers, shallow.model.clip, shallow.lr) == (2, None, 1e-3)
    assert (deep.model.n_layers, deep.model.clip, deep.lr) == (5, 10.0, 5e-4)
    assert deep.model.include_query and deep.batch_size == 512 and deep.n_steps == 4000
