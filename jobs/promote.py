"""Ray Job entrypoint: `python -m jobs.promote [--config CFG] [args of vistr promote]` (see jobs/_entry.py)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("promote"))
