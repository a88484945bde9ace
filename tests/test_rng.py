"""Random streams depend on indices only (iclgd_synth.rng): not on JAX's threefry setting, the batch size or the
version of JAX (golden values), for tasks, pools and initial parameters."""

import chex
import jax
import numpy as np
import pytest

from iclgd_synth import ModelConfig, TaskConfig, rng
from iclgd_synth.gpt import GPTConfig, init_gpt
from iclgd_synth.model import init_params
from iclgd_synth.tasks import TASK_PRESETS, sample
from iclgd_synth.train import seed_keys

#: Every part of a task drawn: anisotropic inputs, vector outputs, a pool, noise and label corruption.
EVERY_PART = TaskConfig(dim=3, n_context=5, out_dim=2, x_dist="anisotropic", pool_size=7, noise=0.3,
                        label_corruption=0.2)


@pytest.mark.parametrize("config", [TASK_PRESETS["vonoswald"], EVERY_PART], ids=["vonoswald", "every-part"])
def test_tasks_depend_neither_on_the_global_threefry_setting_nor_on_the_batch_size(config):
    key = jax.random.PRNGKey(5)
    with jax.threefry_partitionable(True):
        a = sample(key, config, 6)
    with jax.threefry_partitionable(False):
        b = sample(key, config, 6)
        first = sample(key, config, 2)
    chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal(first, a.slice(0, 2))  # task i is the same task in a batch of any size


def test_task_i_is_drawn_from_fold_in_of_its_index():
    config = TASK_PRESETS["vonoswald"]
    key = jax.random.PRNGKey(2)
    batch = sample(key, config, 4)
    n, d = config.n_context, config.dim
    with rng.fixed_mode():
        x = 0.5 * jax.random.uniform(rng.derive(key, 3, rng.INPUTS), ((n + 1) * d,), minval=-1.0, maxval=1.0)
        w = jax.random.normal(rng.derive(key, 3, rng.WEIGHTS), (d,))
    np.testing.assert_array_equal(np.asarray(batch.x[3]), np.asarray(x).reshape(n + 1, d)[:n])
    np.testing.assert_array_equal(np.asarray(batch.w[3]), np.asarray(w))


def test_golden_values_pin_the_stream_across_jax_versions():
    # Recorded with JAX 0.10.2; a JAX release that changed these bits would change every trained number.
    batch = sample(jax.random.PRNGKey(0), TASK_PRESETS["vonoswald"], 2)
    np.testing.assert_allclose(np.asarray(batch.x[1, 0, :3]), [0.012498975, 0.42531502, -0.32596684], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(batch.w[0, :3]), [0.7057655, 1.0948477, 0.47464547], rtol=1e-6)


def test_seed_keys_are_fold_ins_of_the_seed():
    k_init, k_data = seed_keys(4)
    root = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(np.asarray(k_init), np.asarray(jax.random.fold_in(root, 0)))
    np.testing.assert_array_equal(np.asarray(k_data), np.asarray(jax.random.fold_in(root, 1)))


@pytest.mark.parametrize("model", [ModelConfig(dim=3, n_layers=2, mlp=True, layer_norm=True),
                                   GPTConfig(dim=2, n_context=3, d_model=8, n_layers=1, n_heads=2)],
                         ids=["lsa", "gpt"])
def test_initial_parameters_do_not_depend_on_the_global_threefry_setting(model):
    init = init_gpt if isinstance(model, GPTConfig) else init_params
    key = jax.random.PRNGKey(1)
    with jax.threefry_partitionable(True):
        a = init(key, model)
    with jax.threefry_partitionable(False):
        b = init(key, model)
    chex.assert_trees_all_equal(a, b)
