"""The ``iclgd`` command line: thin wrappers over the library.

    iclgd equivalence [--json]            hand-constructed LSA vs explicit GD / GD++ (max abs difference)
    iclgd run NAME [--quick] [--force]    run a study (see ``iclgd run --list``) into runs/NAME-<hash>/
    iclgd bench [--quick] [--no-main-job] speed figures on the current backend (main job with / without LLM)
    iclgd weights --llm smollm2|minilm|PATH --out DIR    weight statistics vs real LLM weights

Each sub-command lives in the module that owns it; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module with ``add_arguments(parser)`` and ``main(args) -> int``
COMMANDS = {
    "equivalence": ("iclgd_synth.equivalence", "hand-constructed LSA weights vs explicit GD and GD++"),
    "run": ("iclgd_synth.studies", "run a named study and write its report"),
    "bench": ("iclgd_synth.bench", "speed benchmarks on the current backend"),
    "weights": ("iclgd_synth.weights.command", "compare hand-constructed and trained weights with real LLM weights"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iclgd", description="iclgd_synth: is in-context learning gradient descent?")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
