"""`python jobs/retrain.py --from RUN (--data URL | --logs DIR --spec FILE)`: `tf4ctr retrain`."""

from tf4ctr_dist.cli import run_job

if __name__ == "__main__":
    run_job("retrain")
