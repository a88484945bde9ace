"""``iclgd report RUN_DIR``: re-render a finished run's report.md and figures from its metrics.json."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="+", help="run directories written by 'iclgd run NAME'")


def main(args: argparse.Namespace) -> int:
    from iclgd_synth.studies.protocol import render_run

    for run_dir in args.run_dir:
        print(render_run(run_dir))
    return 0
