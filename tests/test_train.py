"""Training: a tiny run learns, an interrupted run resumes to the identical result, divergence is caught."""

import glob

import chex
import jax
import numpy as np
import pytest

from iclgd_synth import ModelConfig, TaskConfig
from iclgd_synth.train import TrainConfig, TrainingDiverged, load_params, save_params, train

TINY = TrainConfig(task=TaskConfig(dim=4, n_context=6, x_dist="normal"), model=ModelConfig(dim=4), lr=1e-2,
                   batch_size=128, n_steps=200,
                   chunk_steps=50, checkpoint_every=50, eval_batch=256)


def test_tiny_training_run_lowers_the_loss():
    result = train(TINY, progress=False)
    assert result.losses.shape == (1, 200)
    assert np.all(np.isfinite(result.losses))
    first, last = result.losses[0, :20].mean(), result.losses[0, -20:].mean()
    assert last < 0.8 * first, (first, last)


def test_vmapped_seeds_train_differently_and_match_single_seed_runs():
    cfg = TINY.replace(n_steps=50, seeds=(0, 3))
    both = train(cfg, progress=False)
    single = train(cfg.replace(seeds=(3,)), progress=False)
    assert both.losses.shape == (2, 50)
    assert not np.allclose(both.losses[0], both.losses[1])
    np.testing.assert_allclose(both.losses[1], single.losses[0], rtol=1e-5, atol=1e-6)


def test_interrupted_run_resumes_to_identical_result(tmp_path):
    straight = train(TINY, progress=False)
    partial = train(TINY, tmp_path, progress=False, stop_after=100)
    assert partial.losses[0, 100:].size and np.all(np.isnan(partial.losses[0, 100:]))
    resumed = train(TINY, tmp_path, progress=False)
    assert resumed.resumed_from == 100
    chex.assert_trees_all_equal(resumed.params, straight.params)
    np.testing.assert_array_equal(resumed.losses, straight.losses)
    assert not glob.glob(str(tmp_path / "*.tmp*")), "a temporary checkpoint file was left behind"


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    train(TINY.replace(n_steps=50), tmp_path, progress=False)
    with pytest.raises(ValueError, match="another config"):
        train(TINY.replace(n_steps=50, lr=2e-3), tmp_path, progress=False)


def test_diverging_config_stops_with_the_step_and_a_fix():
    cfg = TINY.replace(model=ModelConfig(dim=4, n_layers=3, init_scale=1.0), lr=1e6, clip_norm=None, n_steps=100)
    with pytest.raises(TrainingDiverged, match=r"at step \d+.*smaller lr"):
        train(cfg, progress=False)


def test_params_round_trip_through_npz(tmp_path):
    params = train(TINY.replace(n_steps=50), progress=False).seed_params(0)
    save_params(tmp_path / "p.npz", params)
    loaded = load_params(tmp_path / "p.npz")
    assert loaded.arch == params.arch
    chex.assert_trees_all_equal(jax.tree.leaves(loaded), jax.tree.leaves(params))


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", 0, "batch_size"), ("n_steps", -1, "n_steps"), ("lr", float("nan"), "lr"),
    ("schedule", "linear", "schedule"), ("clip_norm", 0.0, "clip_norm"), ("seeds", (), "seeds"),
])
def test_bad_train_config_names_the_parameter(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TINY.replace(**{field: value})


def test_model_and_task_dimensions_must_agree():
    with pytest.raises(ValueError, match="dim"):
        TINY.replace(model=ModelConfig(dim=5))
