"""Entry point: `python jobs/train_bars.py --help` (also: `ray job submit -- python jobs/train_bars.py ...`)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tf4ctr_dist.entry import train_bars, run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(train_bars)
