"""Study 'mlp': LSA with an MLP block vs GD.

Same as `iclgd run mlp`; extra arguments are passed on (--quick, --force, --set PATH=VALUE,
--seeds ...); runs go to runs/ at the checkout's root unless --root DIR is given.
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import run_experiment

if __name__ == "__main__":
    sys.exit(run_experiment("mlp", __file__))
