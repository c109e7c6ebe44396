"""Entry point: `python jobs/benchmark.py --help` (the logic lives in tf4ctr_dist/bench.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tf4ctr_dist.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
