"""Named studies (``iclgd run NAME``), each reproducing one analysis with its own run directory and report.

Training studies (``gd_comparison``), all on the reference paper's task preset (d = N = 10, x ~ U(-0.5, 0.5)):

    vonoswald   1-layer LSA vs one step of tuned GD (the main job)
    recurrent   recurrent 2-layer LSA vs 2 steps of GD and GD++
    deep        deep 5-layer LSA (token clipping, lr 5e-4) vs 5 steps of GD and GD++
    softmax     softmax attention with 1 and 2 heads vs one step of GD
    layernorm   LSA with LayerNorm vs one step of GD
    mlp         LSA with an MLP block vs one step of GD

Other studies register themselves in :data:`STUDIES` with a ``run(quick, root, force, progress) -> Path`` callable.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

from iclgd_synth.model import ModelConfig
from iclgd_synth.studies import gd_comparison
from iclgd_synth.studies.gd_comparison import GDComparisonStudy
from iclgd_synth.tasks import TASK_PRESETS
from iclgd_synth.train import TrainConfig
from iclgd_synth.validation import int_at_least

_TASK = TASK_PRESETS["vonoswald"]
_LSA = ModelConfig(dim=10)


def _study(name, description, models, n_steps=5000, lr=1e-3, **kw) -> GDComparisonStudy:
    return GDComparisonStudy(name=name, description=description,
                             train=TrainConfig(task=_TASK, model=models[0][1], n_steps=n_steps, lr=lr),
                             models=tuple(models), **kw)


#: The training presets of the reference paper, as studies.
PRESETS: dict[str, GDComparisonStudy] = {
    "vonoswald": _study(
        "vonoswald", "A 1-layer linear self-attention model trained on in-context regression against one step of "
        "tuned gradient descent and the hand-constructed weights that implement it.", [("lsa", _LSA)],
        llm_weights=("smollm2", "minilm")),
    "recurrent": _study(
        "recurrent", "A recurrent 2-layer LSA (one set of weights applied twice) against 2 steps of tuned GD and "
        "GD++.", [("lsa_recurrent2", _LSA.replace(n_layers=2, recurrent=True))], baseline_steps=2, gdpp=True),
    "deep": _study(
        "deep", "A deep 5-layer LSA (separate weights per layer, token values clipped to [-10, 10]) against 5 steps "
        "of tuned GD and GD++.", [("lsa_deep5", _LSA.replace(n_layers=5, clip=10.0))], n_steps=20000, lr=5e-4,
        baseline_steps=5, gdpp=True),
    "softmax": _study(
        "softmax", "Softmax attention with one and with two heads against one step of tuned GD: one head cannot "
        "express the linear GD update, two heads can approximate it.",
        [("softmax_1head", _LSA.replace(attention="softmax")),
         ("softmax_2heads", _LSA.replace(attention="softmax", n_heads=2))]),
    "layernorm": _study(
        "layernorm", "LSA with pre-LayerNorm against one step of tuned GD, in and out of distribution.",
        [("lsa_layernorm", _LSA.replace(layer_norm=True))]),
    "mlp": _study(
        "mlp", "LSA followed by a ReLU MLP block against one step of tuned GD.", [("lsa_mlp", _LSA.replace(mlp=True))]),
}

#: name -> runner(quick, root, force, progress) -> run directory
STUDIES: dict[str, Callable[..., Path]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str, runner: Callable[..., Path]) -> None:
    STUDIES[name] = runner
    DESCRIPTIONS[name] = description


_STUDY_FIELDS = {f.name for f in dataclasses.fields(GDComparisonStudy)} - {"name", "description", "train", "models"}


def _gd_runner(preset: GDComparisonStudy) -> Callable[..., Path]:
    def runner(quick: bool = False, root: str = "runs", force: bool = False, progress: bool = True, **overrides):
        """``overrides``: fields of the study (tune_tasks, ood, llm_weights, llm_max_layers, ...) or of its
        TrainConfig (n_steps, seeds, eval_batch, ...); ``no_llm_weights=True`` drops the LLM comparison. Setting
        ``llm_max_layers`` keeps the preset's LLM comparison under ``quick`` too (reading that many layers)."""
        study = preset.quick() if quick else preset
        if overrides.get("llm_max_layers") is not None and "llm_weights" not in overrides:
            overrides["llm_weights"] = preset.llm_weights
        if overrides.pop("no_llm_weights", False):
            overrides.update(llm_weights=(), llm_max_layers=None)
        study_changes = {k: overrides.pop(k) for k in list(overrides) if k in _STUDY_FIELDS}
        if study_changes:
            study = dataclasses.replace(study, **study_changes)
        if overrides:
            study = dataclasses.replace(study, train=study.train.replace(**overrides))
        return gd_comparison.run(study, root, force=force, progress=progress)

    return runner


for _name, _preset in PRESETS.items():
    register(_name, _preset.description, _gd_runner(_preset))


def run_study(name: str, *, quick: bool = False, root: str = "runs", force: bool = False, progress: bool = True,
              **overrides) -> Path:
    """Run a named study and return its run directory."""
    _load_optional_studies()
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; available: {', '.join(sorted(STUDIES))}")
    return STUDIES[name](quick=quick, root=root, force=force, progress=progress, **overrides)


def _load_optional_studies() -> None:
    """Studies defined in other modules register themselves on import."""
    import importlib

    for module in ("iclgd_synth.critiques",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="study name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    parser.add_argument("--quick", action="store_true", help="CI-sized run (few steps, few tasks)")
    parser.add_argument("--force", action="store_true", help="recompute even if a finished run exists")
    parser.add_argument("--root", default="runs", help="directory of run directories (default: runs)")
    parser.add_argument("--steps", type=int_at_least(1), default=None, help="override the number of training steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds trained together")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-llm-weights", action="store_true",
                        help="leave out the real-LLM weight comparison of the main job (about 10 s, 3 s with the\n"
                             "statistics cached)")
    parser.add_argument("--llm-max-layers", type=int_at_least(1), default=None,
                        help="read only the first N layers of each LLM in the weight comparison; keeps the "
                             "comparison under --quick too")


def main(args: argparse.Namespace) -> int:
    _load_optional_studies()
    if args.list or args.name is None:
        for name in sorted(STUDIES):
            print(f"{name:12s} {DESCRIPTIONS[name]}")
        return 0 if args.list else 2
    overrides = {}
    if args.steps is not None:
        overrides["n_steps"] = args.steps
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if getattr(args, "no_llm_weights", False):
        overrides["no_llm_weights"] = True
    if getattr(args, "llm_max_layers", None) is not None:
        overrides["llm_max_layers"] = args.llm_max_layers
    out = run_study(args.name, quick=args.quick, root=args.root, force=args.force,
                    progress=not args.no_progress, **overrides)
    print(out / "report.md")
    return 0
