"""Weight statistics of hand-constructed, trained and real LLM weights.

Same as `iclgd weights`; arguments are passed on (e.g. --llm smollm2 --llm minilm --out runs/weights).
"""

import sys

from iclgd_synth.cli import main

if __name__ == "__main__":
    sys.exit(main(["weights", *sys.argv[1:]]))
