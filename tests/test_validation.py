"""Argument checks (iclgd_synth.validation) and batch validation: clear errors that name the parameter, no checks on
traced values, and a validated batch of one float dtype."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iclgd_synth as ic
from iclgd_synth.tasks import validate_batch
from iclgd_synth.validation import (
    check_choice, check_float, check_int, check_shape, finite_or_inf, is_concrete,
)


def test_check_int_accepts_integers_and_integral_floats():
    assert check_int("n", 3, min_value=1) == 3
    assert check_int("n", np.int64(4)) == 4 and isinstance(check_int("n", np.int64(4)), int)
    assert check_int("n", 5.0) == 5


@pytest.mark.parametrize("value,kwargs,exc,message", [
    (0, dict(min_value=1), ValueError, r"n must be an integer >= 1, got 0"),
    (11, dict(min_value=1, max_value=10), ValueError, r"n must be an integer in \[1, 10\], got 11"),
    (2.5, dict(min_value=1, max_value=10), TypeError, r"n must be an integer in \[1, 10\], got 2.5"),
    (True, {}, TypeError, r"n must be an integer"),
    (np.bool_(True), {}, TypeError, r"n must be an integer"),
    (float("inf"), {}, TypeError, r"n must be an integer"),
    (np.float32(1.5), {}, TypeError, r"n must be an integer"),
    ("3", {}, TypeError, r"n must be an integer"),
    (None, {}, TypeError, r"n must be an integer"),
])
def test_check_int_names_the_parameter_and_the_range(value, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        check_int("n", value, **kwargs)


def test_check_float_accepts_scalars_and_arrays_in_range():
    assert check_float("eta", 1.5, min_value=0.0) == 1.5
    arr = np.array([0.1, 0.2])
    assert check_float("eta", arr, min_value=0.0, max_value=1.0) is arr
    assert check_float("eta", 2) == 2 and check_float("eta", np.int64(2)) == 2  # integers are reals
    for value in (jnp.ones(2, jnp.bfloat16), jnp.float32(0.5), np.float16(0.5)):
        assert check_float("eta", value) is value


@pytest.mark.parametrize("value,kwargs,exc,message", [
    (float("nan"), {}, ValueError, "eta must be finite"),
    (float("inf"), {}, ValueError, "eta must be finite"),
    ([1.0, float("nan")], {}, ValueError, "eta must be finite"),
    (-0.1, dict(min_value=0.0), ValueError, r"eta must be in \[0.0, inf\]"),
    (0.0, dict(min_value=0.0, strict_min=True), ValueError, r"eta must be in \(0.0, inf\]"),
    (2.0, dict(max_value=1.0), ValueError, r"eta must be in \[-inf, 1.0\]"),
    ("fast", {}, TypeError, "eta must be a real number"),
    ("1", {}, TypeError, "eta must be a real number, got '1' of type str"),
    (b"1", {}, TypeError, "eta must be a real number"),
    (True, {}, TypeError, "eta must be a real number, got True of type bool"),
    (np.bool_(False), {}, TypeError, "eta must be a real number"),
    ([True, False], {}, TypeError, "eta must be a real number"),
    (np.array(["1.0"]), {}, TypeError, "eta must be a real number"),
    (1 + 2j, {}, TypeError, "eta must be a real number"),
    ([1.0, None], {}, TypeError, "eta must be a real number"),
])
def test_check_float_names_the_parameter_and_the_range(value, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        check_float("eta", value, **kwargs)


def test_checks_pass_traced_values_through():
    # Inside jit the value is unknown: the check must not fail (nor concretize the tracer).
    @jax.jit
    def f(eta):
        assert not is_concrete(eta)
        return check_float("eta", eta, min_value=0.0) * 2.0

    assert float(f(jnp.float32(-1.0))) == -2.0  # the check is skipped on the traced value
    assert is_concrete(1.0) and is_concrete(jnp.ones(2))


def test_check_choice_and_check_shape():
    assert check_choice("form", "dual", ("dual", "quadratic")) == "dual"
    with pytest.raises(ValueError, match="form must be one of 'dual', 'quadratic'; got 'fast'"):
        check_choice("form", "fast", ("dual", "quadratic"))
    check_shape("x", np.zeros((2, 3)), (2, None), "(B, d)")
    with pytest.raises(ValueError, match=r"x must have shape \(B, d\) = \(2, \?\), got \(3, 3\)"):
        check_shape("x", np.zeros((3, 3)), (2, None), "(B, d)")
    with pytest.raises(ValueError, match="x must have shape"):
        check_shape("x", np.zeros(2), (2, None), "(B, d)")


def test_check_shape_prints_one_tuples_with_a_trailing_comma():
    with pytest.raises(ValueError, match=r"^y must have shape \(B,\) = \(2,\), got \(3,\)$"):
        check_shape("y", np.zeros(3), (2,), "(B,)")
    with pytest.raises(ValueError, match=r"^y must have shape \(B,\) = \(\?,\), got \(\)$"):
        check_shape("y", np.float64(1.0), (None,), "(B,)")


def test_finite_or_inf_maps_nan_to_inf():
    assert finite_or_inf(float("nan")) == math.inf
    assert finite_or_inf(np.float32(2.5)) == 2.5


# ------------------------------------------------------------------------------------------------------------ TaskBatch

def _batch(b=3, n=4, d=2, out_dim=None, with_w=True):
    rng = np.random.default_rng(0)
    y_shape, yq_shape, w_shape = ((b, n), (b,), (b, d)) if out_dim is None else ((b, n, out_dim), (b, out_dim),
                                                                               (b, out_dim, d))
    return ic.TaskBatch(x=rng.normal(size=(b, n, d)), y=rng.normal(size=y_shape), x_query=rng.normal(size=(b, d)),
                        y_query=rng.normal(size=yq_shape), w=rng.normal(size=w_shape) if with_w else None)


def test_validate_batch_returns_jax_arrays_of_one_float_dtype():
    batch = _batch()
    mixed = batch.replace(x=batch.x.astype(np.float32), y=batch.y.astype(np.float16),
                          y_query=np.round(batch.y_query).astype(np.int32))
    out = validate_batch(mixed)
    chex.assert_type(jax.tree.leaves(out), jnp.float32)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(out))
    chex.assert_trees_all_close(out.x, batch.x.astype(np.float32))
    assert validate_batch(_batch(with_w=False)).w is None


def test_validate_batch_keeps_float64_under_x64(x64):
    chex.assert_type(jax.tree.leaves(validate_batch(_batch(out_dim=2))), jnp.float64)


@pytest.mark.parametrize("field,bad,message", [
    ("x", np.zeros((3, 4)), r"batch\.x must have shape \(B, N, d\)"),
    ("x", np.zeros((0, 4, 2)), r"batch\.x must have B, N, d >= 1"),
    ("y", np.zeros((3, 5)), r"batch\.y must have shape \(B, N\) = \(3, 4\), got \(3, 5\)"),
    ("y", np.zeros((2, 4)), r"batch\.y must have shape \(B, N\) = \(3, 4\)"),
    ("y", np.zeros((3,)), r"batch\.y must have shape \(B, N\) or \(B, N, d_out\)"),
    ("x_query", np.zeros((3, 3)), r"batch\.x_query must have shape \(B, d\) = \(3, 2\)"),
    ("y_query", np.zeros((4,)), r"batch\.y_query must have shape \(B,\) = \(3,\), got \(4,\)"),
    ("w", np.zeros((3, 5)), r"batch\.w must have shape \(B, d\) = \(3, 2\)"),
])
def test_validate_batch_names_the_mismatched_field(field, bad, message):
    with pytest.raises(ValueError, match=message):
        validate_batch(_batch().replace(**{field: bad}))


def test_validate_batch_checks_vector_label_shapes():
    batch = _batch(out_dim=2)
    assert validate_batch(batch).out_dim == 2
    with pytest.raises(ValueError, match=r"batch\.y_query must have shape \(B, d_out\) = \(3, 2\)"):
        validate_batch(batch.replace(y_query=np.zeros((3,))))
    with pytest.raises(ValueError, match=r"batch\.w must have shape \(B, d_out, d\)"):
        validate_batch(batch.replace(w=np.zeros((3, 2))))


def test_validate_batch_rejects_non_batches():
    with pytest.raises(TypeError, match="batch must be an iclgd_synth.TaskBatch"):
        validate_batch((np.zeros((1, 2, 3)),))


def test_task_batch_of_nested_python_lists_validates_and_predicts():
    # A TaskBatch of lists used to crash inside validate_batch ("list indices must be integers").
    lists = ic.TaskBatch(x=[[[1.0, 2.0], [3.0, 4.0]]], y=[[1.0, 2.0]], x_query=[[1.0, 0.0]], y_query=[1.0],
                         w=[[0.0, 0.5]])
    out = validate_batch(lists)
    chex.assert_shape([out.x, out.y, out.x_query, out.y_query, out.w], [(1, 2, 2), (1, 2), (1, 2), (1,), (1, 2)])
    chex.assert_type(jax.tree.leaves(out), jnp.float32)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(out))
    arrays = ic.TaskBatch(*(np.asarray(a, np.float32) for a in (lists.x, lists.y, lists.x_query, lists.y_query)))
    chex.assert_trees_all_close(ic.GD(eta=0.5, steps=2)(lists), ic.GD(eta=0.5, steps=2)(arrays))
    chex.assert_trees_all_close((ic.gd_params(2, 0.5))(lists), ic.GD(eta=0.5)(arrays))


def test_task_batch_create_validates_at_construction():
    made = ic.TaskBatch.create(x=[[[1.0, 2.0], [3.0, 4.0]]], y=[[1.0, 2.0]], x_query=[[1.0, 0.0]], y_query=[1.0])
    assert isinstance(made, ic.TaskBatch) and made.w is None and isinstance(made.x, jax.Array)
    chex.assert_shape(made.x, (1, 2, 2))
    with pytest.raises(ValueError, match=r"batch\.y must have shape \(B, N\) = \(1, 2\), got \(1, 3\)"):
        ic.TaskBatch.create(x=np.zeros((1, 2, 2)), y=np.zeros((1, 3)), x_query=np.zeros((1, 2)), y_query=np.zeros(1))


def test_validate_batch_rejects_ragged_and_non_numeric_fields():
    with pytest.raises(ValueError, match=r"batch\.x must be a rectangular array"):
        ic.TaskBatch.create(x=[[[1.0, 2.0], [3.0]]], y=[[1.0, 2.0]], x_query=[[1.0, 0.0]], y_query=[1.0])
    with pytest.raises(TypeError, match=r"batch\.y must hold real numbers"):
        ic.TaskBatch.create(x=np.zeros((1, 2, 2)), y=[["a", "b"]], x_query=np.zeros((1, 2)), y_query=np.zeros(1))
