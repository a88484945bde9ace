"""The ``preconditioned`` study end to end at tiny size: the exact optimum it reports, plain GD's shortfall (zero
for isotropic inputs, positive for anisotropic ones), the convergence records, and re-rendering."""

import json

import numpy as np
import pytest

from iclgd_synth import theory
from iclgd_synth.studies import protocol, run_study
from iclgd_synth.studies.registry import get_study

TINY = ["train.n_steps=60", "train.batch_size=128", "train.chunk_steps=20", "train.checkpoint_every=20",
        "condition_numbers=1,10", "eval_tasks=500", "train.lr=0.01"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_study("preconditioned", quick=True, overrides=TINY, root=tmp_path_factory.mktemp("runs"),
                     progress=False)


def test_reports_the_exact_optimum_and_plain_gds_shortfall(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    config = get_study("preconditioned").make_config(quick=True, overrides=TINY)
    for key, v in m["per_kappa"].items():
        task = config.train.task.replace(condition_number=float(key))
        assert v["loss_star"] == pytest.approx(theory.optimal_preconditioner_loss(task), rel=1e-12)
        # The optimum is the Gaussian closed form; its sampled loss agrees with the population one.
        assert v["sampled_optimum_loss"] == pytest.approx(v["loss_star"], rel=0.15)
    assert m["per_kappa"]["1"]["scalar_gd_shortfall"] == pytest.approx(0.0, abs=1e-10)  # isotropic: G* = eta* I
    assert m["per_kappa"]["10"]["scalar_gd_shortfall"] > 0.05


def test_records_the_trained_preconditioner_over_training_for_every_seed(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    for v in m["per_kappa"].values():
        assert [h["step"] for h in v["history"]] == [20, 40, 60]
        assert all(len(h["cos"]) == 2 for h in v["history"])  # two seeds under --quick
        assert v["ci"]["cos"]["n"] == 2 and np.isfinite(v["ci"]["population_loss_of_g"]["mean"])
        # A trained model is never better than the optimum of its own family.
        assert min(s["population_loss_of_g"] for s in v["per_seed"]) >= v["loss_star"] - 1e-9
    report = (run_dir / "report.md").read_text()
    assert "## The trained preconditioner against G*" in report and (run_dir / "cos.png").exists()


def test_report_re_renders_without_training(run_dir):
    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    protocol.render_run(run_dir)
    assert (run_dir / "report.md").read_text() == before


def test_the_study_refuses_an_isotropic_task_law():
    with pytest.raises(ValueError, match="x_dist must be 'anisotropic'"):
        get_study("preconditioned").make_config(overrides=["train.task.x_dist=normal"])
