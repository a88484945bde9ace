"""The ``transience`` study end to end at tiny size: one sweep over M x weight decay x seeds, evaluations over training
on fresh and pool tasks, the per-run readings and the report; finished groups are reused, not retrained."""

import json

import numpy as np
import pytest

from iclgd_synth.studies import protocol, run_study
from iclgd_synth.studies.registry import get_study

TINY = ["train.task.dim=2", "train.task.n_context=3", "train.model.dim=2", "train.model.n_context=3",
        "train.model.d_model=8", "train.model.n_layers=1", "train.model.n_heads=1", "train.model.mlp_ratio=1",
        "train.n_steps=20", "train.warmup_steps=4", "train.batch_size=16", "train.checkpoint_every=10", "eval_every=10",
        "eval_tasks=32",
        "pool_sizes=(1,4)", "weight_decays=(0,0.5)"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_study("transience", quick=True, overrides=TINY, root=tmp_path_factory.mktemp("runs"), progress=False)


def test_every_run_is_evaluated_over_training_and_read(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    runs = m["runs"]
    assert len(runs) == 2 * 2 * 2 and {(r["pool_size"], r["weight_decay"], r["seed"]) for r in runs} == {
        (p, w, s) for p in (1, 4) for w in (0.0, 0.5) for s in (0, 1)}
    for r in runs:
        assert r["steps"] == [0, 10, 20]
        assert all(np.isfinite(v).all() for v in r["curve"].values())
        assert r["final_state"] in ("ridge", "dMMSE", "between") and np.isfinite(r["final_ridgeness"])
    for ref in m["reference"].values():
        assert np.isfinite(list(ref.values())).all()
    # The same seed starts from the same model whatever M and the weight decay, and the fresh tasks are the same for
    # every M: identical step-0 fresh-task evaluations (by construction).
    for s in (0, 1):
        first = [r["curve"]["loss_fresh"][0] for r in runs if r["seed"] == s]
        assert max(first) == min(first)
    # Weight decay changes the trajectory after step 0.
    a, b = ([r for r in runs if r["pool_size"] == 4 and r["seed"] == 0 and r["weight_decay"] == w] for w in (0.0, 0.5))
    assert a[0]["curve"]["loss_pool"][-1] != b[0]["curve"]["loss_pool"][-1]
    assert [c["pool_size"] for c in m["cells"]] == [1, 4, 1, 4] and set(m["threshold"]) == {"0", "0.5"}
    assert len(m["weight_decay_comparison"]) == 2
    arrays = protocol.load_arrays(run_dir, "curves")
    assert arrays["M4/ridge_fresh"].shape == (3, 4, 4)  # (evaluations, runs of the group, N + 1)
    report = (run_dir / "report.md").read_text()
    assert "## Answers" in report and (run_dir / "final_state.png").exists()
    for w in ("0", "0.5"):
        assert (run_dir / f"distances_wd{w}.png").exists() and (run_dir / f"losses_wd{w}.png").exists()
    # Each run's ICL gain is its fresh-task loss against the two Bayes predictors' (by construction).
    for r in runs:
        ref = m["reference"][str(r["pool_size"])]
        gap = ref["dmmse_loss_fresh"] - ref["ridge_loss_fresh"]
        assert r["peak_gain"] == pytest.approx((ref["dmmse_loss_fresh"] - r["min_loss"]) / gap)


def test_report_re_renders_and_finished_groups_are_not_retrained(run_dir, monkeypatch):
    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    protocol.render_run(run_dir)
    assert (run_dir / "report.md").read_text() == before

    import iclgd_synth.sweep as sweep

    def no_training(*args, **kwargs):
        raise AssertionError("a finished group was trained again")

    monkeypatch.setattr(sweep, "train_group", no_training)
    study = get_study("transience")
    config = study.make_config(quick=True, overrides=TINY)
    again = study.compute(config, protocol.Run(run_dir, progress=False))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert [r["final_ridgeness"] for r in again["runs"]] == [r["final_ridgeness"] for r in m["runs"]]


@pytest.mark.parametrize("override,match", [("pool_sizes=(4,2)", "ascending"), ("train.task.noise=0", "noise must be > 0"),
                                            ("weight_decays=(0,0)", "must be different"),
                                            ("eval_every=0", "eval_every must be")])
def test_bad_settings_name_the_parameter(override, match):
    with pytest.raises(ValueError, match=match):
        get_study("transience").make_config(quick=True, overrides=[override])
