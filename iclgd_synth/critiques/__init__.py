"""The critiques of "ICL is GD" as experiments on the regression testbed.

- :mod:`~iclgd_synth.critiques.order` (``iclgd run order``): order sensitivity of ICL vs full-batch GD, SGD, Adam
  ("Do pretrained Transformers Learn In-Context by Gradient Descent?").
- :mod:`~iclgd_synth.critiques.dual` (``iclgd run dual``): the dual form of linear attention as an inspectable object
  (exported to ``dual_form.npz``), ICL-vs-fine-tuning metrics (SimAOU, SimAM_delta, Kendall, Rec2FTP) and momentum
  attention ("Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as
  Meta-Optimizers"); the momentum constructions live in :mod:`~iclgd_synth.critiques.momentum`.
- :mod:`~iclgd_synth.critiques.causality` (``iclgd run causal``): per-layer alignment of ICL with standard and
  layer-causal fine-tuning and with the explicit GD steps ("In-context Learning and Gradient Descent Revisited");
  fine-tuning of zero-shot model copies is in :mod:`~iclgd_synth.critiques.finetune`, the metrics in
  :mod:`~iclgd_synth.critiques.alignment`.

Importing this package registers the three studies with :func:`iclgd_synth.studies.register` (no work is done at
import time beyond that).
"""

from __future__ import annotations

from iclgd_synth import studies as _studies


def _runner(module: str):
    """A runner that imports its study module on first use (keeps ``import iclgd_synth.critiques`` light)."""

    def runner(quick: bool = False, root: str = "runs", force: bool = False, progress: bool = True, **overrides):
        import importlib

        return importlib.import_module(f"iclgd_synth.critiques.{module}").run(
            quick=quick, root=root, force=force, progress=progress, **overrides)

    runner.__name__ = f"run_{module}"
    return runner


_studies.register("order", "Order sensitivity: spread of predictions across orderings of the demonstrations for "
                           "GD, GD++, SGD, Adam, trained causal / non-causal Transformers and causal hand weights.",
                  _runner("order"))
_studies.register("dual", "Dual form of linear attention (W_ZSL, Delta W_ICL; exported to dual_form.npz), ICL vs "
                          "fine-tuning metrics (SimAOU, SimAM_delta from layer 2, Kendall, Rec2FTP, with a "
                          "known-answer control) and momentum attention: exact relations to GD with momentum, and "
                          "training.",
                  _runner("dual"))
_studies.register("causal", "Layer causality: per-layer updates of trained multi-layer LSAs against standard and "
                            "layer-causal fine-tuning of a zero-shot copy and against the explicit GD steps, with the "
                            "hand GD model as exact control.",
                  _runner("causality"))
