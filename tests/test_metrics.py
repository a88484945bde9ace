"""Comparison metrics on cases with known answers (the ``x64`` fixture comes from conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclgd_synth import GD, TaskConfig, gd_params, sample_tasks
from iclgd_synth.model import predict
from iclgd_synth import metrics as M


@pytest.fixture()
def batch(x64):
    return sample_tasks(jax.random.PRNGKey(0), 256, 9, 6, dtype=jnp.float64)


def test_hand_weights_vs_gd_give_cos_one_and_zero_diffs(batch):
    hand = gd_params(6, 2.5, n_layers=2, n_context=9)
    gd = GD(eta=2.5, steps=2)
    r = M.compare(hand, gd, batch)
    assert r["model_cos"] == pytest.approx(1.0, abs=1e-12)
    assert r["preds_diff"] < 1e-12
    assert r["model_diff"] < 1e-12
    assert r["loss_a"] == pytest.approx(r["loss_b"], rel=1e-12)


def test_sensitivities_of_gd_are_its_implicit_weights(batch):
    s = M.sensitivities(GD(eta=1.3, steps=3), batch)
    np.testing.assert_allclose(s, GD(eta=1.3, steps=3).weights(batch)[:, 0], atol=1e-12)


def test_model_cos_of_a_predictor_and_its_negation_is_minus_one(batch):
    gd = GD(eta=1.0)
    assert M.model_cos(gd, lambda b: -gd(b), batch) == pytest.approx(-1.0, abs=1e-12)
    assert M.preds_diff(gd, lambda b: -gd(b), batch) == pytest.approx(
        float(jnp.mean(2 * jnp.abs(gd(batch)))), rel=1e-12)


def test_vector_output_sensitivities_have_one_row_per_output(x64):
    b = sample_tasks(jax.random.PRNGKey(1), 32, 8, 5, out_dim=3, dtype=jnp.float64)
    s = M.sensitivities(GD(eta=0.7, steps=2), b)
    assert s.shape == (32, 3, 5)
    np.testing.assert_allclose(s, GD(eta=0.7, steps=2).weights(b), atol=1e-12)


def test_alignment_of_rescaled_construction_is_one_and_beta_recovers_the_scale(batch):
    hand = gd_params(6, 2.0, n_context=9)
    layer = hand.layers[0]
    scaled = hand.replace(layers=({**layer, "w_q": 3.0 * layer["w_q"], "w_p": layer["w_p"] / 3.0},))
    a = M.weight_alignment(scaled, hand, dim=6)
    assert a["kq_cos"] == pytest.approx(1.0, abs=1e-12) and a["pv_cos"] == pytest.approx(1.0, abs=1e-12)
    assert a["beta"] == pytest.approx(3.0, rel=1e-12)
    # Same function, so the interpolation with the construction has the construction's loss.
    assert M.loss(M.interpolate(scaled, hand, 6), batch) == pytest.approx(M.loss(hand, batch), rel=1e-10)


def test_interpolation_endpoints_are_the_two_models(batch):
    hand = gd_params(6, 2.0, n_context=9)
    other = gd_params(6, 1.0, n_context=9)
    np.testing.assert_allclose(predict(M.interpolate(other, hand, 6, alpha=1.0), batch),
                               hand(batch), atol=1e-12)
    np.testing.assert_allclose(predict(M.interpolate(other, hand, 6, alpha=0.0), batch),
                               other(batch), atol=1e-12)


def test_per_layer_losses_of_hand_weights_are_the_gd_step_losses(batch):
    hand = gd_params(6, 2.0, n_layers=3, n_context=9)
    per_layer = M.per_layer_losses(hand, batch)
    expected = [M.loss(GD(eta=2.0, steps=k), batch) for k in (1, 2, 3)]
    np.testing.assert_allclose(per_layer, expected, rtol=1e-10)


def test_ood_sweep_at_the_training_value_equals_the_in_distribution_loss():
    task = TaskConfig(dim=5, n_context=7)
    gd = GD(eta=3.0)
    out = M.ood_sweep({"gd": gd}, task, "x_scale", values=(1.0, 2.0), n_tasks=300, seed=5)
    from iclgd_synth.tasks import sample

    base = sample(jax.random.PRNGKey(5), task, 300)
    assert out["values"] == [1.0, 2.0]
    assert out["losses"]["gd"][0] == pytest.approx(M.loss(gd, base), rel=1e-6)
    assert out["losses"]["gd"][1] > out["losses"]["gd"][0]
    with pytest.raises(ValueError, match="sweep"):
        M.ood_sweep({"gd": gd}, task, "nope")


def test_as_predictor_rejects_non_predictors():
    with pytest.raises(TypeError, match="predictor"):
        M.as_predictor(3.0)


def test_input_law_sweep_matches_the_training_second_moment_and_keeps_gd_near_its_in_distribution_loss():
    task = TaskConfig(dim=5, n_context=7)  # x ~ U(-0.5, 0.5): E[x_j^2] = 1/12
    from iclgd_synth.learners import tune_gd
    from iclgd_synth.tasks import sample

    laws = M.OOD_SWEEPS[M.X_DIST_SWEEP][1]
    assert set(laws) >= {"uniform", "normal", "laplace", "exponential"}
    for law in laws:
        cfg = M.ood_task(task, M.X_DIST_SWEEP, law)
        assert cfg.x_dist == law
        assert M.input_second_moment(cfg) == pytest.approx(1 / 12, rel=1e-12)
        b = sample(jax.random.PRNGKey(3), cfg, 2000)  # one shape: compiled once per law
        empirical = float(np.mean(np.concatenate([np.ravel(b.x), np.ravel(b.x_query)]) ** 2))
        assert empirical == pytest.approx(1 / 12, rel=0.04), law
    eta = tune_gd(sample(jax.random.PRNGKey(4), task, 2000)).eta
    out = M.ood_sweep({"gd": GD(eta=eta)}, task, M.X_DIST_SWEEP, n_tasks=2000, seed=5)
    in_dist = out["losses"]["gd"][0]
    # Drawn at unit scale these laws put GD's loss 10^3-10^5 times above in-distribution; matched, same order.
    for law, value in zip(out["values"], out["losses"]["gd"]):
        assert 0 < value < 10 * in_dist, (law, value, in_dist)
        if law in ("normal", "laplace"):  # centred laws: shape alone changes GD's loss little
            assert value < 2 * in_dist, (law, value, in_dist)


def test_second_moments_of_the_input_laws():
    assert M.input_second_moment(TaskConfig(x_range=0.5)) == pytest.approx(1 / 12)
    assert M.input_second_moment(TaskConfig(x_range=1.0, x_scale=2.0)) == pytest.approx(4 / 3)
    assert M.input_second_moment(TaskConfig(x_dist="normal")) == pytest.approx(1.0)
    assert M.input_second_moment(TaskConfig(x_dist="laplace")) == pytest.approx(2.0)
    assert M.input_second_moment(TaskConfig(x_dist="exponential")) == pytest.approx(2.0)
    assert M.input_second_moment(TaskConfig(dim=4, x_dist="anisotropic")) == pytest.approx(1.0, rel=1e-5)


def test_input_law_sweep_from_an_anisotropic_training_law_drops_its_covariance():
    cov = np.diag([4.0, 1.0, 0.25])
    task = TaskConfig(dim=3, n_context=5, x_dist="anisotropic", x_cov=cov)
    normal = M.ood_task(task, M.X_DIST_SWEEP, "normal")
    assert normal.x_dist == "normal" and normal.x_cov is None
    assert M.input_second_moment(normal) == pytest.approx(M.input_second_moment(task), rel=1e-12)
    assert M.ood_task(task, M.X_DIST_SWEEP, "anisotropic").x_cov == task.x_cov
