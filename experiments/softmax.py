"""Study 'softmax': softmax attention, 1 and 2 heads, vs GD.

Same as `iclgd run softmax`; extra arguments are passed on (--quick, --force, --set PATH=VALUE,
--seeds ...); runs go to runs/ at the checkout's root unless --root DIR is given.
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import run_experiment

if __name__ == "__main__":
    sys.exit(run_experiment("softmax", __file__))
