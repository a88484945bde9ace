"""Study 'vonoswald': 1-layer LSA vs one step of tuned GD (the main job).

Same as `iclgd run vonoswald`; extra arguments are passed on (--quick, --force, --set PATH=VALUE,
--seeds ...); runs go to runs/ at the checkout's root unless --root DIR is given.
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import run_experiment

if __name__ == "__main__":
    sys.exit(run_experiment("vonoswald", __file__))
