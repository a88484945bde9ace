"""Weight statistics on matrices with known answers, the hand-constructed weights' values, and the resemblance
positions (percentile, z-score, inside the LLM's range)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iclgd_synth import gd_params
from iclgd_synth.weights import stats as S
from iclgd_synth.weights.collect import PRODUCTS, collect_stats
from iclgd_synth.weights.resemblance import distribution, inside_counts, position, resemblance
from iclgd_synth.weights.sources import (
    HAND_ETA, HandSpec, construction_at_zero_context, hand_source, p_vs_context_size, synthetic_source,
)


@given(n=st.integers(2, 40))
def test_identity_has_full_rank_and_unit_cosine_with_identity(n):
    r = S.matrix_stats(np.eye(n))
    assert r["stable_rank"] == pytest.approx(n)
    assert r["eff_rank"] == pytest.approx(n)
    assert r["stable_rank/n"] == pytest.approx(1.0) and r["rank/n"] == 1.0
    assert r["cos_I"] == pytest.approx(1.0)
    assert r["symmetry"] == pytest.approx(1.0) and r["diag_energy"] == pytest.approx(1.0)
    assert r["zero"] == pytest.approx(1 - 1 / n)
    assert r["top10_energy"] == pytest.approx(math.ceil(0.1 * n) / n)
    assert r["sv_slope"] == pytest.approx(0.0, abs=1e-12) if n >= 3 else math.isnan(r["sv_slope"])


@given(m=st.integers(2, 30), n=st.integers(2, 30), seed=st.integers(0, 1000))
def test_rank_one_matrix_has_stable_and_effective_rank_one(m, n, seed):
    rng = np.random.default_rng(seed)
    w = np.outer(rng.standard_normal(m), rng.standard_normal(n))
    r = S.matrix_stats(w)
    assert r["stable_rank"] == pytest.approx(1.0)
    assert r["eff_rank"] == pytest.approx(1.0, abs=1e-9)
    assert r["rank/n"] == pytest.approx(1 / min(m, n))
    assert r["top10_energy"] == pytest.approx(1.0)


def test_sparse_matrix_has_the_known_zero_and_small_fractions():
    w = np.zeros((20, 50))
    w.flat[:100] = 1.0       # 100 ones
    w.flat[100:150] = 5e-4   # 50 entries below 1e-3 but not below 1e-4
    r = S.entry_stats(w)
    assert r["zero"] == pytest.approx(850 / 1000)
    assert r["abs<1e-2"] == pytest.approx(900 / 1000) and r["abs<1e-3"] == pytest.approx(900 / 1000)
    assert r["abs<1e-4"] == pytest.approx(850 / 1000)
    rms = math.sqrt((100 + 50 * 25e-8) / 1000)
    assert r["rel<1e-2"] == pytest.approx(np.mean(np.abs(w) < 1e-2 * rms))


def test_scale_invariant_statistics_do_not_change_with_scale_and_absolute_ones_do():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((60, 40)) * np.logspace(-4, 0, 40)
    a, b = S.matrix_stats(w), S.matrix_stats(1e-3 * w)
    for k in ("rel<1e-2", "rel<1e-4", "kurtosis", "ks_normal", "stable_rank", "eff_rank", "rank/n", "top10_energy",
              "sv_slope"):
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k
    assert b["abs<1e-3"] > a["abs<1e-3"]


def test_gaussian_entries_have_zero_excess_kurtosis_and_laplace_three():
    rng = np.random.default_rng(1)
    assert S.excess_kurtosis(rng.standard_normal((500, 500))) == pytest.approx(0.0, abs=0.05)
    assert S.excess_kurtosis(rng.laplace(size=(500, 500))) == pytest.approx(3.0, abs=0.25)
    assert S.ks_normal_distance(rng.standard_normal((300, 300))) < 0.01
    assert S.ks_normal_distance(rng.laplace(size=(300, 300))) > 0.03


def test_ks_distance_of_a_two_point_law_is_known_exactly():
    from scipy.special import ndtr

    w = np.array([[-1.0, 1.0], [1.0, -1.0]])  # mean 0, std 1: F jumps 0 -> 1/2 at -1
    assert S.ks_normal_distance(w) == pytest.approx(0.5 - ndtr(-1.0), abs=1e-12)
    assert math.isnan(S.ks_normal_distance(np.ones((3, 3)))) and math.isnan(S.excess_kurtosis(np.ones((3, 3))))


def test_kurtosis_and_ks_match_scipy_on_a_matrix_with_many_zeros():
    from scipy import stats as ss

    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 30))
    w[w < 0.4] = 0.0
    x = w.ravel()
    assert S.excess_kurtosis(w) == pytest.approx(ss.kurtosis(x), rel=1e-10)
    assert S.ks_normal_distance(w) == pytest.approx(ss.kstest(x, "norm", args=(x.mean(), x.std())).statistic,
                                                    rel=1e-10)


def test_symmetry_of_symmetric_antisymmetric_and_random_matrices():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((200, 200))
    assert S.symmetry(a + a.T) == pytest.approx(1.0)
    assert S.symmetry(a - a.T) == pytest.approx(0.0, abs=1e-12)
    assert S.symmetry(a) == pytest.approx(1 / math.sqrt(2), abs=0.02)
    assert S.identity_cosine(-np.eye(5)) == pytest.approx(-1.0)
    assert S.top_row_energy(np.outer(np.eye(4)[2], np.ones(4))) == pytest.approx(1.0)


def test_power_law_spectrum_has_the_fitted_slope():
    s = np.arange(1, 51, dtype=np.float64) ** -1.5
    assert S.spectrum_slope(np.sort(s)[::-1], (50, 50)) == pytest.approx(-1.5)
    assert S.matrix_stats(np.diag(s))["sv_slope"] == pytest.approx(-1.5)


@given(seed=st.integers(0, 10_000), density=st.sampled_from([0.005, 0.02, 0.04]))
def test_block_singular_values_equal_dense_ones(seed, density):
    rng = np.random.default_rng(seed)
    m, n = rng.integers(5, 120, size=2)
    w = np.where(rng.random((m, n)) < density, rng.standard_normal((m, n)), 0.0)
    w[: min(m, n) // 3, : min(m, n) // 3] += np.eye(min(m, n) // 3) * 2.0
    np.testing.assert_allclose(S.singular_values(w, "blocks"), S.singular_values(w, "dense"), atol=1e-10)


@given(seed=st.integers(0, 10_000))
def test_thin_product_singular_values_equal_dense_ones(seed):
    rng = np.random.default_rng(seed)
    m, r, n = rng.integers(20, 80), rng.integers(1, 8), rng.integers(20, 80)
    a, b = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    np.testing.assert_allclose(S.product_singular_values(a, b), np.linalg.svd(a @ b, compute_uv=False), atol=1e-9)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="matrix"):
        S.matrix_stats(np.ones(3))
    with pytest.raises(ValueError, match="square"):
        S.square_stats(np.ones((2, 3)))
    with pytest.raises(ValueError, match="method"):
        S.singular_values(np.eye(2), "svd")
    assert math.isnan(S.stable_rank(np.zeros(3)))


# --- hand-constructed weights -----------------------------------------------------------------------------------------


def test_hand_gd_weights_have_the_constructions_exact_statistics():
    d = 10
    r = collect_stats(hand_source(HandSpec("gd", d + 1)))
    dd = d + 1
    assert r.value("W_Q", "zero") == pytest.approx(1 - d / dd ** 2)
    assert r.value("W_V", "zero") == pytest.approx(1 - 1 / dd ** 2)
    assert r.value("W_K^T W_Q", "cos_I") == pytest.approx(math.sqrt(d / dd))
    assert r.value("W_K^T W_Q", "stable_rank") == pytest.approx(d)
    assert r.value("W_O W_V", "top_row_energy") == pytest.approx(1.0)  # all of P W_V is in the label row
    assert r.value("W_O W_V", "stable_rank") == pytest.approx(1.0)
    assert r.value("W_O W_V", "cos_I") == pytest.approx(-1 / math.sqrt(dd))  # P W_V = -(eta/N) e_y e_y^T
    assert r.value("W_Q head", "zero") == r.value("W_Q", "zero")  # one head: the slice is the whole matrix


def test_hand_weights_at_4096_use_the_sparse_structure_and_give_exact_ranks():
    p = gd_params(4095, HAND_ETA, n_context=10)
    w_k = np.asarray(p.layers[0]["w_k"][0], np.float64)
    s = S.singular_values(w_k)  # block path: no dense 4096 x 4096 SVD
    assert S.is_sparse(w_k)
    assert S.stable_rank(s) == pytest.approx(4095) and S.numerical_rank(s, w_k.shape) == 4095
    assert S.zero_fraction(w_k) == pytest.approx(1 - 4095 / 4096 ** 2)
    pv = S.product(p.layers[0]["w_p"][0], p.layers[0]["w_v"][0])  # sparse product, exact
    assert np.count_nonzero(pv) == 1 and pv[-1, -1] == pytest.approx(-HAND_ETA / 10)
    assert S.stable_rank(S.singular_values(pv)) == pytest.approx(1.0)


def test_p_depends_on_the_number_of_demonstrations_and_is_undefined_at_zero():
    rows = p_vs_context_size((1, 10, 1000), eta=6.0)
    assert [r["P_yy"] for r in rows] == pytest.approx([6.0, 0.6, 0.006])
    assert [r["abs<1e-2"] for r in rows] == pytest.approx([120 / 121, 120 / 121, 1.0])
    assert construction_at_zero_context().startswith("refused")


# --- resemblance ------------------------------------------------------------------------------------------------------


def test_position_gives_percentile_z_and_inside():
    sample = np.arange(1, 101, dtype=np.float64)
    p = position(50.0, sample)
    assert p["percentile"] == pytest.approx(49.5)
    assert p["z"] == pytest.approx((50 - 50.5) / sample.std())
    assert p["inside"] is True
    out = position(1000.0, sample)
    assert out["percentile"] == 100.0 and out["inside"] is False
    assert position(1.0, sample)["inside"] is False  # below the 1st percentile (1.99)
    assert position(float("nan"), sample)["inside"] is None
    assert position(3.0, [2.0, 2.0])["z"] == math.inf
    d = distribution(sample)
    assert (d["n"], d["min"], d["max"], d["median"]) == (100, 1.0, 100.0, 50.5)


def test_resemblance_places_hand_weights_outside_a_gaussian_stand_in():
    llm = collect_stats(synthetic_source(n_layers=3, hidden=32, n_heads=4, n_kv_heads=2))
    hand = collect_stats(hand_source(("gd", 11)))
    # per layer: 4 whole matrices + (H + G + G + H) head slices + 2 H products
    assert len(llm.records) == 3 * (4 + 12 + 8)
    assert len(llm.values("W_K^T W_Q", "symmetry")) == 3 * 4
    rows = resemblance([llm], [hand], [("W_Q", "zero"), ("W_K^T W_Q", "cos_I"), ("W_O W_V", "symmetry")])
    assert [r["sources"][hand.name]["positions"][llm.name]["inside"] for r in rows] == [False, False, False]
    assert inside_counts(rows) == {hand.name: {llm.name: (0, 3)}}
    assert set(PRODUCTS) <= {r.matrix for r in llm.records}
