"""Ray Job entrypoint: `python -m jobs.preprocess [--config CFG] [args of vistr preprocess]` (see jobs/_entry.py)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("preprocess"))
