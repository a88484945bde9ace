"""Fine-tuning a zero-shot copy of a Transformer on the demonstrations: the "FT" side of ICL-vs-FT comparisons.

Definitions in this testbed (the choices the reports refer to):

- **Zero-shot (ZSL)**: the same layers applied to the query token alone, (x_q, 0) with no demonstrations in the
  sequence. With ``include_query`` the lone query is its own key; without it, a lone token has no key and every
  attention update is 0 (so only the adapters below can make a zero-shot copy do anything).
- **Training data of the fine-tuning**: the task's demonstrations, each presented as a lone zero-shot query
  (x_i, 0) with target y_i. Loss = 0.5 * mean_i ||y_hat(x_i) - y_i||^2 (the in-context loss, half-MSE).
- **What is fine-tuned** (``param_set``):
  - ``"attention"``: W_K and W_V of every layer (as in "Why Can GPT Learn In-Context?", which tunes the attention
    keys and values). Needs ``include_query`` for a non-trivial zero-shot model.
  - ``"adapters"``: per layer l a matrix A_l (D x d), initialised at 0, added to the layer's update:
    e <- e + attn_l(e) + A_l e[:d]. By the dual form, ICL's layer l changes the query by Delta W^l_ICL e_q, so the
    adapters are the fine-tunable counterpart of the implicit weights (reading the input part x of the token, which
    is all that a GD step's Delta W x reads).
- **How** (``mode``), by full-batch GD with step ``lr`` for ``steps`` steps (:func:`finetune`), or (``protocol=
  "sequential"``, :func:`finetune_sequential`) by one SGD step of size ``lr`` per demonstration, in demonstration
  order, batch 1, for ``steps`` passes: the protocol of "Why Can GPT Learn In-Context?" (standard mode only):
  - ``"standard"``: the loss of the final read-out, gradients through all layers;
  - ``"layer_causal"`` ("In-context Learning and Gradient Descent Revisited"): a read-out (minus the y-part) after
    every layer, each layer's input detached (stop-gradient), loss = sum over layers, so layer l's parameters see
    only their own loss; all layers updated together;
  - ``"forward_order"``: layer-causal, but the layers are fine-tuned one after the other in forward order, layer l
    for ``steps`` steps on its own loss after layers < l are done (what a single forward pass could compute).

Recurrent models are unrolled: every layer application gets its own copy of the weights.

Exact control (tested): for the hand-constructed K-layer GD model, forward-order fine-tuning of the adapters with
one step of size eta per layer reproduces the model's per-layer ICL updates of the query exactly (adapter l becomes
minus the l-th GD step's update), whereas standard fine-tuning gives every layer the first GD step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from iclgd_synth import attention as attn
from iclgd_synth.model import Arch, TransformerParams, check_params, forward
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch, validate_batch
from iclgd_synth.tokens import build_tokens, n_context_tokens
from iclgd_synth.validation import check_choice, check_int

PARAM_SETS = ("attention", "adapters")
MODES = ("standard", "layer_causal", "forward_order")
#: How the demonstrations are presented: all at once (full-batch GD, ``steps`` steps) or one SGD step per
#: demonstration in their order, batch 1 (``steps`` passes), the protocol of "Why Can GPT Learn In-Context?".
PROTOCOLS = ("full_batch", "sequential")


@flax.struct.dataclass
class ZeroShotModel:
    """A fine-tunable zero-shot copy: unrolled per-application layers and adapters (K, D, d)."""

    layers: tuple
    adapters: Array
    arch: Arch = flax.struct.field(pytree_node=False, default=Arch())
    dim: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def depth(self) -> int:
        return len(self.layers)


def zero_shot_copy(params: TransformerParams, dim: int) -> ZeroShotModel:
    """The zero-shot copy of ``params`` (linear or softmax attention, no LayerNorm / MLP), adapters at 0."""
    check_params(params)
    for layer in params.layers:
        if set(layer) - {"w_q", "w_k", "w_v", "w_p"}:
            raise ValueError("fine-tuning copies support attention-only layers (no LayerNorm or MLP blocks)")
    if params.arch.layout != "concat":
        raise ValueError("fine-tuning copies need the concat token layout")
    schedule = tuple(dict(layer) for _ in range(params.arch.n_loops) for layer in params.layers)
    dd = params.token_dim
    dtype = params.layers[0]["w_q"].dtype
    return ZeroShotModel(layers=schedule, adapters=jnp.zeros((len(schedule), dd, dim), dtype),
                         arch=dataclasses.replace(params.arch, n_loops=1), dim=dim)


def _apply(model: ZeroShotModel, l: int, tok_BxTxD: Array, keys_T: Array) -> Array:
    arch = model.arch
    update = attn.attention_update(tok_BxTxD, model.layers[l], keys_T, kind=arch.attention, causal=arch.causal,
                                   normalize=arch.normalize)
    update = update + jnp.einsum("ed,btd->bte", model.adapters[l], tok_BxTxD[..., :model.dim])
    out = tok_BxTxD + update
    return out if arch.clip is None else jnp.clip(out, -arch.clip, arch.clip)


def lone_forward(model: ZeroShotModel, tokens_BxD: Array, *, detach_inputs: bool = False) -> list[Array]:
    """Each token alone through the copy; the token after every layer, a list of K arrays (B, D)."""
    tok = tokens_BxD[:, None]
    keys_T = attn.key_mask(1, 0, model.arch.include_query)
    outs = []
    for l in range(model.depth):
        tok = _apply(model, l, jax.lax.stop_gradient(tok) if detach_inputs else tok, keys_T)
        outs.append(tok[:, 0])
    return outs


def lone_tokens(x_Bxd: Array, out_dim: int) -> Array:
    """Zero-shot query tokens (x, 0), (B, D)."""
    return jnp.concatenate([x_Bxd, jnp.zeros(x_Bxd.shape[:-1] + (out_dim,), x_Bxd.dtype)], axis=-1)


def readout(tok_BxD: Array, dim: int) -> Array:
    return -tok_BxD[..., dim:]


def task_loss(model: ZeroShotModel, x_Nxd: Array, y_NxO: Array, mode: str, layer: int | None = None) -> Array:
    toks = lone_tokens(x_Nxd, y_NxO.shape[-1])
    outs = lone_forward(model, toks, detach_inputs=mode != "standard")
    per_layer = [0.5 * jnp.mean(jnp.sum((readout(o, model.dim) - y_NxO) ** 2, -1)) for o in outs]
    if mode == "standard":
        return per_layer[-1]
    if layer is not None:
        return per_layer[layer]
    return sum(per_layer)


def select_params(model: ZeroShotModel, param_set: str, layer: int | None = None) -> Any:
    """The fine-tuned leaves: {"kv": ((w_k, w_v), ...)} or {"a": adapters}, for all layers or one."""
    idx = range(model.depth) if layer is None else [layer]
    if param_set == "attention":
        return {"kv": tuple((model.layers[l]["w_k"], model.layers[l]["w_v"]) for l in idx)}
    return {"a": model.adapters if layer is None else model.adapters[layer]}


def insert_params(model: ZeroShotModel, theta: Any, param_set: str, layer: int | None = None) -> ZeroShotModel:
    idx = list(range(model.depth)) if layer is None else [layer]
    if param_set == "attention":
        layers = list(model.layers)
        for l, (wk, wv) in zip(idx, theta["kv"]):
            layers[l] = {**layers[l], "w_k": wk, "w_v": wv}
        return model.replace(layers=tuple(layers))
    if layer is None:
        return model.replace(adapters=theta["a"])
    return model.replace(adapters=model.adapters.at[layer].set(theta["a"]))


def finetune_task(model: ZeroShotModel, x_Nxd: Array, y_NxO: Array, lr: Any, *, param_set: str = "adapters",
                  mode: str = "standard", steps: int = 1) -> ZeroShotModel:
    """Fine-tune ``model`` on one task's demonstrations (see the module docstring); returns the tuned copy."""
    check_choice("param_set", param_set, PARAM_SETS)
    check_choice("mode", mode, MODES)
    steps = check_int("steps", steps, min_value=1)

    def gd(m, layer):
        def loss(theta):
            return task_loss(insert_params(m, theta, param_set, layer), x_Nxd, y_NxO, mode, layer)

        def body(_, theta):
            g = jax.grad(loss)(theta)
            return jax.tree.map(lambda p, gp: p - lr * gp, theta, g)

        theta = jax.lax.fori_loop(0, steps, body, select_params(m, param_set, layer))
        return insert_params(m, theta, param_set, layer)

    if mode != "forward_order":
        return gd(model, None)
    for l in range(model.depth):
        model = gd(model, l)
    return model


@functools.partial(jax.jit, static_argnames=("param_set", "mode", "steps"))
def finetune(model: ZeroShotModel, batch: TaskBatch, lr: Any, *, param_set: str = "adapters",
             mode: str = "standard", steps: int = 1) -> ZeroShotModel:
    """Fine-tune one copy per task of ``batch`` (leading task axis B on every leaf of the result)."""
    y = batch.labels_BxNxO()
    return jax.vmap(lambda x, yy: finetune_task(model, x, yy, lr, param_set=param_set, mode=mode, steps=steps))(
        batch.x, y)


def finetune_sequential_task(model: ZeroShotModel, x_Nxd: Array, y_NxO: Array, lr: Any, *,
                             param_set: str = "attention", epochs: int = 1) -> ZeroShotModel:
    """One SGD step of size ``lr`` per demonstration, in their order, batch 1 (loss 0.5 ||y_hat(x_i) - y_i||^2 of the
    final read-out, gradients through all layers), for ``epochs`` passes; returns the tuned copy."""
    check_choice("param_set", param_set, PARAM_SETS)
    epochs = check_int("epochs", epochs, min_value=1)

    def step(theta, xy):
        x_d, y_O = xy
        g = jax.grad(lambda th: task_loss(insert_params(model, th, param_set), x_d[None], y_O[None], "standard"))(
            theta)
        return jax.tree.map(lambda p, gp: p - lr * gp, theta, g), None

    xs = (jnp.tile(x_Nxd, (epochs, 1)), jnp.tile(y_NxO, (epochs, 1)))
    theta, _ = jax.lax.scan(step, select_params(model, param_set), xs)
    return insert_params(model, theta, param_set)


@functools.partial(jax.jit, static_argnames=("param_set", "epochs"))
def finetune_sequential(model: ZeroShotModel, batch: TaskBatch, lr: Any, *, param_set: str = "attention",
                        epochs: int = 1) -> ZeroShotModel:
    """:func:`finetune_sequential_task` for every task of ``batch`` (leading task axis B on every leaf)."""
    y = batch.labels_BxNxO()
    return jax.vmap(lambda x, yy: finetune_sequential_task(model, x, yy, lr, param_set=param_set, epochs=epochs))(
        batch.x, y)


def finetune_protocol(model: ZeroShotModel, batch: TaskBatch, lr: Any, *, param_set: str = "attention",
                      mode: str = "standard", steps: int = 1, protocol: str = "full_batch") -> ZeroShotModel:
    """:func:`finetune` (``protocol="full_batch"``, ``steps`` GD steps) or :func:`finetune_sequential`
    (``"sequential"``, ``steps`` passes over the demonstrations; ``mode`` must be ``"standard"``)."""
    check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "full_batch":
        return finetune(model, batch, lr, param_set=param_set, mode=mode, steps=steps)
    if mode != "standard":
        raise ValueError(f"mode must be 'standard' with protocol='sequential' (the paper's sequential fine-tuning "
                         f"has one loss, of the final read-out), got {mode!r}")
    return finetune_sequential(model, batch, lr, param_set=param_set, epochs=check_int("steps", steps, min_value=1))


@jax.jit
def per_task_query_pass(models: ZeroShotModel, batch: TaskBatch) -> tuple[Array, Array]:
    """Per-task copies (leading axis B) on their own task's lone query: the query token after every layer and the
    per-layer self-attention score summed over heads, each (K, B, D) and (K, B)."""
    toks = lone_tokens(batch.x_query, batch.out_dim)

    def one(m, tok):
        outs, scores, t = [], [], tok[None]
        for l in range(m.depth):
            scores.append(_self_score(m.layers[l], t[0]))
            t = lone_forward(m.replace(layers=m.layers[l:l + 1], adapters=m.adapters[l:l + 1]), t)[0]
            outs.append(t[0])
        return jnp.stack(outs), jnp.stack(scores)

    outs, scores = jax.vmap(one)(models, toks)
    return jnp.swapaxes(outs, 0, 1), jnp.swapaxes(scores, 0, 1)


def shared_query_pass(model: ZeroShotModel, batch: TaskBatch) -> tuple[Array, Array]:
    """:func:`per_task_query_pass` for one copy shared by all tasks (the zero-shot model)."""
    b = batch.batch_size
    tiled = jax.tree.map(lambda a: jnp.broadcast_to(a, (b,) + a.shape), model)
    return per_task_query_pass(tiled, batch)


def _self_score(layer: dict, tok_D: Array) -> Array:
    """Sum over heads of (W_K e)^T (W_Q e): the lone token's linear attention score on itself."""
    return jnp.einsum("hk,hk->", layer["w_k"] @ tok_D, layer["w_q"] @ tok_D)


def icl_query_pass(params: TransformerParams, batch: TaskBatch) -> tuple[Array, Array]:
    """The ICL model on the full sequence: the query token after every layer application (K, B, D), and the query's
    score on itself (summed over heads; 0 when the query is not a key), (K, B)."""
    check_params(params)
    batch = validate_batch(batch)
    tokens = build_tokens(batch, params.arch.layout)
    outs = forward(params, tokens, n_context_tokens(batch.n_context, params.arch.layout), return_all=True)
    schedule = [layer for _ in range(params.arch.n_loops) for layer in params.layers]
    ins = [tokens] + outs[:-1]
    scores = [jax.vmap(lambda t, layer=layer: _self_score(layer, t))(x[:, -1]) for layer, x in zip(schedule, ins)]
    if not params.arch.include_query:
        scores = [jnp.zeros_like(s) for s in scores]
    return jnp.stack([o[:, -1] for o in outs]), jnp.stack(scores)


def layer_updates(tokens_KxBxD: Array, first_BxD: Array) -> Array:
    """Per-layer changes of the query token, (K, B, D), from the token after every layer and the input token."""
    prev = jnp.concatenate([first_BxD[None], tokens_KxBxD[:-1]], axis=0)
    return tokens_KxBxD - prev


@functools.partial(jax.jit, static_argnames=("param_set",))
def random_like_update(key: Array, tuned: ZeroShotModel, base: ZeroShotModel, param_set: str) -> ZeroShotModel:
    """Per task, ``base`` moved in a random Gaussian direction with the same norm, leaf by leaf, as the fine-tuning
    update ``tuned - base`` (the random-direction baseline). Jitted: one compilation per parametrisation instead of
    one per eager operation and leaf shape."""
    b = jax.tree.leaves(tuned.adapters)[0].shape[0]
    base_b = jax.tree.map(lambda a: jnp.broadcast_to(a, (b,) + a.shape), base)
    th_t, th_0 = select_params(tuned, param_set), select_params(base_b, param_set)
    leaves_t, tree = jax.tree.flatten(th_t)
    leaves_0 = jax.tree.leaves(th_0)
    keys = jax.random.split(key, len(leaves_t))
    new = []
    for k, lt, l0 in zip(keys, leaves_t, leaves_0):
        delta = lt - l0
        r = jax.random.normal(k, delta.shape, delta.dtype)
        axes = tuple(range(1, delta.ndim))
        scale = jnp.sqrt(jnp.sum(delta**2, axes, keepdims=True) / jnp.maximum(jnp.sum(r**2, axes, keepdims=True),
                                                                                1e-300))
        new.append(l0 + r * scale)
    return insert_params(base_b, jax.tree.unflatten(tree, new), param_set)


def query_loss(tokens_KxBxD: Array, batch: TaskBatch, dim: int) -> float:
    """Half-MSE of the final read-out of per-layer query tokens, over the tasks where it is finite."""
    pred = readout(tokens_KxBxD[-1], dim)
    se = np.asarray(0.5 * jnp.sum((pred - batch.query_labels_BxO()) ** 2, -1), np.float64)
    ok = np.isfinite(se)
    return float(se[ok].mean()) if ok.any() else float("nan")


def n_diverged(tokens_KxBxD: Array) -> int:
    """Tasks whose fine-tuned copy produced a non-finite query token."""
    return int(np.sum(~np.all(np.isfinite(np.asarray(tokens_KxBxD)), axis=(0, 2))))


def tune_lr(model: ZeroShotModel, batch: TaskBatch, *, param_set: str, mode: str, steps: int,
            grid: Any = None, protocol: str = "full_batch") -> tuple[float, dict[float, float]]:
    """The fine-tuning step size from a log grid that minimises the fine-tuned copies' query loss on ``batch``
    (step sizes for which any task diverges are rejected); ``protocol`` as in :func:`finetune_protocol`."""
    grid = np.logspace(-2, 2.5, 19) if grid is None else np.asarray(grid, np.float64)
    losses = {}
    for lr in grid:
        tuned = finetune_protocol(model, batch, float(lr), param_set=param_set, mode=mode, steps=steps,
                                  protocol=protocol)
        toks, _ = per_task_query_pass(tuned, batch)
        loss = query_loss(toks, batch, model.dim)
        # A step size that makes any tuning task diverge is rejected.
        losses[float(lr)] = loss if np.isfinite(loss) and n_diverged(toks) == 0 else float("inf")
    best = min(losses, key=losses.get)
    return best, losses
