"""The transience metrics (iclgd_synth.transience) on hand-made cases, nested pools, and dMMSE at the study's sizes:
exact against a direct posterior for a small pool, finite and equal to a float64 reference at M = 2^15 in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from iclgd_synth.learners.prefix import PrefixDMMSE, PrefixRidge, prefix_inputs
from iclgd_synth.tasks import TaskConfig, sample, task_pool
from iclgd_synth.transience import (CurveThresholds, evaluate_rows, fit_power_law, make_evaluation,
                                    prediction_distance, ridgeness, summarize_curve)


def _reference_dmmse(x_BxNxd, y_BxN, xr_BxPxd, pool_Mxd, noise) -> np.ndarray:
    """The posterior mean over the pool at every prefix in float64 NumPy, all M members at once, (B, N + 1)."""
    x, y, xr, pool = (np.asarray(a, np.float64) for a in (x_BxNxd, y_BxN, xr_BxPxd, pool_Mxd))
    resid = (np.einsum("md,bnd->bmn", pool, x) - y[:, None]) ** 2
    sq = np.concatenate([np.zeros(resid.shape[:2] + (1,)), np.cumsum(resid, axis=-1)], axis=-1)  # (B, M, N + 1)
    logit = -sq / (2 * noise**2)
    post = np.exp(logit - logsumexp(logit, axis=1, keepdims=True))
    return np.einsum("bmp,md,bpd->bp", post, pool, xr)


@pytest.mark.parametrize("small,large", [(1, 4), (5, 64), (64, 2**15)])
def test_pools_are_nested_so_a_smaller_pool_is_a_prefix_of_a_larger_one(small, large):
    config = TaskConfig(dim=3, n_context=4, x_dist="normal", noise=0.5, pool_size=large)
    big = np.asarray(task_pool(config))
    np.testing.assert_array_equal(np.asarray(task_pool(config.replace(pool_size=small))), big[:small])
    # Training tasks of the small pool are rows of the first `small` members of the large one.
    w = np.asarray(sample(jax.random.PRNGKey(3), config.replace(pool_size=small), 64).w)  # (B, d)
    assert np.abs(w[:, None] - big[None, :small, 0]).max(-1).min(1).max() == 0.0


def test_the_evaluation_dmmse_is_the_direct_posterior_over_the_training_pool(x64):
    task = TaskConfig(dim=2, n_context=5, x_dist="normal", noise=0.5, pool_size=7)
    ev = make_evaluation(task, 16, dmmse_chunk=3)  # 3 chunks, the last one padded
    pool = np.asarray(task_pool(task))[:, 0]
    for where in ("fresh", "pool"):
        b = getattr(ev, where)
        expected = _reference_dmmse(b.x, b.y, prefix_inputs(b), pool, 0.5)
        np.testing.assert_allclose(np.asarray(getattr(ev, f"dmmse_{where}")), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ev.ridge_fresh), np.asarray(PrefixRidge(lam=0.25)(ev.fresh)), rtol=1e-12)


def test_dmmse_in_float32_at_a_pool_of_2_to_the_15_is_finite_and_matches_float64():
    # The papers' shapes (d = 8, N = 16, sigma^2 = 0.25) at the largest pool, in the study's float32, on fresh tasks
    # (far from every member: logits of order -100 to -1000).
    m, d, n, noise = 2**15, 8, 16, 0.5
    task = TaskConfig(dim=d, n_context=n, x_dist="normal", noise=noise, pool_size=m)
    pool = task_pool(task)
    dmmse = PrefixDMMSE(pool=pool, noise=noise, chunk=4096)
    b = sample(jax.random.PRNGKey(5), task.replace(pool_size=None), 4)
    got = np.asarray(dmmse(b))
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    expected = _reference_dmmse(b.x, b.y, prefix_inputs(b), np.asarray(pool)[:, 0], noise)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
    # Labels that no member fits (shifted by 20): every unnormalised posterior weight underflows in float32, a plain
    # softmax would give 0 / 0; the running log-sum-exp does not.
    far = b.replace(y=b.y + 20.0, y_query=b.y_query + 20.0)
    got = np.asarray(dmmse(far))
    sq = ((np.einsum("md,bnd->bmn", np.asarray(pool)[:, 0], far.x) - np.asarray(far.y)[:, None]) ** 2).sum(-1)
    assert np.all(np.exp((-sq / (2 * noise**2)).astype(np.float32)).sum(1) == 0.0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _reference_dmmse(far.x, far.y, prefix_inputs(far), np.asarray(pool)[:, 0], noise),
                               rtol=2e-3, atol=2e-3)


def test_prediction_distance_on_hand_made_predictions():
    a = jnp.asarray([[1.0, 2.0], [3.0, 0.0]])
    b = jnp.zeros((2, 2))
    np.testing.assert_allclose(np.asarray(prediction_distance(a, b, 2)), [(1 + 9) / 2 / 2, (4 + 0) / 2 / 2])
    assert float(prediction_distance(a, a, 2).max()) == 0.0
    with pytest.raises(ValueError, match="pred_a and pred_b must both have shape"):
        prediction_distance(a, b[:1], 2)


def test_a_model_that_is_ridge_has_distance_0_to_ridge_and_the_ridge_dmmse_gap_to_dmmse():
    task = TaskConfig(dim=2, n_context=4, x_dist="normal", noise=0.5, pool_size=3)
    ev = make_evaluation(task, 32)
    ridge = PrefixRidge(lam=0.25)

    def forward(params, batch):  # row 0 is ridge, row 1 the zero predictor, row 2 half of ridge
        return params["scale"] * ridge.predict_all(batch)[..., 0]

    rows = evaluate_rows(forward, {"scale": jnp.asarray([1.0, 0.0, 0.5])}, ev)
    ref = ev.reference()
    assert rows["ridge_fresh"].shape == (3, 5) and rows["ridge_pool"][0].max() == 0.0
    np.testing.assert_array_equal(rows["ridge_fresh"][0], 0.0)
    np.testing.assert_allclose(rows["dmmse_fresh"][0], ref["ridge_dmmse_fresh"], rtol=1e-6)
    np.testing.assert_allclose(rows["dmmse_pool"][0], ref["ridge_dmmse_pool"], rtol=1e-6)
    np.testing.assert_allclose(rows["loss_fresh"][0], ref["ridge_loss_fresh"], rtol=1e-6)
    np.testing.assert_allclose(rows["ridge_fresh"][1], ref["zero_ridge_fresh"], rtol=1e-6)
    np.testing.assert_allclose(rows["ridge_fresh"][2], 0.25 * ref["zero_ridge_fresh"], rtol=1e-5)


def test_ridgeness_is_1_at_ridge_0_at_dmmse_and_half_between():
    np.testing.assert_allclose(ridgeness([0.0, 1.0, 2.0], [1.0, 0.0, 2.0]), [1.0, 0.0, 0.5])


#: The two Bayes predictors' fresh-task losses of the hand-made curves: ridge 0.4, dMMSE 1.4 (gap G = 1).
REF = dict(ridge_loss=0.4, dmmse_loss=1.4)


def _curves(d_ridge, d_dmmse, loss=None):
    steps = np.arange(len(d_ridge)) * 100
    loss = np.asarray(d_ridge) + 0.4 if loss is None else np.asarray(loss, float)
    return steps, loss, np.asarray(d_ridge, float), np.asarray(d_dmmse, float)


def test_a_curve_that_approaches_ridge_then_drifts_to_dmmse_is_transient():
    # The papers' pattern: the loss falls to a minimum at step 200 (gain (1.4 - 0.45) / 1 = 0.95), then rises by 0.3
    # G while the distance to ridge rises and the distance to dMMSE falls.
    steps, loss, dr, dd = _curves([0.6, 0.2, 0.05, 0.1, 0.3, 0.4], [0.5, 0.4, 0.35, 0.2, 0.08, 0.05])
    s = summarize_curve(steps, loss, dr, dd, **REF, thresholds=CurveThresholds(smooth=1))
    assert s["emerged"] and s["transient"] and s["final_state"] == "dMMSE"
    assert s["t_star"] == 200 and s["interior_minimum"] and s["peak_step"] == 200
    assert s["peak_gain"] == pytest.approx(0.95) and s["rise"] == pytest.approx(0.35)
    assert s["final_gain"] == pytest.approx(0.6)
    assert s["peak_ridgeness"] == pytest.approx(0.35 / 0.40) and s["final_ridgeness"] == pytest.approx(0.05 / 0.45)
    # Smoothed over 3 evaluations (the default): the peak r is the mean of r at steps 100-300, the end the mean of
    # the last three; the loss minimum is the centred 3-point mean at step 200.
    r = ridgeness(dr, dd)
    s = summarize_curve(steps, loss, dr, dd, **REF)
    assert s["peak_ridgeness"] == pytest.approx(r[1:4].mean()) and s["final_ridgeness"] == pytest.approx(r[-3:].mean())
    assert s["transient"] and s["peak_step"] == 200 and s["t_star"] == 200
    assert s["min_loss"] == pytest.approx(0.4 + (0.2 + 0.05 + 0.1) / 3)
    assert s["rise"] == pytest.approx((0.1 + 0.3 + 0.4) / 3 - (0.2 + 0.05 + 0.1) / 3)


def test_a_rise_without_the_move_to_dmmse_or_too_small_a_rise_is_not_transient():
    # The loss rises after its minimum, but the model moves away from both predictors (farther from dMMSE too).
    steps, loss, dr, dd = _curves([0.6, 0.2, 0.05, 0.1, 0.3, 0.4], [0.5, 0.4, 0.35, 0.4, 0.5, 0.6])
    s = summarize_curve(steps, loss, dr, dd, **REF, thresholds=CurveThresholds(smooth=1))
    assert s["emerged"] and s["rise"] > 0.3 and not s["transient"]
    # The move to dMMSE, but the loss rises by 0.05 G only (the threshold is 0.1 G).
    steps, loss, dr, dd = _curves([0.6, 0.2, 0.05, 0.07, 0.09, 0.1], [0.5, 0.4, 0.35, 0.3, 0.28, 0.25])
    s = summarize_curve(steps, loss, dr, dd, **REF, thresholds=CurveThresholds(smooth=1))
    assert s["rise"] == pytest.approx(0.05) and not s["transient"]
    assert summarize_curve(steps, loss, dr, dd, **REF, thresholds=CurveThresholds(smooth=1, faded=0.04))["transient"]


def test_one_noisy_evaluation_is_not_a_transient_once_smoothed():
    # Flat at gain 0.5 with one low evaluation (step 400): unsmoothed it is a minimum followed by a rise of 0.2 G
    # with the distances moving the right way; smoothed, the rise is 0.2 / 3 G < 0.1 G.
    loss = np.full(9, 0.9)
    loss[4] = 0.7
    dr, dd = np.full(9, 0.1), np.full(9, 0.12)
    dr[4], dd[4] = 0.05, 0.2
    steps, loss, dr, dd = _curves(dr, dd, loss)
    assert summarize_curve(steps, loss, dr, dd, **REF, thresholds=CurveThresholds(smooth=1))["transient"]
    assert not summarize_curve(steps, loss, dr, dd, **REF)["transient"]


def test_t_star_is_read_on_the_smoothed_fresh_loss():
    # A flat stretch with one low evaluation at step 500: unsmoothed, t* is that evaluation; smoothed over 3, the
    # centre of the lowest 3-point mean (steps 300-500).
    loss = np.asarray([1.0, 0.6, 0.5, 0.51, 0.5, 0.45, 0.53, 0.58, 0.62, 0.65])
    steps, loss, dr, dd = _curves(np.full(10, 0.1), np.full(10, 0.2), loss)
    assert summarize_curve(steps, loss, dr, dd, **REF, thresholds=CurveThresholds(smooth=1))["t_star"] == 500
    s = summarize_curve(steps, loss, dr, dd, **REF)
    assert s["t_star"] == 400 and s["interior_minimum"]
    assert s["min_loss"] == pytest.approx((0.51 + 0.5 + 0.45) / 3)
    assert s["final_loss"] == pytest.approx((0.58 + 0.62 + 0.65) / 3)  # the end: mean of the last 3 evaluations
    assert s["rise"] == pytest.approx((0.58 + 0.62 + 0.65) / 3 - (0.51 + 0.5 + 0.45) / 3)  # in units of G = 1
    # Still falling at the end: the minimum is the last evaluation (not interior), nothing rose after it, and the
    # final gain is the gain at t*.
    steps, loss, dr, dd = _curves(np.full(5, 0.1), np.full(5, 0.2), np.asarray([1.0, 0.8, 0.7, 0.65, 0.62]))
    s = summarize_curve(steps, loss, dr, dd, **REF)
    assert s["t_star"] == 400 and not s["interior_minimum"] and s["rise"] == 0.0
    assert s["final_gain"] == s["peak_gain"] == pytest.approx(1.4 - (0.7 + 0.65 + 0.62) / 3)
    # A plateau whose last evaluation alone is low: that point is averaged with the two before it, so the gain at
    # t* is not read off one evaluation.
    loss = np.asarray([1.0, 0.6, 0.6, 0.6, 0.6, 0.45])
    steps, loss, dr, dd = _curves(np.full(6, 0.1), np.full(6, 0.2), loss)
    s = summarize_curve(steps, loss, dr, dd, **REF)
    assert s["t_star"] == 500 and s["peak_gain"] == pytest.approx(1.4 - 0.55)


def test_ridge_throughout_is_not_transient_and_memorising_never_emerges():
    steps, loss, dr, dd = _curves([0.6, 0.3, 0.1, 0.05, 0.04], [0.5, 0.45, 0.4, 0.4, 0.4])
    s = summarize_curve(steps, loss, dr, dd, **REF)
    assert s["emerged"] and not s["transient"] and s["final_state"] == "ridge" and not s["interior_minimum"]
    # Memorising: the fresh-task loss stays near dMMSE's (gain 0.1 at best, below the 0.25 threshold).
    steps, loss, dr, dd = _curves([0.6, 0.7, 0.8, 0.9], [0.5, 0.2, 0.1, 0.05], [1.5, 1.3, 1.35, 1.4])
    s = summarize_curve(steps, loss, dr, dd, **REF)
    assert not s["emerged"] and not s["transient"] and s["final_state"] == "dMMSE"
    assert s["peak_gain"] == pytest.approx(1.4 - (1.3 + 1.35 + 1.4) / 3)


def test_a_diverged_curve_is_read_as_diverged():
    steps, loss, dr, dd = _curves([0.6, np.nan], [0.5, 0.4])
    s = summarize_curve(steps, loss, dr, dd, **REF)
    assert s["final_state"] == "diverged" and not s["transient"]


def test_without_a_positive_gap_between_the_bayes_losses_nothing_emerges():
    # At a pool so large that dMMSE is ridge, a finite evaluation set can put dMMSE's loss at or below ridge's: no
    # scale for the gain, which is NaN; the other readings stand.
    steps, loss, dr, dd = _curves([0.6, 0.2, 0.05, 0.1, 0.3, 0.4], [0.5, 0.4, 0.35, 0.2, 0.08, 0.05])
    for dmmse_loss in (0.4, 0.39):
        s = summarize_curve(steps, loss, dr, dd, ridge_loss=0.4, dmmse_loss=dmmse_loss)
        assert np.isnan(s["peak_gain"]) and np.isnan(s["rise"]) and not s["emerged"] and not s["transient"]
        assert s["t_star"] == 200 and s["final_state"] == "dMMSE"


def test_power_law_fit_recovers_an_exact_law_and_refuses_a_single_m():
    m = np.asarray([4.0, 16.0, 64.0, 256.0])
    fit = fit_power_law(m, 30.0 * m**0.47)
    assert fit["exponent"] == pytest.approx(0.47, abs=1e-12) and fit["prefactor"] == pytest.approx(30.0, rel=1e-10)
    assert fit["hi"] - fit["lo"] < 1e-6 and fit["n"] == 4
    noisy = fit_power_law(m, 30.0 * m**0.47 * np.asarray([1.1, 0.9, 1.05, 0.95]))
    assert noisy["lo"] < 0.47 < noisy["hi"]
    with pytest.raises(ValueError, match="at least two points"):
        fit_power_law([8.0, 8.0], [1.0, 2.0])


@pytest.mark.parametrize("field,value,match", [("emerged", 0.0, "emerged must be"), ("emerged", 1.5, "emerged must be"),
                                               ("faded", 0.0, "faded must be"), ("side", 0.6, "side must be"),
                                               ("smooth", 2, "odd")])
def test_bad_thresholds_name_the_parameter(field, value, match):
    with pytest.raises(ValueError, match=match):
        CurveThresholds(**{field: value})


def test_make_evaluation_needs_a_pool_and_noise():
    with pytest.raises(ValueError, match="pool_size must be set"):
        make_evaluation(TaskConfig(dim=2, n_context=3, noise=0.5), 4)
    with pytest.raises(ValueError, match="noise must be > 0"):
        make_evaluation(TaskConfig(dim=2, n_context=3, pool_size=4), 4)
