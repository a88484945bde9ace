"""Study 'recurrent': recurrent 2-layer LSA vs GD and GD++.

Same as `iclgd run recurrent`; extra arguments are passed on (--quick, --force, --root DIR, --steps N, --seeds ...).
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "recurrent", *sys.argv[1:]]))
