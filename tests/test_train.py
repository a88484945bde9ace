"""Training: a tiny run learns, an interrupted run resumes to the identical result, divergence is caught."""

import glob

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclgd_synth import ModelConfig, TaskConfig
from iclgd_synth.train import (
    SCHEDULES, TrainConfig, TrainingDiverged, learning_rate_schedule, load_params, make_optimizer, save_params, train,
)

TINY = TrainConfig(task=TaskConfig(dim=4, n_context=6, x_dist="normal"), model=ModelConfig(dim=4), lr=1e-2,
                   batch_size=128, n_steps=200,
                   chunk_steps=50, checkpoint_every=50)


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


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    train(TINY.replace(n_steps=50), tmp_path, progress=False)
    with pytest.raises(ValueError, match="another config"):
        train(TINY.replace(n_steps=50, lr=2e-3), tmp_path, progress=False)


def test_a_corrupt_or_foreign_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    from iclgd_synth.storage import CheckpointError

    cfg = TINY.replace(n_steps=50)
    train(cfg, tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.msgpack"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match=r"checkpoint.msgpack.*cannot be read.*--force"):
        train(cfg, tmp_path, progress=False)
    ckpt.write_bytes(data)
    # Same hash, another structure (two seeds instead of one): refused, not silently mis-filled.
    with pytest.raises(CheckpointError):
        train(cfg.replace(seeds=(0, 1)), tmp_path, progress=False)


def test_changing_chunking_keeps_the_hash_and_resumes(tmp_path):
    cfg = TINY.replace(n_steps=100)
    train(cfg, tmp_path, progress=False, stop_after=50)
    rechunked = cfg.replace(chunk_steps=25, checkpoint_every=25)
    assert rechunked.hash() == cfg.hash()
    resumed = train(rechunked, tmp_path, progress=False)
    straight = train(cfg, progress=False)
    assert resumed.resumed_from == 50
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-6)


def test_another_step_count_reuses_the_compiled_chunk(compiles_of):
    train(TINY.replace(n_steps=50), progress=False)
    _, compiles = compiles_of(lambda: train(TINY.replace(n_steps=100), progress=False).losses)
    assert not [c for c in compiles if "chunk" in c], compiles


def test_repeated_seeds_are_rejected():
    with pytest.raises(ValueError, match="seeds must be different"):
        TINY.replace(seeds=(0, 0))


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


def test_run_interrupted_from_on_chunk_resumes_bit_identical_with_two_seeds_and_a_schedule(tmp_path):
    # Chunks of 25 over 110 steps (the last one shorter); Ctrl-C arrives after the chunk ending at step 50, long
    # before the next periodic checkpoint, so the interrupt handler's checkpoint is what the resume starts from.
    cfg = TINY.replace(n_steps=110, chunk_steps=25, checkpoint_every=1000, seeds=(0, 2),
                       schedule="warmup_cosine", warmup_steps=20)
    straight = train(cfg, progress=False)

    def interrupt(step, params):
        if step == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False, on_chunk=interrupt)
    resumed = train(cfg, tmp_path, progress=False)
    assert resumed.resumed_from == 50
    assert not glob.glob(str(tmp_path / "*.tmp*")), "a temporary checkpoint file was left behind"
    chex.assert_trees_all_equal(resumed.params, straight.params)
    np.testing.assert_array_equal(resumed.losses, straight.losses)


def test_training_seconds_survive_resumption_and_a_rerun_of_a_finished_run(tmp_path):
    cfg = TINY.replace(n_steps=100)
    partial = train(cfg, tmp_path, progress=False, stop_after=50)
    resumed = train(cfg, tmp_path, progress=False)
    assert partial.train_seconds > 0
    # The resumed run reports the time of all 100 steps: the 50 before the interruption included.
    assert resumed.train_seconds > partial.train_seconds
    assert resumed.timed_steps == 100
    # A re-run after training finished (e.g. a study that crashed later) trains nothing but keeps the timings.
    again = train(cfg, tmp_path, progress=False)
    assert again.resumed_from == 100
    assert again.train_seconds == pytest.approx(resumed.train_seconds, rel=1e-12)
    assert again.tasks_per_second == pytest.approx(resumed.tasks_per_second, rel=1e-12)
    assert again.tasks_per_second > 0


@pytest.mark.parametrize("warmup", [110, 500])
def test_warmup_longer_than_the_run_is_rejected_with_the_range(warmup):
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, n_steps - 1\] = \[0, 109\]"):
        TINY.replace(n_steps=110, schedule="warmup_cosine", warmup_steps=warmup)
    TINY.replace(n_steps=110, schedule="warmup_cosine", warmup_steps=109)  # the largest accepted value


def test_warmup_steps_without_the_warmup_schedule_is_rejected():
    with pytest.raises(ValueError, match="warmup_steps.*only applies to schedule='warmup_cosine' or 'warmup_constant'"):
        TINY.replace(schedule="cosine", warmup_steps=10)
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, n_steps - 1\] = \[0, 109\]"):
        TINY.replace(n_steps=110, schedule="warmup_constant", warmup_steps=110)


def test_a_constant_rate_after_the_warm_up_does_not_depend_on_n_steps():
    # Like "constant" (and unlike the cosine schedules), runs of different lengths share their compiled steps.
    a = TINY.replace(n_steps=100, schedule="warmup_constant", warmup_steps=10)
    assert a.compute_key() == a.replace(n_steps=300).compute_key()
    assert TINY.replace(n_steps=100, schedule="warmup_cosine", warmup_steps=10).compute_key() != \
        TINY.replace(n_steps=300, schedule="warmup_cosine", warmup_steps=10).compute_key()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_compute_key_applies_the_same_learning_rates_as_the_config(schedule):
    # Training compiles its step from the compute key: its schedule must be the config's at every step.
    cfg = TINY.replace(n_steps=300, lr=0.01, schedule=schedule,
                       warmup_steps=25 if schedule.startswith("warmup_") else 0)
    steps = jnp.arange(cfg.n_steps)
    np.testing.assert_array_equal(jax.vmap(learning_rate_schedule(cfg.compute_key()))(steps),
                                  jax.vmap(learning_rate_schedule(cfg))(steps))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_optimizer_steps_follow_the_learning_rate_schedule(schedule):
    # With a constant gradient Adam's first moments equal it and its update is -lr_t * sign(g) (up to eps), so the
    # size of each update is the learning rate the optimiser applied at that step.
    n, lr = 20, 0.01
    cfg = TINY.replace(n_steps=n, lr=lr, clip_norm=None, schedule=schedule,
                       warmup_steps=5 if schedule.startswith("warmup_") else 0)
    opt = make_optimizer(cfg)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    applied = []
    for _ in range(n):
        updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        applied.append(-float(updates["w"][0]))
    expected = {"constant": [lr] * n,
                "cosine": [lr * 0.5 * (1 + np.cos(np.pi * t / n)) for t in range(n)],
                "warmup_cosine": [lr * t / 5 for t in range(5)]
                + [lr * 0.5 * (1 + np.cos(np.pi * (t - 5) / (n - 5))) for t in range(5, n)],
                "warmup_constant": [lr * t / 5 for t in range(5)] + [lr] * (n - 5)}[schedule]
    np.testing.assert_allclose(applied, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose([float(learning_rate_schedule(cfg)(t)) for t in range(n)], expected, rtol=1e-5,
                               atol=1e-9)


def test_warmup_cosine_schedule_with_weight_decay_trains_and_lowers_the_loss():
    cfg = TINY.replace(n_steps=150, chunk_steps=150, schedule="warmup_cosine", weight_decay=1e-3, warmup_steps=15)
    result = train(cfg, progress=False)
    first, last = result.losses[0, :15].mean(), result.losses[0, -15:].mean()
    assert np.isfinite(last) and last < 0.8 * first, (first, last)


def test_the_trainer_trains_the_gpt_style_model_on_every_position(tmp_path):
    objective = "next_token"  # the ICL objective shares the code path but the loss (tested in test_gpt.py)
    from iclgd_synth.gpt import GPTConfig, GPTParams

    # One task in the pool: learnable in weights within a few dozen steps, so a working trainer must show it.
    cfg = TrainConfig(task=TaskConfig(dim=3, n_context=4, x_dist="normal", pool_size=1), objective=objective,
                      lr=1e-2, model=GPTConfig(dim=3, n_context=4, d_model=16, n_layers=1, n_heads=2), batch_size=64,
                      n_steps=60, chunk_steps=30, checkpoint_every=30)
    result = train(cfg, tmp_path, progress=False)
    assert isinstance(result.seed_params(0), GPTParams) and np.all(np.isfinite(result.losses))
    # Judged on 4096 held-out draws, not on the noisy 64-task training losses (measured: 0.138 -> 0.00018).
    from iclgd_synth.gpt import gpt_loss
    from iclgd_synth.tasks import sample
    from iclgd_synth.train import init_state

    held_out = sample(jax.random.PRNGKey(7), cfg.task, 4096)
    initial = jax.tree.map(lambda a: a[0], init_state(cfg)[0])
    before, after = float(gpt_loss(initial, held_out)), float(gpt_loss(result.seed_params(0), held_out))
    assert after < 0.1 * before, (before, after)
    again = train(cfg, tmp_path, progress=False)  # resumes from the finished checkpoint: same parameters
    chex.assert_trees_all_equal(again.params, result.params)


def test_next_token_objective_needs_a_gpt_model():
    with pytest.raises(ValueError, match="objective='next_token' needs a GPT-style model"):
        TINY.replace(objective="next_token")
    with pytest.raises(ValueError, match="objective must be one of"):
        TINY.replace(objective="every")
