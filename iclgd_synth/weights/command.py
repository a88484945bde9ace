"""``iclgd weights``: compare hand-constructed and trained attention weights with real LLM weights.

    iclgd weights --llm smollm2 --llm minilm --out runs/weights
    iclgd weights --llm /path/to/hf-folder --n-heads 32 --no-trained --out runs/weights-llama

Writes weight_stats.json, report.md and PNG figures to --out (see :func:`iclgd_synth.weights.report.weights_report`)
and prints the summary table. This module imports nothing optional at import time: the CLI dispatcher loads it even
when the ``weights`` / ``llm`` extras are not installed.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", action="append", metavar="NAME|PATH",
                        help="real LLM weights: smollm2, minilm, a .gguf / .safetensors file or a Hugging Face folder "
                             "(repeatable; default: smollm2 and minilm)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the report")
    parser.add_argument("--max-layers", type=int, default=None, metavar="K",
                        help="read only the first K layers of each LLM (default: all)")
    parser.add_argument("--n-heads", type=int, default=None,
                        help="number of query heads, for checkpoints without config.json / metadata")
    parser.add_argument("--n-kv-heads", type=int, default=None,
                        help="number of key/value heads (grouped-query attention), for checkpoints without config")
    trained = parser.add_mutually_exclusive_group()
    trained.add_argument("--no-trained", action="store_true", help="leave out the model trained on the ICL objective")
    trained.add_argument("--trained-params", metavar="FILE",
                         help="an .npz with w_q, w_k, w_v, w_p arrays (or written by iclgd_synth.train.save_params) "
                              "instead of training the quick model")
    parser.add_argument("--trained-steps", type=int, default=2000,
                        help="training steps of the quick 1-layer model (default 2000, ~20 s on 2 CPU cores)")
    parser.add_argument("--hand-dims", type=int, nargs="+", default=[11, 576, 4096], metavar="D",
                        help="token sizes D of the hand-constructed GD and GD++ weights (default: 11 576 4096)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from iclgd_synth.weights.report import weights_report
    from iclgd_synth.weights.sources import HandSpec, load_trained_params, quick_trained

    t0 = time.perf_counter()
    llms = args.llm or ["smollm2", "minilm"]
    try:
        hand = [HandSpec(c, d) for d in args.hand_dims for c in ("gd", "gdpp")]
        if args.no_trained:
            trained, note = None, "left out (--no-trained)"
        elif args.trained_params:
            trained, note = load_trained_params(args.trained_params), f"loaded from {args.trained_params}"
        else:
            if not args.quiet:
                print(f"training the quick 1-layer LSA ({args.trained_steps} steps)...", file=sys.stderr)
            trained, note = quick_trained(steps=args.trained_steps)
        result = weights_report(llms, args.out, trained, trained_note=note, hand=hand, max_layers=args.max_layers,
                                n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, figures=not args.no_figures,
                                progress=not args.quiet)
    except (FileNotFoundError, ModuleNotFoundError, ValueError, TypeError) as e:
        print(f"iclgd weights: error: {e}", file=sys.stderr)
        return 2
    print(result["summary_markdown"])
    print(f"\ntrained model: {result['trained']}")
    print(f"wrote {', '.join(sorted(result['files'].values()))}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
