"""Entry point: `python jobs/criteo_full.py --help` (also: `ray job submit -- python jobs/criteo_full.py ...`)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tf4ctr_dist.entry import criteo_full, run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(criteo_full)
