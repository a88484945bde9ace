"""Study 'softmax': softmax attention, 1 and 2 heads, vs GD.

Same as `iclgd run softmax`; extra arguments are passed on (--quick, --force, --root DIR, --steps N, --seeds ...).
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "softmax", *sys.argv[1:]]))
