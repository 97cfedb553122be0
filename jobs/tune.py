"""Ray Job entrypoint: `python -m jobs.tune [--config CFG] [args of vistr tune]` (see jobs/_entry.py)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("tune"))
