"""Sequential fine-tuning (the protocol of "Why Can GPT Learn In-Context?": one SGD step per demonstration, in order,
batch 1) against closed forms: on the hand GD layer's adapter it is one pass of online least-squares SGD, whose
weights have the product form w_N = sum_i lr y_i x_i^T prod_{j > i} (I - lr x_j x_j^T); on W_K, W_V it is N
single-demonstration full-batch steps in a row."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import iclgd_synth as ic
from iclgd_synth.critiques import finetune as F


def _batch(seed, b, n, d, o):
    rng = np.random.default_rng(seed)
    x, xq, w = rng.normal(size=(b, n, d)), rng.normal(size=(b, d)), rng.normal(size=(b, o, d))
    y, yq = np.einsum("bod,bnd->bno", w, x), np.einsum("bod,bd->bo", w, xq)
    if o == 1:
        y, yq = y[..., 0], yq[:, 0]
    return ic.TaskBatch.create(x=x, y=y, x_query=xq, y_query=yq)


def _closed_form_sgd(batch, lr, epochs):
    """Online least-squares SGD from 0 in product form, (B, O, d)."""
    x = np.tile(np.asarray(batch.x), (1, epochs, 1))
    y = np.tile(np.asarray(batch.labels_BxNxO()), (1, epochs, 1))
    b, m, d = x.shape
    out = np.zeros((b, y.shape[-1], d))
    for t in range(b):
        for i in range(m):
            prod = np.eye(d)
            for j in range(i + 1, m):
                prod = prod @ (np.eye(d) - lr * np.outer(x[t, j], x[t, j]))
            out[t] += lr * np.outer(y[t, i], x[t, i]) @ prod
    return out


@pytest.mark.parametrize("o, epochs", [(1, 1), (2, 2)])
def test_sequential_adapter_fine_tuning_of_the_hand_layer_is_online_sgd(x64, o, epochs):
    d, n, lr = 3, 4, 0.3
    batch = _batch(o, 5, n, d, o)
    zs = F.zero_shot_copy(ic.gd_params(d, 1.0, n_context=n, out_dim=o), d)
    tuned = F.finetune_sequential(zs, batch, lr, param_set="adapters", epochs=epochs)
    # Without the query as a key the lone query's attention output is 0: the prediction is -A[y, :] x.
    w = -np.asarray(tuned.adapters[:, 0, d:, :])
    np.testing.assert_allclose(w, _closed_form_sgd(batch, lr, epochs), atol=1e-12)
    ref = ic.SGD(eta=lr, epochs=epochs, batch_size=1).weights(batch)
    np.testing.assert_allclose(w, np.asarray(ref), atol=1e-12)
    # The order matters (it is not full-batch GD): reversed demonstrations give other weights.
    rev = F.finetune_sequential(zs, batch.with_context_order(np.arange(n)[::-1]), lr, param_set="adapters",
                                epochs=epochs)
    assert np.abs(-np.asarray(rev.adapters[:, 0, d:, :]) - w).max() > 1e-3


def test_sequential_kv_fine_tuning_is_single_demonstration_steps_in_order(x64):
    d, n, lr = 2, 3, 0.2
    cfg = ic.ModelConfig(dim=d, include_query=True)
    params = ic.init_params(jax.random.PRNGKey(0), cfg)
    zs = F.zero_shot_copy(params, d)
    batch = _batch(7, 2, n, d, 1)
    seq = F.finetune_sequential(zs, batch, lr, param_set="attention")
    for t in range(2):
        m = zs
        for i in range(n):
            m = F.finetune_task(m, batch.x[t, i:i + 1], batch.labels_BxNxO()[t, i:i + 1], lr,
                                param_set="attention", steps=1)
        for key in ("w_k", "w_v"):
            np.testing.assert_allclose(np.asarray(seq.layers[0][key][t]), np.asarray(m.layers[0][key]), atol=1e-13)
    moved = np.abs(np.asarray(seq.layers[0]["w_k"][0]) - np.asarray(zs.layers[0]["w_k"])).max()
    assert moved > 1e-6
    full = F.finetune_protocol(zs, batch, lr, param_set="attention", steps=1, protocol="full_batch")
    assert np.abs(np.asarray(full.layers[0]["w_k"][0]) - np.asarray(seq.layers[0]["w_k"][0])).max() > 1e-8


def test_finetune_protocol_rejects_bad_choices():
    zs = F.zero_shot_copy(ic.gd_params(2, 1.0, n_context=3), 2)
    batch = _batch(0, 2, 3, 2, 1)
    with pytest.raises(ValueError, match="protocol"):
        F.finetune_protocol(zs, batch, 0.1, protocol="online")
    with pytest.raises(ValueError, match="mode must be 'standard'"):
        F.finetune_protocol(zs, batch, 0.1, param_set="adapters", mode="layer_causal", protocol="sequential")
