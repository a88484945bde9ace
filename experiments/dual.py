"""Study 'dual': dual form, ICL-vs-fine-tuning metrics and momentum attention.

Same as `iclgd run dual`; extra arguments are passed on (--quick, --force, --root DIR, --steps N, --seeds ...).
The logic lives in the library (iclgd_synth.studies); this script only forwards the command line.
"""

import sys

from iclgd_synth.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "dual", *sys.argv[1:]]))
