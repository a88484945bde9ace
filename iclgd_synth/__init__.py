"""iclgd_synth: a testbed for the question "is in-context learning gradient descent?".

Synthetic linear-regression tasks, linear self-attention Transformers (hand-constructed to implement GD, or trained on
the in-context objective), explicit learners on the very same tasks, and the papers' comparison metrics.

Public API (a contract; see README.md), one name per thing:

    TaskConfig, TaskBatch, TASK_PRESETS, task_pool                   tasks (iclgd_synth.tasks)
    sample(key, config, B), sample_tasks(key, B, N, d, **options)   draw tasks from a TaskConfig / from sizes
    build_tokens                                                     token layouts (iclgd_synth.tokens)
    TransformerParams, Arch, ModelConfig, init_params, forward,      the Transformer (iclgd_synth.model); parameters
    layer_predictions                                                are callable: params(batch) -> (B,)
    gd_params, gdpp_params, from_products, split_heads               hand-constructed weights (iclgd_synth.constructions)
    GD, GDPlusPlus, MomentumGD, SGD, Adam, LeastSquares, Ridge,      explicit learners, each one class with
    DMMSE, Zero, Averaging, NearestNeighbours, Learner               learner(batch) and learner.weights(batch)
    GPTConfig, GPTParams, init_gpt, gpt_forward                      the GPT-style regression model (iclgd_synth.gpt)
    tune, tune_gd, tune_gdpp, grid_search, Tuned                     hyper-parameter tuning (iclgd_synth.learners)
    half_mse                                                         the loss (iclgd_synth.losses)
    FlaxTransformer, to_flax, from_flax                              the Transformer as a Flax NNX module
                                                                     (iclgd_synth.flax_module; imported on first use)

Modules by name: ``theory`` (exact population losses, the optimal preconditioner), ``implicit_weights`` (per-layer
implicit weights, GD++ conditioning), ``gpt`` (the GPT-style regression model), ``metrics``, ``train``, ``studies``.
"""

from iclgd_synth.constructions import from_products, gd_params, gdpp_params, split_heads
from iclgd_synth.gpt import GPTConfig, GPTParams, gpt_forward, init_gpt
from iclgd_synth.learners import (
    DMMSE, GD, SGD, Adam, Averaging, GDPlusPlus, LeastSquares, Learner, MomentumGD, NearestNeighbours, Ridge, Tuned,
    Zero, grid_search, tune, tune_gd, tune_gdpp,
)
from iclgd_synth.losses import half_mse
from iclgd_synth.model import Arch, ModelConfig, TransformerParams, forward, init_params, layer_predictions
from iclgd_synth.tasks import TASK_PRESETS, TaskBatch, TaskConfig, sample, sample_tasks, task_pool
from iclgd_synth.tokens import build_tokens

__version__ = "0.1.0"

_LAZY = {"FlaxTransformer": "iclgd_synth.flax_module", "to_flax": "iclgd_synth.flax_module",
         "from_flax": "iclgd_synth.flax_module"}


def __getattr__(name: str):
    """Names whose module is heavy to import (flax.nnx) load on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'iclgd_synth' has no attribute {name!r}")

__all__ = [
    "Adam", "Arch", "Averaging", "DMMSE", "GD", "GDPlusPlus", "GPTConfig", "GPTParams", "LeastSquares", "Learner",
    "ModelConfig", "MomentumGD", "NearestNeighbours", "Ridge", "SGD", "Zero", "gpt_forward", "init_gpt", "TASK_PRESETS", "TaskBatch", "TaskConfig", "TransformerParams", "Tuned", "build_tokens", "forward",
    "from_products", "gd_params", "gdpp_params", "grid_search", "half_mse", "init_params", "layer_predictions",
    "sample", "sample_tasks", "split_heads", "task_pool", "tune", "tune_gd", "tune_gdpp", "FlaxTransformer", "to_flax",
    "from_flax",
]
