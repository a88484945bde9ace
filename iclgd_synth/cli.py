"""The ``iclgd`` command line: thin wrappers over the library.

    iclgd run NAME [--quick] [--set PATH=VALUE] [--seeds S ...]   run a study into runs/NAME-<hash>/
    iclgd report RUN_DIR                  re-render a finished run's report and figures (nothing recomputed)
    iclgd equivalence [--json]            hand-constructed LSA vs explicit GD / GD++ (max abs difference)
    iclgd sweep NAME --grid PATH=V1,V2 [--seeds S ...] [--out DIR]   grid x seeds, sharded over every device
    iclgd bench [--quick] [--no-main-job] [--sweep]   speed figures on the current backend
    iclgd weights --llm smollm2|minilm|PATH --out DIR    weight statistics vs real LLM weights

Each sub-command lives in the module that owns it; this file only parses arguments, and imports only the module of
the command that is run (``iclgd --help`` imports no JAX). Ordinary mistakes (a bad value, a missing file) end with
one ``iclgd: error: ...`` line and exit status 2; Ctrl-C ends with a line saying how to resume (status 130).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

# sub-command -> module with ``add_arguments(parser)`` and ``main(args) -> int``
COMMANDS = {
    "run": ("iclgd_synth.studies", "run a named study and write its report"),
    "report": ("iclgd_synth.reports.command", "re-render the report of a finished run from its metrics"),
    "equivalence": ("iclgd_synth.equivalence", "hand-constructed LSA weights vs explicit GD and GD++"),
    "sweep": ("iclgd_synth.sweep", "a study x a grid of overrides x seeds, sharded over every device"),
    "bench": ("iclgd_synth.bench", "speed benchmarks on the current backend"),
    "weights": ("iclgd_synth.weights.command", "compare hand-constructed and trained weights with real LLM weights"),
}

#: Commands that run with the persistent compilation cache on (:mod:`iclgd_synth.compile_cache`): a second run
#: loads its compiled programs instead of compiling them. ``bench`` is left out so its figures stay comparable.
CACHED_COMMANDS = ("run", "report", "equivalence", "sweep", "weights")

#: Errors that are the user's to fix: reported in one line, no traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError,
               FileExistsError, MemoryError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="iclgd", description="iclgd_synth: is in-context learning gradient descent?")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    """Run one command; returns its exit status. ``whole_process``: this call owns the process (the ``iclgd``
    console script, ``python -m iclgd_synth.cli``, an ``experiments/`` script), so it may also split the CPU into one
    JAX host device per core (:mod:`iclgd_synth.host_devices`) and draw figures in a worker process
    (:mod:`iclgd_synth.background`); called from other code (tests, notebooks) it changes neither."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if whole_process:
        try:
            from iclgd_synth import host_devices

            host_devices.one_per_core()  # before JAX starts its backend
        except ValueError as e:
            print(f"iclgd {args.command}: error: {e}", file=sys.stderr)
            return 2
    if args.command in CACHED_COMMANDS:
        from iclgd_synth import compile_cache

        compile_cache.enable()  # this process only; ICLGD_JAX_CACHE=0 turns it off
    try:
        from iclgd_synth import background

        # The process's __main__ is ours: figures may be drawn by a worker process.
        with background.enabled() if whole_process else contextlib.nullcontext():
            return int(importlib.import_module(args._module).main(args) or 0)
    except KeyboardInterrupt:
        print("\niclgd: interrupted. Finished results and training checkpoints are kept; run the same command again "
              "to resume.", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"iclgd {args.command}: error: {e}", file=sys.stderr)
        return 2


def entry() -> int:
    """The ``iclgd`` console script: :func:`main` owning the process."""
    return main(whole_process=True)


def run_experiment(name: str, script: str, argv: list[str] | None = None) -> int:
    """``iclgd run NAME ARGV`` for the script ``experiments/NAME.py``: run directories go to ``runs/`` beside the
    ``experiments/`` folder (the checkout's root) unless ``--root`` is given, so a script started from inside
    ``experiments/`` finds the same finished runs as ``iclgd run`` from the root. Started as a program (the script is
    the process's ``__main__``), it owns the process as the ``iclgd`` command does."""
    import os
    from pathlib import Path

    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(a == "--root" or a.startswith("--root=") for a in argv):
        argv += ["--root", str(Path(script).resolve().parent.parent / "runs")]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    owns = main_file is not None and os.path.abspath(main_file) == os.path.abspath(script)
    return main(["run", name, *argv], whole_process=owns)


if __name__ == "__main__":
    sys.exit(main(whole_process=True))
