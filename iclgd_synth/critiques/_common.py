"""Transitional re-exports for the critique modules while they move to the study protocol (to be removed)."""

from __future__ import annotations

from iclgd_synth.plotting import bar_chart, heatmap, line_chart  # noqa: F401
from iclgd_synth.plotting import model_loss_curves as loss_curves  # noqa: F401
from iclgd_synth.plotting import weight_heatmaps
from iclgd_synth.precision import to_float64  # noqa: F401
from iclgd_synth.reports.tables import fmt, table  # noqa: F401


def matrix_heatmaps(path, matrices, *, title=""):
    return weight_heatmaps(path, matrices, title=title).name
