"""Study 'vonoswald': 1-layer LSA vs one step of tuned GD (the main job).

Same as `iclgd run vonoswald`; extra arguments are passed on (--quick, --force, --root DIR, --steps N, --seeds ...).
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "vonoswald", *sys.argv[1:]]))
