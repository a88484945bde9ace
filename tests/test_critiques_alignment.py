"""The nulls of the ICL-vs-FT metrics (iclgd_synth.critiques.alignment, iclgd_synth.critiques.dual) on known answers:
the paper's normalised SimAOU, the y-energy share, per-channel Kendall, the selection-corrected Rec2FTP, Dai's SimAM
on one shared key, and the leave-one-out influence of an explicit learner against a loop."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import iclgd_synth as ic
from iclgd_synth.critiques import alignment as A
from iclgd_synth.critiques import dual as D


def test_normalised_sim_aou_ignores_output_size_and_keeps_a_zero_output_zero():
    z = np.array([[1.0, 0.0], [0.0, 0.0]])
    icl = np.array([[1.0, 1.0], [0.0, 2.0]])
    ft = np.array([[5.0, 5.0], [0.0, -3.0]])
    # Task 0: FT's output is ICL's times 5: after normalising they are the same point, cosine 1, while the
    # unnormalised changes (0, 1) and (4, 5) have cosine 5 / sqrt(41). Task 1: zero-shot output 0 stays 0.
    np.testing.assert_allclose(A.normalised_sim_aou(icl, z, ft), [1.0, -1.0], atol=1e-15)
    np.testing.assert_allclose(A.sim_aou(icl, z, ft), [5.0 / np.sqrt(41.0), -1.0], atol=1e-15)
    # A change that only rescales the zero-shot output is no change once normalised.
    assert np.isnan(A.normalised_sim_aou(2.0 * z[:1], z[:1], icl[:1])[0])


def test_energy_fraction_and_per_channel_kendall_on_known_values():
    delta = np.array([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]])
    frac = A.energy_fraction(delta, slice(1, None))
    np.testing.assert_allclose(frac[:2], [16.0 / 25.0, 1.0])
    assert np.isnan(frac[2])
    a = np.array([[[1.0, 1.0], [2.0, 0.0], [3.0, -1.0]]])     # channel 0 increasing, channel 1 decreasing
    b = np.array([[[10.0, 0.0], [20.0, 1.0], [30.0, 2.0]]])   # both increasing
    np.testing.assert_allclose(A.kendall_tau_channels(a, b), [0.0])  # (1 + (-1)) / 2
    np.testing.assert_allclose(A.kendall_tau_channels(a[..., 0], b[..., 0]), [1.0])
    with pytest.raises(ValueError, match="same shape"):
        A.kendall_tau_channels(a, b[:, :2])


def test_selection_corrected_rec2ftp_removes_a_pure_selection_effect():
    # FT improves only on the 4 tasks with a large zero-shot error; ICL improves on 3 of those and on 1 of the 4
    # small ones. Raw Rec2FTP 3/4 beats ICL's base rate 1/2, but within the strata ICL does as well without FT.
    e0 = np.array([1.0, 1.0, 1.0, 1.0, 10.0, 10.0, 10.0, 10.0])
    eft = np.array([2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    eicl = np.array([0.5, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 20.0])
    r = A.rec2ftp_selection_corrected(e0, eicl, eft, n_bins=2)
    assert r["rec2ftp"] == pytest.approx(0.75) and r["icl_improves_rate"] == pytest.approx(0.5)
    assert r["expected"] == pytest.approx(0.75) and r["excess"] == pytest.approx(0.0, abs=1e-15)
    # One stratum: the expected rate is the unconditional one.
    assert A.rec2ftp_selection_corrected(e0, eicl, eft, n_bins=1)["expected"] == pytest.approx(0.5)
    # Non-finite errors (a diverged FT copy) are left out, not counted as failures.
    r_nan = A.rec2ftp_selection_corrected(np.append(e0, 1.0), np.append(eicl, 0.0), np.append(eft, np.nan), 2)
    assert r_nan["rec2ftp"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="n_bins"):
        A.rec2ftp_selection_corrected(e0, eicl, eft, n_bins=0)


def test_sim_am_across_tasks_is_one_cosine_of_the_score_vectors():
    assert A.sim_am_across_tasks([1.0, 2.0], [2.0, 4.0]) == pytest.approx(1.0)
    assert A.sim_am_across_tasks([1.0, 0.0], [0.0, 3.0]) == pytest.approx(0.0)
    assert np.isnan(A.sim_am_across_tasks([0.0, 0.0], [1.0, 2.0]))


def test_leave_one_out_influence_equals_a_loop_over_dropped_demonstrations(x64):
    rng = np.random.default_rng(0)
    b, n, d, o = 3, 5, 3, 2
    x, xq, w = rng.normal(size=(b, n, d)), rng.normal(size=(b, d)), rng.normal(size=(b, o, d))
    batch = ic.TaskBatch.create(x=x, y=np.einsum("bod,bnd->bno", w, x), x_query=xq,
                                y_query=np.einsum("bod,bd->bo", w, xq))
    lam = 0.3
    got = D.leave_one_out_influence(ic.Ridge(lam=lam), batch)
    assert got.shape == (b, n, o)

    def ridge(xx, yy, q):
        return q @ np.linalg.solve(xx.T @ xx + lam * np.eye(d), xx.T @ yy)

    y = np.einsum("bod,bnd->bno", w, x)
    for t in range(b):
        full = ridge(x[t], y[t], xq[t])
        for i in range(n):
            keep = [j for j in range(n) if j != i]
            np.testing.assert_allclose(got[t, i], full - ridge(x[t, keep], y[t, keep], xq[t]), atol=1e-12)
    assert np.abs(got).max() > 1e-3


def test_tuned_learners_pick_the_best_ridge_penalty_of_the_grid(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(3), 64, 6, 3, x_dist="normal", noise=0.5)
    learners = D.tuned_learners(batch, lam_grid=[1e-3, 0.25, 100.0])
    # Noise 0.5, w ~ N(0, I): the Bayes-optimal penalty is sigma^2 = 0.25, in the grid.
    assert learners["ridge"].lam == pytest.approx(0.25)
    assert learners["GD, 1 step"].eta > 0
