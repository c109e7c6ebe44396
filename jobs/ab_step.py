"""A/B timing of training-step variants, alternating in one process: `python jobs/ab_step.py --help`
(the logic lives in tf4ctr_dist/bench.py: run_ab, AB_VARIANTS)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tf4ctr_dist.bench import run_ab  # noqa: E402

if __name__ == "__main__":
    run_ab(sys.argv[1:])
