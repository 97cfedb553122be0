"""Ray Job entrypoint: `python -m jobs.evaluate [--config CFG] [args of vistr evaluate]` (see jobs/_entry.py)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("evaluate"))
