"""Named studies (``iclgd run NAME``): configs and the science of each analysis, run by one driver.

- :mod:`~iclgd_synth.studies.protocol`: the study protocol (config, compute, render) and the driver
  (prepare / skip / force / resume / finish);
- :mod:`~iclgd_synth.studies.registry`: the static table of names;
- :mod:`~iclgd_synth.studies.gd_comparison`: the training studies of the reference paper (vonoswald, recurrent,
  deep, softmax, layernorm, mlp);
- :mod:`~iclgd_synth.studies.order`, :mod:`~iclgd_synth.studies.dual`, :mod:`~iclgd_synth.studies.causal`: the
  critiques as experiments.

Reports and figures are rendered by :mod:`iclgd_synth.reports` from the metrics a study returns.
This module holds the ``iclgd run`` command: ``--set PATH=VALUE`` overrides any config field by dotted path and
``--seeds`` sets ``train.seeds``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from iclgd_synth.validation import int_at_least


def run_study(name: str, *, quick: bool = False, overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
              root: str | os.PathLike = "runs", force: bool = False, progress: bool = True) -> Path:
    """Run the study registered as ``name`` (see :func:`iclgd_synth.studies.protocol.run`); returns its run
    directory."""
    from iclgd_synth.studies import protocol
    from iclgd_synth.studies.registry import get_study

    return protocol.run(get_study(name), quick=quick, overrides=overrides, seeds=seeds, root=root, force=force,
                        progress=progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="study name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    parser.add_argument("--quick", action="store_true", help="CI-sized run (few steps, few tasks), same code path")
    parser.add_argument("--force", action="store_true",
                        help="recompute even if a finished run exists (the old results are replaced only when the "
                             "new run has finished)")
    parser.add_argument("--root", default="runs", help="folder of the run directories (default: runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="set a config field by dotted path, e.g. --set train.lr=5e-4 --set train.task.noise=0.1 "
                             "(repeatable; --show-config lists the paths)")
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help="training steps (the same as --set train.n_steps=STEPS)")
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=None,
                        help="seeds (different integers >= 0); every study reports means and 95%% intervals over them")
    parser.add_argument("--show-config", action="store_true", help="print the study's config (after overrides) and "
                                                                   "its settable paths, and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-llm-weights", action="store_true",
                        help="leave out the real-LLM weight comparison of the training studies (the same as "
                             "--set llm_weights=)")
    parser.add_argument("--llm-max-layers", type=int_at_least(1), default=None,
                        help="read only the first N layers of each LLM in the weight comparison; keeps the "
                             "comparison under --quick too")


def _cli_overrides(args: argparse.Namespace, study) -> list[str]:
    from iclgd_synth.config import paths

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.insert(0, f"train.n_steps={args.steps}")
    llm_flags = args.no_llm_weights or args.llm_max_layers is not None
    if llm_flags and "llm_weights" not in paths(study.config):
        flag = "--no-llm-weights" if args.no_llm_weights else "--llm-max-layers"
        raise ValueError(f"{flag} applies to the training studies with an LLM weight comparison (vonoswald, ...); "
                         f"study {study.name!r} has none")
    if args.no_llm_weights:
        overrides.append("llm_weights=")
    elif args.llm_max_layers is not None:
        overrides.append(f"llm_max_layers={args.llm_max_layers}")
        if args.quick:  # --quick drops the LLM comparison; asking for layers keeps the preset's sources
            overrides.append("llm_weights=" + ",".join(study.config.llm_weights))
    return overrides


def main(args: argparse.Namespace) -> int:
    from iclgd_synth import config as cfg
    from iclgd_synth.studies.registry import describe, get_study, names

    if args.list:
        for name in names():
            print(f"{name:12s} {describe(name)}")
        return 0
    if args.name is None:
        raise ValueError("give a study name: iclgd run NAME (iclgd run --list lists them: " + ", ".join(names()) + ")")
    study = get_study(args.name)
    overrides = _cli_overrides(args, study)
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be different integers, got {args.seeds}")
    if args.show_config:
        config = study.make_config(quick=args.quick, overrides=overrides, seeds=args.seeds)
        print(cfg.dumps(config))
        print("settable paths: " + ", ".join(cfg.paths(config)))
        return 0
    run_study(args.name, quick=args.quick, overrides=overrides, seeds=args.seeds, root=args.root, force=args.force,
              progress=not args.no_progress)  # says where the report is
    return 0
