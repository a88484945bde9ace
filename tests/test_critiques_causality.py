"""Fine-tuning of zero-shot copies (iclgd_synth.critiques.finetune) and the layer-causality control
(iclgd_synth.critiques.causality): the hand K-layer GD model's per-layer updates equal the explicit GD steps and are
reproduced exactly by forward-order adapter fine-tuning and only at layer 1 by standard fine-tuning; layer-causal
gradients stay local; SimAM_delta is undefined at layer 1 only; the paired per-cell tests and their counts on known data; the
competent-learner nulls."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import iclgd_synth as ic
from iclgd_synth.critiques import causality as CA
from iclgd_synth.critiques import finetune as F
from iclgd_synth import intervals as ic_intervals
from iclgd_synth.reports.causal import layers_text


@jax.jit
def _hand_updates(batch, eta):
    """Per-layer query updates of the hand model (ICL) and of its adapter fine-tuned copies, 1 step of size eta."""
    k = 3 if batch.n_context % 2 else 2  # the depth is static through the batch shape (see the test)
    params = ic.gd_params(batch.dim, eta, n_layers=k, n_context=batch.n_context)
    zs = F.zero_shot_copy(params, batch.dim)
    first = F.lone_tokens(batch.x_query, 1)
    icl, _ = F.icl_query_pass(params, batch)
    out = {"icl": F.layer_updates(icl, first)}
    for mode in F.MODES:
        toks, _ = F.per_task_query_pass(F.finetune(zs, batch, eta, param_set="adapters", mode=mode, steps=1), batch)
        out[mode] = F.layer_updates(toks, first)
    return out


@settings(max_examples=3)
@given(d=st.integers(1, 5), n=st.integers(2, 9), eta=st.floats(0.2, 2.0), seed=st.integers(0, 1000))
def test_forward_order_adapter_finetuning_reproduces_the_hand_gd_layers(x64, d, n, eta, seed):
    batch = ic.sample_tasks(jax.random.PRNGKey(seed), 6, n, d, x_dist="normal")
    u = {k: np.asarray(v) for k, v in _hand_updates(batch, eta).items()}
    scale = np.abs(u["icl"]).max()
    assert scale > 1e-4
    # ICL's layer l is the l-th GD step: -(w_l - w_{l-1}) x_q in the y-entry, nothing else.
    k = u["icl"].shape[0]
    w_prev = np.zeros((6, d))
    for l in range(k):
        w_l = np.asarray(ic.GD(eta=eta, steps=l + 1).weights(batch))[:, 0]
        step = np.einsum("bd,bd->b", w_l - w_prev, np.asarray(batch.x_query))
        np.testing.assert_allclose(u["icl"][l][:, d], -step, atol=1e-10 * max(1.0, scale))
        w_prev = w_l
    assert np.abs(u["forward_order"] - u["icl"]).max() < 1e-10 * max(1.0, scale)
    for mode in ("standard", "layer_causal"):
        assert np.abs(u[mode][0] - u["icl"][0]).max() < 1e-10 * max(1.0, scale)   # layer 1 agrees
        assert np.abs(u[mode][1] - u["icl"][1]).max() > 1e-6 * scale             # layer 2 does not
        np.testing.assert_allclose(u[mode][1], u[mode][0], atol=1e-12 * max(1.0, scale))  # every layer = step 1


def test_zero_shot_copy_equals_the_model_on_a_lone_query(x64):
    params = ic.init_params(jax.random.PRNGKey(0), ic.ModelConfig(dim=3, n_layers=2, include_query=True,
                                                                  init_scale=2.0))
    batch = ic.sample_tasks(jax.random.PRNGKey(1), 5, 4, 3, x_dist="normal")
    zs = F.zero_shot_copy(params, 3)
    toks, _ = F.shared_query_pass(zs, batch)
    lone = F.lone_tokens(batch.x_query, 1)[:, None]
    ref = ic.forward(params, lone, 0, return_all=True)
    for l in range(2):
        np.testing.assert_allclose(np.asarray(toks[l]), np.asarray(ref[l][:, 0]), atol=1e-13)
    assert np.abs(np.asarray(toks[-1] - lone[:, 0])).max() > 1e-4  # the lone query does attend to itself


def test_icl_query_pass_matches_forward_and_recurrent_models_are_unrolled(x64):
    params = ic.init_params(jax.random.PRNGKey(2), ic.ModelConfig(dim=2, n_layers=3, recurrent=True,
                                                                  init_scale=3.0))
    batch = ic.sample_tasks(jax.random.PRNGKey(3), 4, 5, 2, x_dist="normal")
    toks, scores = F.icl_query_pass(params, batch)
    ref = ic.forward(params, ic.build_tokens(batch), 5, return_all=True)
    assert toks.shape == (3, 4, 3)
    np.testing.assert_allclose(np.asarray(toks), np.stack([np.asarray(r[:, -1]) for r in ref]), atol=1e-13)
    assert float(jnp.max(jnp.abs(scores))) == 0.0  # the query is not a key
    assert F.zero_shot_copy(params, 2).depth == 3


def _layer1_grad(model, batch, mode):
    def loss(theta):
        return F.task_loss(F.insert_params(model, theta, "attention"), batch.x[0], batch.labels_BxNxO()[0], mode)

    return jax.grad(loss)(F.select_params(model, "attention"))["kv"][0][1]


def test_layer_causal_gradients_do_not_see_later_layers(x64):
    config = ic.ModelConfig(dim=3, n_layers=2, include_query=True, init_scale=2.0)
    params = ic.init_params(jax.random.PRNGKey(4), config)
    other = params.replace(layers=(params.layers[0], ic.init_params(jax.random.PRNGKey(5), config).layers[1]))
    batch = ic.sample_tasks(jax.random.PRNGKey(6), 1, 6, 3, x_dist="normal")
    m1, m2 = F.zero_shot_copy(params, 3), F.zero_shot_copy(other, 3)
    # Layer 1's W_V gradient: the same whatever layer 2 is under layer-causal FT, different under standard FT.
    lc = np.abs(np.asarray(_layer1_grad(m1, batch, "layer_causal") - _layer1_grad(m2, batch, "layer_causal"))).max()
    st_ = np.abs(np.asarray(_layer1_grad(m1, batch, "standard") - _layer1_grad(m2, batch, "standard"))).max()
    assert lc < 1e-14
    assert st_ > 1e-8


def test_random_like_update_keeps_the_update_norm(x64):
    params = ic.gd_params(3, 1.0, n_layers=2, n_context=5)
    batch = ic.sample_tasks(jax.random.PRNGKey(7), 4, 5, 3)
    zs = F.zero_shot_copy(params, 3)
    tuned = F.finetune(zs, batch, 1.0, param_set="adapters", mode="standard", steps=1)
    rand = F.random_like_update(jax.random.PRNGKey(0), tuned, zs, "adapters")
    n_t = np.linalg.norm(np.asarray(tuned.adapters).reshape(4, -1), axis=1)
    n_r = np.linalg.norm(np.asarray(rand.adapters).reshape(4, -1), axis=1)
    np.testing.assert_allclose(n_r, n_t, rtol=1e-12)
    assert np.abs(np.asarray(rand.adapters - tuned.adapters)).max() > 1e-3


def test_finetune_options_are_validated():
    params = ic.gd_params(2, 1.0, n_context=3)
    zs = F.zero_shot_copy(params, 2)
    batch = ic.sample_tasks(jax.random.PRNGKey(0), 2, 3, 2)
    with pytest.raises(ValueError):
        F.finetune(zs, batch, 0.1, param_set="everything")
    with pytest.raises(ValueError):
        F.finetune(zs, batch, 0.1, mode="sideways")
    with pytest.raises(ValueError, match="attention-only"):
        F.zero_shot_copy(ic.init_params(jax.random.PRNGKey(0), ic.ModelConfig(dim=2, mlp=True)), 2)


def test_hand_control_report_numbers(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(8), 32, 6, 3)
    r = CA.hand_control(3, 2, 2.0, batch, 6)
    assert max(r["forward_order"]["max_abs_diff"]) < 1e-12
    assert r["forward_order"]["simaou"] == pytest.approx([1.0, 1.0])
    assert r["standard"]["rel_distance"][0] < 1e-12 and r["standard"]["rel_distance"][1] > 1e-2


@settings(max_examples=4)
@given(d=st.integers(1, 5), n=st.integers(2, 9), k=st.integers(1, 4), eta=st.floats(0.2, 2.0),
       seed=st.integers(0, 1000))
def test_hand_k_layer_model_equals_the_explicit_gd_steps_at_every_layer(x64, d, n, k, eta, seed):
    batch = ic.sample_tasks(jax.random.PRNGKey(seed), 6, n, d, x_dist="normal")
    params = ic.gd_params(d, eta, n_layers=k, n_context=n)
    g = CA.gd_step_updates(batch, eta, k)
    chex.assert_shape(g, (k, 6, d + 1))
    assert np.abs(g).max() > 1e-4
    r = CA.gd_step_alignment(params, batch, eta)
    assert r["simaou"] == pytest.approx([1.0] * k, abs=1e-12)
    assert max(r["max_abs_diff"]) < 1e-12 * max(1.0, np.abs(g).max())
    assert CA.exact_layers(r) == list(range(1, k + 1))


def test_gd_step_alignment_measures_a_step_of_the_wrong_size(x64):
    # ICL of the hand model with eta against GD steps with 2 eta: layer 1 is the same direction at twice the size,
    # so SimAOU_GD = 1 and ||h - 2h|| / ||2h|| = 0.5 exactly; later layers differ in direction too.
    batch = ic.sample_tasks(jax.random.PRNGKey(3), 16, 6, 3, x_dist="normal")
    r = CA.gd_step_alignment(ic.gd_params(3, 0.5, n_layers=2, n_context=6), batch, 1.0)
    assert r["simaou"][0] == pytest.approx(1.0, abs=1e-12)
    assert r["rel_distance"][0] == pytest.approx(0.5, abs=1e-12)
    assert r["rel_distance"][1] > 1e-3
    assert CA.exact_layers(r) == []


def test_hand_control_names_the_exactly_reproduced_layers(x64):
    batch = ic.sample_tasks(jax.random.PRNGKey(9), 16, 6, 3)
    r = CA.hand_control(3, 3, 2.0, batch, 6)
    assert r["exact_layers"] == {"standard": [1], "layer_causal": [1], "forward_order": [1, 2, 3],
                                 "gd_steps": [1, 2, 3]}
    assert r["gd_steps"]["simaou"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    assert layers_text(r["exact_layers"]["forward_order"], 3) == "every layer (1-3)"
    assert layers_text(r["exact_layers"]["standard"], 3) == "layer 1 only"
    assert layers_text([2], 3) == "layer 2 only" and layers_text([], 2) == "no layer"


def _cells_input(std, lc, fo=None):
    """Per-seed per-task SimAOU dicts for one parametrisation pair and one step count: values (S, K, B)."""
    fo = lc if fo is None else fo
    return [{f"{ps}|1|{m}": np.asarray(v[s]) for ps in F.PARAM_SETS for m, v in
             (("standard", std), ("layer_causal", lc), ("forward_order", fo))} for s in range(len(std))]


def test_paired_cells_test_the_per_task_differences_and_count_only_significant_cells():
    rng = np.random.default_rng(0)
    b = 200
    std = rng.normal(0.3, 0.2, (2, 2, b))  # 2 seeds, 2 layers
    lc = std.copy()
    lc[:, 0] += 0.05 + rng.normal(0, 0.05, (2, b))   # layer 1: a clear win
    lc[:, 1] += rng.normal(0, 0.05, (2, b))          # layer 2: noise around 0
    lc[1, 1, :3] = np.nan                            # undefined tasks are left out of the pairs
    cells = CA.paired_cells(_cells_input(std, lc), (1,), "layer_causal")
    assert len(cells) == 2 * len(F.PARAM_SETS)
    c1, c2 = cells[0], cells[1]
    d1 = np.mean(lc[:, 0] - std[:, 0], axis=0)
    assert c1["mean_diff"] == pytest.approx(d1.mean(), rel=1e-12)
    assert c1["effect_size"] == pytest.approx(d1.mean() / d1.std(ddof=1), rel=1e-12)
    assert c1["verdict"] == "win" and c1["p"] < 1e-10 and c1["seeds_agreeing"] == 2
    assert c2["n_tasks"] == b  # tasks 0-2 keep seed 0's difference
    assert c2["p"] == pytest.approx(stats.ttest_1samp(np.nanmean(lc[:, 1] - std[:, 1], axis=0), 0.0).pvalue,
                                    rel=1e-9)
    t = CA.tally(cells)
    assert t["raw"]["all"]["cells"] == 4 and t["raw"]["by_param_set"]["attention"]["cells"] == 2
    assert t["raw"]["all"]["wins"] >= 2 and t["holm"]["all"]["wins"] >= 2
    assert sum(v for k, v in t["raw"]["all"].items() if k != "cells") == 4
    pos = t["raw"]["by_position"]  # 2 layers: layer 1 is "first", layer 2 "last", no middle
    assert (pos["first"]["cells"], pos["middle"]["cells"], pos["last"]["cells"]) == (2, 0, 2)
    assert pos["first"]["wins"] == 2


def test_a_loss_on_one_seed_only_is_not_a_consistent_loss():
    rng = np.random.default_rng(1)
    std = rng.normal(0.0, 0.1, (2, 1, 300))
    lc = std.copy()
    lc[0, 0] -= 0.2   # seed 0 loses clearly, seed 1 wins a little
    lc[1, 0] += 0.05
    cells = CA.paired_cells(_cells_input(std, lc), (1,), "layer_causal")
    assert cells[0]["verdict"] == "loss" and cells[0]["seeds_agreeing"] == 1
    t = CA.tally(cells)
    assert t["raw"]["all"]["losses"] == 2 and t["consistent"]["all"]["losses"] == 0
    nan = np.full((2, 1, 300), np.nan)  # nothing defined: undefined, never a win or a loss
    assert CA.paired_cells(_cells_input(std, nan), (1,), "layer_causal")[0]["verdict"] == "undefined"


def test_holm_correction_on_known_p_values():
    # m = 4 at 5%: 0.01 <= 0.0125 and 0.015 <= 0.0167 pass, 0.03 > 0.025 stops; 0.04 fails though below 0.05.
    assert ic_intervals.holm([0.03, 0.01, 0.04, 0.015]) == [False, True, False, True]
    assert ic_intervals.holm([float("nan"), 0.001]) == [False, True]


def test_competent_nulls_score_one_when_icl_moves_the_prediction_to_them(x64):
    # A hand 1-layer GD model: the lone query has no key, so h_ZSL = 0 and ICL's change is the GD step in the y-entry.
    batch = ic.sample_tasks(jax.random.PRNGKey(4), 32, 6, 3, x_dist="normal")
    params = ic.gd_params(3, 1.0, n_layers=1, n_context=6)
    nulls = CA.competent_null_updates(params, batch)
    chex.assert_shape(list(nulls.values()), (32, 4))
    np.testing.assert_allclose(nulls["toward_truth"][:, 3], -np.asarray(batch.y_query))
    np.testing.assert_allclose(nulls["nearest_neighbours"][:, 3], -np.asarray(ic.NearestNeighbours(k=3)(batch)))
    assert np.all(nulls["toward_truth"][:, :3] == 0)
    zs = F.zero_shot_copy(params, 3)
    tuned = F.finetune(zs, batch, 1.0, param_set="adapters", mode="standard", steps=1)
    r = CA.per_layer_alignment(params, batch, tuned, None, {"gd": np.asarray(CA.gd_step_updates(batch, 1.0, 1)[0]),
                                                            **nulls})
    assert r["simaou_gd"] == pytest.approx([1.0], abs=1e-12)   # the null equal to ICL's change scores 1
    gd_pred = np.asarray(ic.GD(eta=1.0, steps=1)(batch))
    sign_agree = np.mean(np.sign(gd_pred) == np.sign(np.asarray(batch.y_query)))
    # Only a y-entry: the per-task cosine is a sign, so SimAOU = 2 P(same sign) - 1.
    assert r["icl_y_energy"] == pytest.approx([1.0])
    assert r["simaou_toward_truth"][0] == pytest.approx(2 * sign_agree - 1, abs=1e-12)
    chex.assert_shape(r["_simaou_per_task"], (1, 32))


def _independent_self_scores(params, tokens_BxD, layers):
    """The query's score on itself entering each layer, by ``ic.forward`` on a lone token (per-task layers when the
    leaves carry a task axis)."""
    def one(layer_tree, tok):
        p = params.replace(layers=layer_tree)
        outs = ic.forward(p, tok[None, None], 0, return_all=True)
        ins = [tok] + [o[0, 0] for o in outs[:-1]]
        return jnp.stack([jnp.sum((l["w_k"] @ t) * (l["w_q"] @ t)) for l, t in zip(layer_tree, ins)])

    return np.asarray(jax.vmap(one)(layers, tokens_BxD)).T


def test_simam_delta_is_undefined_at_layer_1_and_defined_from_layer_2(x64):
    config = ic.ModelConfig(dim=3, n_layers=2, include_query=True, init_scale=0.5)
    params = ic.init_params(jax.random.PRNGKey(11), config)
    batch = ic.sample_tasks(jax.random.PRNGKey(12), 24, 5, 3, x_dist="normal")
    zs = F.zero_shot_copy(params, 3)
    tuned = F.finetune(zs, batch, 0.1, param_set="attention", mode="standard", steps=2)
    r = CA.per_layer_alignment(params, batch, tuned, tuned)  # baseline = the tuned copies: must equal FT's numbers
    assert r["ft_diverged"] == 0
    assert r["max_abs_map_change_icl_vs_zsl"][0] < 1e-12  # the same token (x_q, 0) in both runs: rounding only
    assert r["max_abs_map_change_icl_vs_zsl"][1] > 1e-6
    assert np.isnan(r["simam_delta"][0]) and np.isfinite(r["simam_delta"][1])
    assert r["simam_delta_random_direction"] == pytest.approx(r["simam_delta"], nan_ok=True)
    assert r["simaou_random_direction"] == pytest.approx(r["simaou"])
    # Layer 2's SimAM_delta from scores computed independently with the model's forward pass.
    lone = F.lone_tokens(batch.x_query, 1)
    tile = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch.batch_size,) + a.shape), params.layers)
    m_zsl = _independent_self_scores(params, lone, tile)
    m_ft = _independent_self_scores(params, lone, tuned.layers)  # attention FT: the adapters stay 0
    t1 = ic.forward(params, ic.build_tokens(batch), 5, return_all=True)[0][:, -1]  # ICL's query entering layer 2
    l2 = params.layers[1]
    m_icl2 = np.asarray(jnp.einsum("hkd,bd,hke,be->b", l2["w_k"], t1, l2["w_q"], t1))
    chex.assert_shape([m_zsl, m_ft], (2, batch.batch_size))
    a, f = m_icl2 - m_zsl[1], m_ft[1] - m_zsl[1]
    expected = float(np.dot(a, f) / (np.linalg.norm(a) * np.linalg.norm(f)))
    assert r["simam_delta"][1] == pytest.approx(expected, abs=1e-10)
