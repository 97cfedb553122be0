"""Ray Job entrypoint: `python -m jobs.workflow [--config CFG] [args of vistr workflow]` (see jobs/_entry.py)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("workflow"))
