"""Speed benchmarks on the current backend (same as `iclgd bench`; pass --quick or --json FILE)."""

import sys

from iclgd_synth.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
