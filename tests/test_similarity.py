"""The one cosine: values against a direct computation, and its zero policy (undefined, left out of means)."""

import numpy as np
import pytest

from iclgd_synth.similarity import cosine, cosine_rows, mean_defined


def test_cosine_rows_match_the_definition_on_random_rows():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 3, 2)), rng.standard_normal((7, 3, 2))
    direct = [np.dot(x.ravel(), y.ravel()) / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]
    np.testing.assert_allclose(cosine_rows(a, b), direct, rtol=1e-12)
    assert cosine(a[0], 2.5 * a[0]) == pytest.approx(1.0) and cosine(a[0], -a[0]) == pytest.approx(-1.0)


def test_a_zero_row_has_no_direction_and_is_left_out_of_the_mean():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    cos = cosine_rows(a, b)
    assert cos[0] == pytest.approx(1.0) and np.isnan(cos[1]) and cos[2] == pytest.approx(-1.0)
    assert mean_defined(cos) == (pytest.approx(0.0), 1)
    assert np.isnan(cosine(np.zeros(3), np.ones(3)))


def test_rows_at_rounding_level_count_as_zero():
    a = np.array([[1.0, 2.0], [1e-14, 0.0]])
    assert np.isnan(cosine_rows(a, np.ones((2, 2)))[1])
    with pytest.raises(ValueError, match="same shape"):
        cosine_rows(np.ones((2, 3)), np.ones((2, 2)))
