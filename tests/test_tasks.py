"""Task sampling (iclgd_synth.tasks): determinism, shapes, the laws the tasks are drawn from, and clear errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iclgd_synth as ic
from iclgd_synth.tasks import input_covariance


# The sampler compiles once per static configuration (sizes, input law, pool, whether noise / corruption are on);
# real-valued fields (x_range, w_scale, noise, x_scale, label_corruption) are traced. Tests share two sizes so that
# most of them reuse a compilation: SMALL for exact checks, BIG (2000 tasks x 10 inputs) for the statistical ones.
SMALL = (8, 5, 3)
BIG = (2000, 9, 4)


def _np(batch: ic.TaskBatch) -> ic.TaskBatch:
    """The batch as float64 NumPy arrays, so the checks below run without compiling anything."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), batch)


def _inputs(batch: ic.TaskBatch) -> np.ndarray:
    """All inputs, context and query, as (B * (N + 1), d)."""
    return np.concatenate([batch.x.reshape(-1, batch.x.shape[-1]), batch.x_query])


# ---------------------------------------------------------------------------------------------------------- determinism

def test_same_key_gives_same_tasks(key):
    a = ic.sample_tasks(key, *SMALL, noise=0.1, label_corruption=0.2)
    b = ic.sample_tasks(key, *SMALL, noise=0.1, label_corruption=0.2)
    chex.assert_trees_all_equal(a, b)


def test_different_keys_give_different_tasks(key):
    a = _np(ic.sample_tasks(key, *SMALL))
    b = _np(ic.sample_tasks(jax.random.fold_in(key, 1), *SMALL))
    for field in ("x", "y", "x_query", "y_query", "w"):
        assert np.mean(getattr(a, field) == getattr(b, field)) < 0.01, field


def test_sample_and_sample_tasks_agree(key):
    config = ic.TaskConfig(dim=SMALL[2], n_context=SMALL[1], noise=0.2)
    chex.assert_trees_all_equal(ic.sample(key, config, SMALL[0]), ic.sample_tasks(key, *SMALL, noise=0.2))


# --------------------------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("out_dim", [1, 3])
@pytest.mark.parametrize("dtype", [None, jnp.float32])
def test_sample_shapes_and_dtypes(key, out_dim, dtype):
    b, n, d = SMALL
    batch = ic.sample_tasks(key, b, n, d, out_dim=out_dim, dtype=dtype)
    chex.assert_shape(batch.x, (b, n, d))
    chex.assert_shape(batch.x_query, (b, d))
    if out_dim == 1:
        chex.assert_shape([batch.y, batch.y_query, batch.w], [(b, n), (b,), (b, d)])
    else:
        chex.assert_shape([batch.y, batch.y_query, batch.w], [(b, n, out_dim), (b, out_dim), (b, out_dim, d)])
    chex.assert_type(jax.tree.leaves(batch), jnp.float32)
    chex.assert_tree_all_finite(batch)
    assert (batch.batch_size, batch.n_context, batch.dim, batch.out_dim) == (b, n, d, out_dim)
    assert batch.vector_output == (out_dim > 1)


def test_sample_default_dtype_is_float64_under_x64(x64, key):
    chex.assert_type(jax.tree.leaves(ic.sample_tasks(key, *SMALL)), jnp.float64)
    chex.assert_type(jax.tree.leaves(ic.sample_tasks(key, *SMALL, dtype=jnp.float32)), jnp.float32)


# ------------------------------------------------------------------------------------------------------------- the laws

@pytest.mark.parametrize("out_dim", [1, 3])
def test_noiseless_labels_equal_w_dot_x(key, out_dim):
    batch = _np(ic.sample_tasks(key, *SMALL, out_dim=out_dim))
    w = batch.w if out_dim > 1 else batch.w[:, None]
    assert np.max(np.abs(batch.labels_BxNxO() - np.einsum("bod,bnd->bno", w, batch.x))) < 1e-5
    assert np.max(np.abs(batch.query_labels_BxO() - np.einsum("bod,bd->bo", w, batch.x_query))) < 1e-5


def test_label_noise_has_the_requested_std(key):
    batch = _np(ic.sample_tasks(key, *BIG, noise=0.5))
    resid = np.concatenate([(batch.y - np.einsum("bd,bnd->bn", batch.w, batch.x)).ravel(),
                            batch.y_query - np.einsum("bd,bd->b", batch.w, batch.x_query)])
    # 20000 draws: the sample std of N(0, 0.25) is within 1.5% with overwhelming probability.
    assert abs(resid.std() - 0.5) < 0.015
    assert abs(resid.mean()) < 0.02


def test_task_weights_have_the_requested_scale(key):
    w = np.asarray(ic.sample_tasks(key, *BIG, w_scale=2.0).w)
    assert abs(w.std() - 2.0) < 0.08 and abs(w.mean()) < 0.1  # 8000 draws


@pytest.mark.parametrize("x_range", [0.5, 1.0])
def test_uniform_inputs_lie_in_the_range_and_fill_it(key, x_range):
    xs = _inputs(_np(ic.sample_tasks(key, *BIG, x_dist="uniform", x_range=x_range)))
    assert np.max(np.abs(xs)) <= x_range
    assert xs.max() > 0.99 * x_range and xs.min() < -0.99 * x_range
    assert abs(xs.var() - x_range**2 / 3) < 0.02 * x_range**2


def test_x_scale_multiplies_the_inputs_and_labels_follow(key):
    a = _np(ic.sample_tasks(key, *SMALL))
    b = _np(ic.sample_tasks(key, *SMALL, x_scale=2.0))
    assert np.max(np.abs(b.x - 2 * a.x)) < 1e-6 and np.max(np.abs(b.x_query - 2 * a.x_query)) < 1e-6
    assert np.max(np.abs(b.y - 2 * a.y)) < 1e-5 and np.max(np.abs(b.w - a.w)) == 0.0


_COV_CASES = {
    "uniform": dict(x_dist="uniform", x_range=0.5),
    "normal": dict(x_dist="normal"),
    "laplace": dict(x_dist="laplace"),
    "exponential": dict(x_dist="exponential"),
    "anisotropic": dict(x_dist="anisotropic", condition_number=20.0, cov_seed=3),
    "anisotropic-x_cov": dict(x_dist="anisotropic", x_cov=((2.0, 0.5, 0.0, 0.0), (0.5, 1.0, 0.2, 0.0),
                                                           (0.0, 0.2, 0.5, 0.0), (0.0, 0.0, 0.0, 0.25))),
}


@pytest.mark.parametrize("options", list(_COV_CASES.values()), ids=list(_COV_CASES))
def test_empirical_input_covariance_matches_input_covariance(key, options):
    b, n, d = BIG
    empirical = np.cov(_inputs(_np(ic.sample_tasks(key, b, n, d, **options))), rowvar=False)
    expected = np.asarray(input_covariance(ic.TaskConfig(dim=d, n_context=n, **options)))
    # 20000 draws; the relative error is ~1.5% (5% for the heavy-tailed Laplace variance), so 8% is a loose bound.
    assert np.max(np.abs(empirical - expected)) / np.max(np.abs(expected)) < 0.08


def test_anisotropic_covariance_has_the_requested_condition_number_and_unit_mean_eigenvalue(x64):
    cov = np.asarray(input_covariance(ic.TaskConfig(dim=6, x_dist="anisotropic", condition_number=30.0)))
    eig = np.linalg.eigvalsh(cov)
    assert abs(eig.max() / eig.min() - 30.0) < 1e-8
    assert abs(eig.mean() - 1.0) < 1e-10
    assert np.max(np.abs(cov - cov.T)) < 1e-12


def test_pool_size_restricts_tasks_to_pool_rows(key):
    b, n, d = BIG
    config = ic.TaskConfig(dim=d, n_context=n, pool_size=5, pool_seed=7)
    pool = np.asarray(ic.task_pool(config))[:, 0]  # (M, d)
    batch = _np(ic.sample(key, config, 300))
    dist = np.abs(batch.w[:, None, :] - pool[None]).max(-1)  # (B, M)
    assert np.max(dist.min(axis=1)) == 0.0  # every task is exactly a pool row
    assert set(dist.argmin(axis=1).tolist()) == set(range(5))  # and 300 draws visit all five rows
    # the pool depends on pool_seed alone, not on the sampling key
    other_key = _np(ic.sample(jax.random.fold_in(key, 1), config, 300))
    assert np.abs(other_key.w[:, None, :] - pool[None]).max(-1).min(axis=1).max() == 0.0
    other_pool = np.asarray(ic.task_pool(config.replace(pool_seed=8)))[:, 0]
    assert np.abs(other_pool[:, None] - pool[None]).max(-1).min() > 1e-3


def test_label_corruption_changes_about_the_right_fraction(key):
    p = 0.3
    batch = _np(ic.sample_tasks(key, *BIG, label_corruption=p))
    changed = np.abs(batch.y - np.einsum("bd,bnd->bn", batch.w, batch.x)) > 1e-5
    # 18000 labels: the standard deviation of the fraction is sqrt(0.3 * 0.7 / 18000) ~ 0.0034.
    assert abs(changed.mean() - p) < 0.02
    # the query label is never corrupted
    assert np.max(np.abs(batch.y_query - np.einsum("bd,bd->b", batch.w, batch.x_query))) < 1e-5


def test_full_label_corruption_changes_every_context_label_and_nothing_else(key):
    clean = _np(ic.sample_tasks(key, *BIG))
    full = _np(ic.sample_tasks(key, *BIG, label_corruption=1.0))
    assert np.mean(np.abs(full.y - clean.y) > 1e-5) == 1.0
    assert np.max(np.abs(full.x - clean.x)) == 0.0 and np.max(np.abs(full.y_query - clean.y_query)) == 0.0


def test_vonoswald_preset_is_the_reference_setting():
    cfg = ic.TASK_PRESETS["vonoswald"]
    assert (cfg.dim, cfg.n_context, cfg.x_dist, cfg.x_range, cfg.noise, cfg.w_scale) == (10, 10, "uniform", 0.5, 0.0,
                                                                                           1.0)
    assert ic.TASK_PRESETS["vonoswald_paper_text"].x_range == 1.0
    assert hash(cfg) == hash(ic.TaskConfig(dim=10, n_context=10))
    assert cfg.replace(noise=0.1).to_dict()["noise"] == 0.1


# ------------------------------------------------------------------------------------------------------- batch handling

@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_task_batch_from_numpy_arrays_works_in_lsa_predict_and_gd_predict(key, np_dtype):
    batch = ic.sample_tasks(key, *SMALL)
    np_batch = ic.TaskBatch(*(np.asarray(a).astype(np_dtype) for a in (batch.x, batch.y, batch.x_query,
                                                                           batch.y_query)))
    params = ic.gd_params(SMALL[2], 1.5, 2)
    for fn in (lambda b: params(b), lambda b: ic.GD(eta=1.5, steps=2)(b)):
        out = fn(np_batch)
        chex.assert_shape(out, (SMALL[0],))
        chex.assert_type(out, jnp.float32)  # x64 is off: float64 NumPy input is computed in float32
        assert np.max(np.abs(np.asarray(out) - np.asarray(fn(batch)))) < 1e-6


def test_float64_numpy_batch_is_computed_in_float64_under_x64(x64, key):
    batch = ic.sample_tasks(key, *SMALL)
    np_batch = ic.TaskBatch(*(np.asarray(a) for a in (batch.x, batch.y, batch.x_query, batch.y_query)))
    out_lsa = (ic.gd_params(SMALL[2], 1.5, 2))(np_batch)
    out_gd = ic.GD(eta=1.5, steps=2)(np_batch)
    chex.assert_type([out_lsa, out_gd], jnp.float64)
    assert np.max(np.abs(np.asarray(out_lsa) - np.asarray(out_gd))) < 1e-12


def test_with_context_order_permutes_demonstrations_only(key):
    batch = _np(ic.sample_tasks(key, *SMALL))
    perm = np.array([4, 2, 0, 1, 3])
    shuffled = _np(batch.with_context_order(perm))
    chex.assert_trees_all_equal((shuffled.x, shuffled.y), (batch.x[:, perm], batch.y[:, perm]))
    chex.assert_trees_all_equal((shuffled.x_query, shuffled.y_query, shuffled.w), (batch.x_query, batch.y_query,
                                                                                   batch.w))
    per_task = np.stack([np.roll(np.arange(5), i) for i in range(SMALL[0])])
    shuffled = _np(batch.with_context_order(per_task))
    for i in range(SMALL[0]):
        chex.assert_trees_all_equal((shuffled.x[i], shuffled.y[i]), (batch.x[i, per_task[i]],
                                                                     batch.y[i, per_task[i]]))


def test_slice_takes_a_range_of_tasks(key):
    batch = ic.sample_tasks(key, *SMALL)
    part = batch.slice(2, 5)
    assert part.batch_size == 3
    chex.assert_trees_all_equal((part.x, part.w, part.y_query), (batch.x[2:5], batch.w[2:5], batch.y_query[2:5]))


# --------------------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,args", [
    ("batch_size", (0, 5, 3)), ("batch_size", (-1, 5, 3)),
    ("n_context", (4, 0, 3)), ("n_context", (4, -2, 3)),
    ("dim", (4, 5, 0)), ("dim", (4, 5, -2)),
])
def test_sample_tasks_rejects_non_positive_sizes(key, name, args):
    with pytest.raises(ValueError, match=name):
        ic.sample_tasks(key, *args)


def test_sample_tasks_rejects_non_integer_sizes(key):
    with pytest.raises(TypeError, match="batch_size"):
        ic.sample_tasks(key, 2.5, 5, 3)
    with pytest.raises(TypeError, match="dim"):
        ic.sample_tasks(key, 2, 5, "3")


def test_sample_tasks_rejects_unknown_x_dist(key):
    with pytest.raises(ValueError, match="x_dist.*cauchy"):
        ic.sample_tasks(key, 4, 5, 3, x_dist="cauchy")


def test_sample_tasks_rejects_unknown_task_option(key):
    with pytest.raises(TypeError, match="unknown task option.*'n_ctx'"):
        ic.sample_tasks(key, 4, 5, 3, n_ctx=5)


@pytest.mark.parametrize("name,value", [
    ("out_dim", 0), ("x_range", 0.0), ("x_range", -1.0), ("noise", -0.1), ("noise", float("nan")),
    ("w_scale", -1.0), ("pool_size", 0), ("label_corruption", 1.5), ("label_corruption", -0.1),
    ("condition_number", 0.5), ("x_scale", float("inf")),
])
def test_sample_tasks_rejects_out_of_range_options(key, name, value):
    with pytest.raises(ValueError, match=name):
        ic.sample_tasks(key, 4, 5, 3, **{name: value})


def test_sample_tasks_rejects_a_non_positive_definite_x_cov(key):
    with pytest.raises(ValueError, match="x_cov"):
        ic.sample_tasks(key, 4, 5, 2, x_dist="anisotropic", x_cov=((1.0, 2.0), (2.0, 1.0)))
    with pytest.raises(ValueError, match="x_cov"):
        ic.sample_tasks(key, 4, 5, 2, x_dist="anisotropic", x_cov=np.eye(3))


@pytest.mark.parametrize("dtype,shown", [(jnp.int32, "int32"), ("foo", "'foo'"), (bool, "bool"),
                                         (np.complex64, "complex64"), ("int8", "int8")])
def test_sample_tasks_rejects_a_non_float_dtype_listing_the_accepted_ones(key, dtype, shown):
    message = rf"dtype must be a float dtype \(float16, bfloat16, float32 or float64\) or None, got {shown}$"
    with pytest.raises(TypeError, match=message):
        ic.sample_tasks(key, 4, 5, 3, dtype=dtype)
    with pytest.raises(TypeError, match=message):
        ic.sample(key, ic.TaskConfig(dim=3, n_context=5), 4, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float16", jnp.bfloat16, np.float32])
def test_sample_tasks_accepts_every_float_dtype(key, dtype):
    chex.assert_type(jax.tree.leaves(ic.sample_tasks(key, 4, 5, 3, dtype=dtype)), jnp.dtype(dtype))


@pytest.mark.parametrize("x_dist", ["uniform", "normal", "laplace", "exponential"])
@pytest.mark.parametrize("name,value", [("x_cov", np.eye(3)), ("condition_number", 30.0), ("cov_seed", 2)])
def test_anisotropic_options_with_another_input_law_are_rejected_not_ignored(key, x_dist, name, value):
    with pytest.raises(ValueError, match=rf"{name} is only used with x_dist='anisotropic' \(got x_dist='{x_dist}'"):
        ic.sample_tasks(key, 4, 5, 3, x_dist=x_dist, **{name: value})
    with pytest.raises(ValueError, match=rf"{name} is only used with x_dist='anisotropic'"):
        ic.TaskConfig(dim=3, x_dist=x_dist, **{name: value})
    ic.TaskConfig(dim=3, x_dist="anisotropic", **{name: value})  # where it belongs, it is accepted
    ic.TaskConfig(dim=3, x_dist=x_dist, condition_number=10.0, cov_seed=0)  # defaults, spelled out, are fine


def test_task_pool_needs_pool_size():
    with pytest.raises(ValueError, match="pool_size"):
        ic.task_pool(ic.TaskConfig())
