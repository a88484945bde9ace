"""The static table of named studies (``iclgd run NAME``): name -> (module, attribute, one-line description).

Nothing is imported until a study is asked for, so listing the studies is cheap and importing this module has no
side effects. Each entry names a :class:`~iclgd_synth.studies.protocol.Study` object in a study module.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

_GD = "iclgd_synth.studies.gd_comparison"

#: name -> (module, attribute, description)
STUDIES: dict[str, tuple[str, str, str]] = {
    "vonoswald": (_GD, "VONOSWALD", "1-layer LSA vs one step of tuned GD and the hand construction (the main job)"),
    "recurrent": (_GD, "RECURRENT", "recurrent 2-layer LSA vs 2 steps of tuned GD and GD++"),
    "deep": (_GD, "DEEP", "deep 5-layer LSA (token clipping, lr 5e-4) vs 5 steps of tuned GD and GD++"),
    "softmax": (_GD, "SOFTMAX", "softmax attention with 1 and 2 heads vs one step of tuned GD"),
    "layernorm": (_GD, "LAYERNORM", "LSA with LayerNorm vs one step of tuned GD, in and out of distribution"),
    "mlp": (_GD, "MLP", "LSA with an MLP block vs one step of tuned GD"),
    "order": ("iclgd_synth.studies.order", "ORDER",
              "order sensitivity of GD, GD++, SGD, Adam, trained and hand-constructed Transformers"),
    "dual": ("iclgd_synth.studies.dual", "DUAL",
             "dual form of linear attention, ICL vs fine-tuning metrics, momentum attention"),
    "causal": ("iclgd_synth.studies.causal", "CAUSAL",
               "layer causality: per-layer ICL updates vs standard and layer-causal fine-tuning"),
    "emergent": ("iclgd_synth.studies.emergent", "EMERGENT",
                 "GPT-style models trained on every position vs the ICL objective, at every context length"),
    "emergent-paper": ("iclgd_synth.studies.emergent", "EMERGENT_PAPER",
                       "the emergent study at the GPT-style testbeds' size (d = 20, N = 40, 12 layers): accelerators"),
    "preconditioned": ("iclgd_synth.studies.preconditioned", "PRECONDITIONED",
                       "trained 1-layer LSAs on anisotropic inputs against the exact optimal preconditioner G*"),
    "transience": ("iclgd_synth.studies.transience", "TRANSIENCE",
                   "transient ICL on finite task pools: distances to ridge and dMMSE over training, M x weight decay"),
}


def names() -> list[str]:
    return sorted(STUDIES)


def describe(name: str) -> str:
    return STUDIES[name][2]


def get_study(name: str) -> Any:
    """The :class:`~iclgd_synth.studies.protocol.Study` registered as ``name``; an unknown name raises ValueError with the nearest names."""
    if name not in STUDIES:
        near = difflib.get_close_matches(str(name), list(STUDIES), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ValueError(f"unknown study {name!r}{hint}; available: {', '.join(names())}")
    module, attr, _ = STUDIES[name]
    return getattr(importlib.import_module(module), attr)
