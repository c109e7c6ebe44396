"""`python jobs/train_bars.py --train CSV --valid CSV --test CSV [key=value ...]` (or --data URL):
`tf4ctr train` with the Frappe preset. See `tf4ctr train --help`."""

from tf4ctr_dist.cli import run_job

if __name__ == "__main__":
    run_job("train", defaults=("--config", "frappe_x1"))
