"""Weight statistics on matrices with known answers, the hand-constructed weights' values, and the resemblance
positions (percentile, z-score, inside the LLM's range)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iclgd_synth import gd_params
from iclgd_synth.weights import stats as S
from iclgd_synth.weights.collect import PRODUCTS, collect_stats
from iclgd_synth.weights.loaders import arrays_source
from iclgd_synth.weights.resemblance import SUMMARY_ROWS, distribution, inside_counts, position, resemblance
from iclgd_synth.weights.sources import (
    HAND_ETA, HandSpec, construction_at_zero_context, hand_source, p_vs_context_size, synthetic_source,
)


@given(n=st.integers(2, 40))
def test_identity_has_full_rank_and_unit_cosine_with_identity(n):
    r = S.matrix_stats(np.eye(n), square=True)
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


def test_square_gaussian_matrix_has_stable_rank_near_a_quarter_of_its_size():
    # ||W||_F^2 ~ n^2 and ||W||_2 ~ 2 sqrt(n) (Marchenko-Pastur edge), so the stable rank -> n / 4; at n = 400 the
    # largest singular value sits O(n^(-2/3)) below the edge on average, and the ratio is within 3% of 1/4
    n = 400
    for seed in range(3):
        w = np.random.default_rng(seed).standard_normal((n, n))
        r = S.matrix_stats(w)
        assert r["stable_rank/n"] == pytest.approx(0.25, rel=0.03), seed
        assert r["rank/n"] == 1.0 and r["kurtosis"] == pytest.approx(0.0, abs=0.05)


def test_square_statistics_only_when_asked_for():
    w = np.random.default_rng(0).standard_normal((12, 12))
    assert not set(S.PRODUCT_STATISTICS) & set(S.matrix_stats(w))  # a square whole-layer matrix: none of them
    assert set(S.PRODUCT_STATISTICS) <= set(S.matrix_stats(w, square=True))
    with pytest.raises(ValueError, match="square"):
        S.matrix_stats(np.ones((3, 4)), square=True)


@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["gauss", "ties", "sparse", "laplace", "shifted"]))
def test_entry_statistics_equal_a_direct_pass_over_every_entry(seed, kind):
    """The sorted-array fractions and the block-pruned KS search give exactly the values of the definitions."""
    from scipy import stats as ss

    rng = np.random.default_rng(seed)
    m, n = rng.integers(1, 120, size=2)
    w = {"gauss": lambda: rng.standard_normal((m, n)),
         "ties": lambda: np.round(rng.standard_normal((m, n)) * 2) / 2,
         "sparse": lambda: np.where(rng.random((m, n)) < 0.05, rng.standard_normal((m, n)), 0.0),
         "laplace": lambda: 1e-3 * rng.laplace(size=(m, n)),
         "shifted": lambda: 3.0 + rng.exponential(size=(m, n))}[kind]()
    r = S.entry_stats(w)
    a, x = np.abs(w), w.ravel()
    rms = np.sqrt(np.mean(a * a))
    assert r["zero"] == np.mean(w == 0)
    for t in S.THRESHOLDS:
        assert r[f"abs<{S._t(t)}"] == np.mean(a < t)
        assert r[f"rel<{S._t(t)}"] == np.mean(a < t * rms)
    if x.std() > 0:
        assert r["ks_normal"] == pytest.approx(ss.kstest(x, "norm", args=(x.mean(), x.std())).statistic, abs=1e-12)
        assert r["kurtosis"] == pytest.approx(ss.kurtosis(x), rel=1e-9, abs=1e-9)
    else:
        assert math.isnan(r["ks_normal"]) and math.isnan(r["kurtosis"])


@given(seed=st.integers(0, 10_000), density=st.sampled_from([0.002, 0.01, 0.04]))
def test_sparse_matrix_route_gives_the_dense_statistics(seed, density):
    """Mostly-zero matrices (the hand weights) are handled by their nonzero entries alone: same statistics as the
    dense route (fractions exactly; moments, RMS and norms up to rounding), same products."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 90))
    a = np.where(rng.random((n, n)) < density, rng.standard_normal((n, n)), 0.0)
    a[rng.integers(n), rng.integers(n)] = 1.0  # not all zero
    b = np.where(rng.random((n, n)) < density, rng.standard_normal((n, n)), 0.0) + np.diag(rng.random(n) < 0.5)
    sa = S.SparseMatrix.from_dense(a)
    dense, sparse = S.matrix_stats(a, square=True), S.matrix_stats(sa, square=True)
    assert list(dense) == list(sparse)
    for k, v in dense.items():
        if k.startswith(("zero", "abs<", "rel<", "rank/n")):
            assert sparse[k] == v, k
        else:
            assert sparse[k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), k
    m = S.product(sa, S.SparseMatrix.from_dense(b))
    assert isinstance(m, S.SparseMatrix)
    np.testing.assert_allclose(m.to_dense(), a @ b, atol=1e-12)
    np.testing.assert_allclose(S.singular_values(m), np.linalg.svd(a @ b, compute_uv=False), atol=1e-10)
    np.testing.assert_array_equal(sa.T.to_dense(), a.T)


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
    r = S.entry_stats(w_k)  # zeros are counted, never materialised in the sorted entries
    assert r["zero"] == pytest.approx(1 - 4095 / 4096 ** 2) and r["abs<1e-6"] == r["zero"]


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


def test_square_statistics_are_computed_for_the_products_only():
    llm = collect_stats(synthetic_source(n_layers=2, hidden=16, n_heads=4, n_kv_heads=4))  # W_Q, W_O are 16 x 16
    for r in llm.records:
        has = set(S.PRODUCT_STATISTICS) & set(r.stats)
        assert has == (set(S.PRODUCT_STATISTICS) if r.matrix in PRODUCTS else set()), r.matrix
    hand = collect_stats(hand_source(("gd", 11)))
    rows = resemblance([llm], [hand])
    pairs = {(r["matrix"], r["stat"]) for r in rows}
    assert ("W_K^T W_Q", "symmetry") in pairs and ("W_O W_V", "top_row_energy") in pairs
    assert not {(m, s) for m, s in pairs if s in S.PRODUCT_STATISTICS and m not in PRODUCTS}
    assert all(s not in S.PRODUCT_STATISTICS or m in PRODUCTS for m, s in SUMMARY_ROWS)


def _gqa_layer(n_heads=4, n_kv_heads=2, hidden=8):
    """Weights whose per-head products tell the key/value head apart: every W_Q,h = W_O,h^T = e_0 (one row / one
    column) and W_K,g = W_V,g = e_g, so W_K,g^T W_Q,h = e_g e_0^T and W_O,h W_V,g = e_0 e_g^T have cosine 1/sqrt(E)
    with I (all on the diagonal) exactly when g = 0, and 0 otherwise."""
    eye = np.eye(hidden, dtype=np.float32)
    return {"w_q": np.stack([eye[:1]] * n_heads), "w_k": np.stack([eye[g:g + 1] for g in range(n_kv_heads)]),
            "w_v": np.stack([eye[g:g + 1] for g in range(n_kv_heads)]), "w_o": np.stack([eye[:, :1]] * n_heads)}


def test_products_pair_query_head_h_with_key_value_head_h_over_group_size():
    src = arrays_source([_gqa_layer(n_heads=6, n_kv_heads=3, hidden=8)], "gqa")
    st_ = collect_stats(src)
    for product in PRODUCTS:
        per_head = {r.head: r.stats for r in st_.records if r.matrix == product}
        # h // (H / G) with H / G = 2: heads 0, 1 use kv head 0; heads 2, 3 kv head 1; heads 4, 5 kv head 2
        assert [per_head[h]["diag_energy"] for h in range(6)] == pytest.approx([1, 1, 0, 0, 0, 0])
        assert [per_head[h]["cos_I"] for h in range(6)] == pytest.approx([1 / math.sqrt(8)] * 2 + [0] * 4)


@given(seed=st.integers(0, 10_000))
def test_collected_product_statistics_equal_direct_ones_on_random_grouped_query_weights(seed):
    """The per-head route (shared QR factors, batched) gives the statistics of the dense products W_K,g^T W_Q,h and
    W_O,h W_V,g with g = h // (H / G)."""
    rng = np.random.default_rng(seed)
    g = int(rng.integers(1, 4))
    h, kq, e = g * int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(12, 40))
    layer = {"w_q": rng.standard_normal((h, kq, e)), "w_k": rng.standard_normal((g, kq, e)),
             "w_v": rng.standard_normal((g, kq, e)), "w_o": rng.standard_normal((h, e, kq))}
    got = collect_stats(arrays_source([layer], "random"))
    w = {k: v.astype(np.float32).astype(np.float64) for k, v in layer.items()}
    for r in got.records:
        if r.matrix not in PRODUCTS:
            continue
        kv = r.head // (h // g)
        m = (w["w_k"][kv].T @ w["w_q"][r.head] if r.matrix == "W_K^T W_Q" else w["w_o"][r.head] @ w["w_v"][kv])
        want = S.matrix_stats(m, np.linalg.svd(m, compute_uv=False), square=True)
        for k, v in want.items():
            if k in ("rank/n", "sv_slope"):  # depend on where the dense SVD's rounding-level values fall
                continue
            assert r.stats[k] == pytest.approx(v, rel=1e-7, abs=1e-9), (r.matrix, r.head, k)
        assert r.stats["rank/n"] == kq / e


def test_statistics_do_not_depend_on_the_number_of_threads():
    src = synthetic_source(n_layers=5, hidden=32, n_heads=4, n_kv_heads=2, seed=3)
    one, two = collect_stats(src, workers=1), collect_stats(src, workers=2)
    assert [(r.matrix, r.layer, r.head, r.stats) for r in one.records] == \
        [(r.matrix, r.layer, r.head, r.stats) for r in two.records]
    assert all(np.array_equal(x, y) for m in one.spectra for x, y in zip(one.spectra[m], two.spectra[m]))
    assert all(np.array_equal(one.rel_hist[m].counts, two.rel_hist[m].counts) for m in one.rel_hist)
    assert one.examples.keys() == two.examples.keys() == {f"{p} L{i} h0" for p in PRODUCTS for i in (0, 2)}


def test_an_error_in_a_layer_reaches_the_caller_with_threads():
    good = synthetic_source(n_layers=4, hidden=16, n_heads=2, n_kv_heads=1)

    def read(i):
        if i == 1:
            raise ValueError("layer 1 is broken")
        return good.read_layer(i)

    with pytest.raises(ValueError, match="layer 1 is broken"):
        collect_stats(dataclasses.replace(good, read_layer=read), workers=2)


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
