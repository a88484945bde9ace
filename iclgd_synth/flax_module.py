"""The Transformer as a Flax NNX module, whose parameters convert both ways with :class:`TransformerParams`.

The package keeps its parameters as a plain pytree (:class:`~iclgd_synth.model.TransformerParams`) so that one
``predict`` serves hand-constructed, trained and interpolated weights. Users of the Flax stack build models as modules
and train them with ``nnx.Optimizer``; :class:`FlaxTransformer` is that module. It holds each layer's arrays as
``nnx.Param`` under the names of the layer dict (``w_q``, ``w_k``, ``w_v``, ``w_p``; ``ln_attn``, ``ln_mlp``, ``mlp``
when present) and computes with the package's own layer math (:func:`iclgd_synth.model.predict` and
:func:`~iclgd_synth.model.forward` on the parameters it holds), so the two can never disagree:

    model = to_flax(gd_params(10, eta=6.0, n_layers=3))         # hand-constructed weights, as a module
    model = FlaxTransformer(ModelConfig(dim=10), rngs=nnx.Rngs(0))   # or a fresh one, initialised as init_params does
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)  # ... a Flax training loop ...
    params = from_flax(model)                                    # back to TransformerParams: every metric and study

The static architecture (:class:`~iclgd_synth.model.Arch`: loops, attention kind, masks, layout, ...) is a plain
attribute of the module, as it is static in the pytree.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from iclgd_synth import model as M
from iclgd_synth.shapes import Array
from iclgd_synth.tasks import TaskBatch


class FlaxLayer(nnx.Module):
    """One layer: every array of the layer dict as an ``nnx.Param`` (nested dicts such as ``mlp`` as ``nnx.Dict``)."""

    def __init__(self, layer: dict):
        self.names = tuple(layer)
        for name, value in layer.items():
            setattr(self, name, _to_nnx(value))

    def as_dict(self) -> dict:
        """The layer dict of :mod:`iclgd_synth.model` (current values, same names and nesting)."""
        return {name: _from_nnx(getattr(self, name)) for name in self.names}


class FlaxTransformer(nnx.Module):
    """The Transformer of :mod:`iclgd_synth.model` as an NNX module.

    Args:
      spec: a :class:`~iclgd_synth.model.ModelConfig` (parameters drawn as :func:`~iclgd_synth.model.init_params`
        draws them, from ``rngs.params()``) or a :class:`~iclgd_synth.model.TransformerParams` (wrapped as given:
        hand-constructed, trained or interpolated weights).
      rngs: ``nnx.Rngs``, required with a ModelConfig.
      dtype: parameter dtype with a ModelConfig (default: JAX's default float).

    Calling the module on a :class:`~iclgd_synth.tasks.TaskBatch` gives the predictions (B,) (or (B, d_out)), the
    same call shape as every learner; :meth:`forward` runs it on tokens.
    """

    def __init__(self, spec: M.ModelConfig | M.TransformerParams, *, rngs: nnx.Rngs | None = None,
                 dtype: Any = None):
        if isinstance(spec, M.ModelConfig):
            if rngs is None:
                raise ValueError("FlaxTransformer(ModelConfig(...)) draws random initial weights: pass rngs, e.g. "
                                 "rngs=nnx.Rngs(0); or pass TransformerParams to wrap existing weights")
            spec = M.init_params(rngs.params(), spec, dtype)
        elif not isinstance(spec, M.TransformerParams):
            raise TypeError(f"spec must be an iclgd_synth.ModelConfig or iclgd_synth.TransformerParams, got "
                            f"{type(spec).__name__}; convert a parameter pytree with to_flax(params)")
        M.check_params(spec)
        self.arch = spec.arch
        self.layers = nnx.List([FlaxLayer(layer) for layer in spec.layers])

    def to_params(self) -> M.TransformerParams:
        """The module's current parameters as :class:`~iclgd_synth.model.TransformerParams` (arrays shared)."""
        return M.TransformerParams(layers=tuple(layer.as_dict() for layer in self.layers), arch=self.arch)

    def __call__(self, batch: TaskBatch, *, form: str = "auto", w0: Array | None = None) -> Array:
        """Predictions for every task of ``batch``, exactly :func:`iclgd_synth.model.predict` on these weights."""
        return M.predict(self.to_params(), batch, form=form, w0=w0)

    def forward(self, tokens_BxTxD: Array, n_ctx_tokens: int, **options) -> Array | list[Array]:
        """:func:`iclgd_synth.model.forward` on these weights (options: form, query_only, return_all)."""
        return M.forward(self.to_params(), tokens_BxTxD, n_ctx_tokens, **options)


def to_flax(params: M.TransformerParams) -> FlaxTransformer:
    """Hand-constructed, trained or interpolated :class:`TransformerParams` as a :class:`FlaxTransformer`."""
    if not isinstance(params, M.TransformerParams):
        raise TypeError(f"params must be iclgd_synth.TransformerParams, got {type(params).__name__}")
    return FlaxTransformer(params)


def from_flax(module: FlaxTransformer) -> M.TransformerParams:
    """A :class:`FlaxTransformer`'s current parameters as :class:`TransformerParams`, for every metric and study."""
    if not isinstance(module, FlaxTransformer):
        raise TypeError(f"module must be an iclgd_synth.flax_module.FlaxTransformer, got {type(module).__name__}; "
                        "a TransformerParams needs no conversion")
    return module.to_params()


def _to_nnx(value: Any) -> nnx.Param | nnx.Dict:
    if isinstance(value, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in value.items()})
    return nnx.Param(jnp.asarray(value))


def _from_nnx(value: Any) -> Any:
    if isinstance(value, nnx.Dict):
        return {k: _from_nnx(v) for k, v in value.items()}
    return value[...]
