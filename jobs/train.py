"""Ray Job entrypoint: `python -m jobs.train [--config CFG] [args of vistr train]` (see jobs/_entry.py)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("train"))
