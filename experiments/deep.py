"""Study 'deep': deep 5-layer LSA vs GD and GD++.

Same as `iclgd run deep`; extra arguments are passed on (--quick, --force, --root DIR, --steps N, --seeds ...).
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "deep", *sys.argv[1:]]))
