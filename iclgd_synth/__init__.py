"""iclgd_synth: a testbed for the question "is in-context learning gradient descent?".

Synthetic linear-regression tasks, linear self-attention Transformers (hand-constructed to implement GD, or trained on
the in-context objective), explicit learners on the very same tasks, and the papers' comparison metrics.

Public API (a contract; see README.md):

    TaskBatch, sample_tasks            tasks (iclgd_synth.tasks)
    gd_params, gdpp_params             hand-constructed weights (iclgd_synth.constructions)
    lsa_predict                        the Transformer's prediction for any parameters (iclgd_synth.model)
    gd_predict                         explicit K-step GD (iclgd_synth.learners.gd)
"""

from iclgd_synth.constructions import from_products, gd_params, gdpp_params, split_heads
from iclgd_synth.learners import (
    DMMSE, GD, SGD, Adam, GDPlusPlus, LeastSquares, MomentumGD, Ridge, Tuned, adam_predict, dmmse_predict,
    gd_predict, gd_weights, gdpp_predict, grid_search, least_squares_predict, momentum_gd_predict, ridge_predict,
    sgd_predict, tune, tune_gd, tune_gdpp,
)
from iclgd_synth.losses import half_mse
from iclgd_synth.model import (
    Arch, ModelConfig, TransformerParams, forward, init_params, layer_predictions, lsa_predict, predict,
)
from iclgd_synth.tasks import TASK_PRESETS, TaskBatch, TaskConfig, sample, sample_tasks, task_pool
from iclgd_synth.tokens import build_tokens

__version__ = "0.1.0"

__all__ = [
    "Adam", "Arch", "DMMSE", "GD", "GDPlusPlus", "LeastSquares", "ModelConfig", "MomentumGD", "Ridge", "SGD",
    "TASK_PRESETS", "TaskBatch", "TaskConfig", "TransformerParams", "Tuned", "adam_predict", "build_tokens",
    "dmmse_predict", "forward", "from_products", "gd_params", "gd_predict", "gd_weights", "gdpp_params",
    "gdpp_predict", "grid_search", "half_mse", "init_params", "layer_predictions", "least_squares_predict",
    "lsa_predict", "momentum_gd_predict", "predict", "ridge_predict", "sample", "sample_tasks", "sgd_predict",
    "split_heads", "task_pool", "tune", "tune_gd", "tune_gdpp",
]
