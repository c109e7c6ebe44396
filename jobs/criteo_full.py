"""`ray job submit -- python jobs/criteo_full.py [--data URL] [key=value ...]`: `tf4ctr train` with
the Criteo presets (the synthetic demo without --data). See `tf4ctr train --help`."""

from tf4ctr_dist.cli import run_job

if __name__ == "__main__":
    run_job("train")
