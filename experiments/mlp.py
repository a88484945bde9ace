"""Study 'mlp': LSA with an MLP block vs GD.

Same as `iclgd run mlp`; extra arguments are passed on (--quick, --force, --root DIR, --steps N, --seeds ...).
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "mlp", *sys.argv[1:]]))
