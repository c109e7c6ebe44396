"""Entry point: `python jobs/retrain.py --from RUN_DIR --data NEW_DATASET` (see --help)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tf4ctr_dist.entry import retrain, run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(retrain)
