"""The ``emergent`` study end to end at tiny size: the error curves of the GPT-style model and the baselines at every
context length, the closest baseline per n, the implicit-weight cosines and order sensitivity, and re-rendering."""

import json

import numpy as np
import pytest

from iclgd_synth.studies import protocol, run_study
from iclgd_synth.studies.registry import get_study

TINY = ["train.task.dim=2", "train.task.n_context=4", "train.model.dim=2", "train.model.n_context=4",
        "train.model.d_model=8", "train.model.n_layers=1", "train.model.n_heads=2", "train.n_steps=20",
        "train.warmup_steps=5", "train.batch_size=32", "train.chunk_steps=10", "train.checkpoint_every=10",
        "objectives=next_token", "noises=0.5", "eval_tasks=64", "tune_tasks=64", "order_tasks=16", "n_orderings=3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_study("emergent", quick=True, overrides=TINY, root=tmp_path_factory.mktemp("runs"), progress=False)


def test_reports_errors_distances_and_cosines_at_every_context_length(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    per = m["per_noise"]["0.5"]
    model = per["objectives"]["next_token"]
    assert len(model["errors"]) == 5 and model["n_seeds"] == 1  # n = 0..N
    # With no pair (n = 0) every linear baseline predicts 0: the same error as the zero predictor, exactly.
    base = per["baseline_errors"]
    for name in ("least_squares", "ridge", "gd_1", "averaging"):
        assert base[name][0] == pytest.approx(base["zero"][0], rel=1e-12)
    assert base["ridge"][4] < base["zero"][4]  # with 4 pairs in d = 2, ridge has learned something
    # At n = 0 every linear baseline predicts 0: the model's distance to them is its distance to zero.
    assert model["distance"]["least_squares"][0] == pytest.approx(model["distance"]["zero"][0])
    assert {c["baseline"] for c in model["closest"]} <= set(base)
    assert np.isfinite(model["cosine"]["ridge"][1:]).all() and np.isnan(model["cosine"]["ridge"][0])
    assert model["order_spread"]["n"] == 1 and per["baseline_order_spread"]["least_squares"] < 1e-5
    report = (run_dir / "report.md").read_text()
    assert "### Error against context length" in report and (run_dir / "errors_noise0.5.png").exists()


def test_report_re_renders_without_training(run_dir):
    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    protocol.render_run(run_dir)
    assert (run_dir / "report.md").read_text() == before


def test_the_study_needs_a_gpt_model_and_known_objectives():
    study = get_study("emergent")
    with pytest.raises(ValueError, match="objectives must be a non-empty subset"):
        study.make_config(overrides=["objectives=every"])
    assert study.make_config(quick=True).train.n_steps <= 200
