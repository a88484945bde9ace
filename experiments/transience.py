"""Study 'transience': transient in-context learning on nested finite task pools, M x weight decay x seeds.

Same as `iclgd run transience`; extra arguments are passed on (--quick, --force, --set PATH=VALUE, --seeds ...);
runs go to runs/ at the checkout's root unless --root DIR is given. `--paper` adds the papers' preset (d = 8,
N = 16, noise variance 0.25, 8 layers of width 128, 500k steps of 256 tasks, M = 2^0 .. 2^15) as --set overrides,
for accelerators. The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import run_experiment

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--paper" in argv:
        from iclgd_synth.studies.transience import PAPER_OVERRIDES

        argv = [a for a in argv if a != "--paper"]
        argv = [x for o in PAPER_OVERRIDES for x in ("--set", o)] + argv
    sys.exit(run_experiment("transience", __file__, argv))
