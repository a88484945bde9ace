"""Explicit learners, all with the Transformer's call shape: ``learner(batch) -> (B,)`` predictions.

Each learner is a small frozen pytree (``flax.struct.dataclass``) whose real-valued hyper-parameters are leaves, so a
learner can be vmapped over step sizes, and a functional form ``*_predict(batch, ...)`` beside it.

- :mod:`~iclgd_synth.learners.gd`: K-step gradient descent from W0 (per-step step sizes allowed).
- :mod:`~iclgd_synth.learners.gdpp`: GD++ (GD with the input transformation x <- (I - gamma X X^T) x).
- :mod:`~iclgd_synth.learners.momentum`: heavy-ball GD.
- :mod:`~iclgd_synth.learners.sgd`: SGD over the demonstrations in a given order, and Adam on the in-context loss.
- :mod:`~iclgd_synth.learners.least_squares`: minimum-norm least squares and ridge regression.
- :mod:`~iclgd_synth.learners.dmmse`: the posterior mean over a finite task pool.
- :mod:`~iclgd_synth.learners.tuning`: step-size tuning (closed form for GD, grid refinement for anything).
"""

from iclgd_synth.learners._common import Learner
from iclgd_synth.learners.baselines import Averaging, NearestNeighbours, Zero
from iclgd_synth.learners.dmmse import DMMSE
from iclgd_synth.learners.gd import GD
from iclgd_synth.learners.gdpp import GDPlusPlus
from iclgd_synth.learners.least_squares import LeastSquares, Ridge
from iclgd_synth.learners.momentum import MomentumGD
from iclgd_synth.learners.sgd import SGD, Adam
from iclgd_synth.learners.tuning import Tuned, grid_search, tune, tune_gd, tune_gdpp

__all__ = [
    "Adam", "Averaging", "DMMSE", "GD", "GDPlusPlus", "LeastSquares", "Learner", "MomentumGD", "NearestNeighbours",
    "Ridge", "SGD", "Tuned", "Zero",
    "grid_search", "tune", "tune_gd", "tune_gdpp",
]
