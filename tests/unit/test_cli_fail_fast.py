"""Mistakes fail on the driver in seconds, with one clear line, before Ray is even imported.

Each case runs `tf4ctr train` in a fresh interpreter (as a user would) and reports whether the
`ray` module was ever imported: if it was not, no Ray cluster and no worker can have started.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import sys
from tf4ctr_dist.cli import main
code = main(sys.argv[1:])
print("RAY_IMPORTED" if "ray" in sys.modules else "NO_RAY", "TORCHREC_IMPORTED" if "torchrec" in sys.modules else "")
sys.exit(code)
"""


def _train(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PROBE, "train", "--out", str(tmp_path / "run"), *argv],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from data_tools.synthetic import generate_synthetic

    url = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate_synthetic(url, rows=2_000, fields=4, scale_vocab=0.01, seed=3, row_group_rows=500)
    return url


CASES = {
    "missing dataset": (["--data", "/nonexistent/dataset"], 1, "no manifest.json at /nonexistent/dataset"),
    "negative batch": (["batch_size=-5"], 2, "train.batch_size=-5: expected a positive global batch size"),
    "dropout above 1": (["net_dropout=1.5"], 2, "model.net_dropout=1.5: expected a dropout rate in [0, 1)"),
    "no workers": (["workers=0"], 2, "cluster.workers=0: expected a positive number of workers"),
    "mistyped key": (["net_dropuot=0.1"], 2, "unknown config key 'net_dropuot'; did you mean 'net_dropout'? "
                                              "model has: batch_norm,"),
    "unknown monitor": (["monitor=[AUCC]"], 2, "train.monitor=['AUCC']: expected a non-empty list of AUC, gAUC"),
    "uneven batch": (["--workers", "3"], 2, "batch_size=4096 (global) must divide evenly across 3 workers"),
    "row-wise on CPU": (["sharding=row_wise"], 2, "row_wise sharding needs GPUs"),
    "no such preset": (["--config", "criteo_x5"], 2, "--config 'criteo_x5': no such preset; presets: "),
    "half the CSVs": (["--train", "a.csv"], 2, "CSV input needs all three of --train, --valid and --test"),
    "unknown inference path": (["inference=fast"], 2, "model.inference: 'fast' is not one of 'fused', 'eager'"),
    "unknown inference precision": (["inference_precision=fp16"], 2,
                                    "model.inference_precision: 'fp16' is not one of 'auto', 'fp32', 'bf16'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_on_the_driver_in_seconds(tmp_path, case):
    argv, code, message = CASES[case]
    proc, seconds = _train(tmp_path, *argv)
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tf4ctr train: error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "NO_RAY" in proc.stdout and "TORCHREC_IMPORTED" not in proc.stdout, proc.stdout
    assert not (tmp_path / "run").exists(), "nothing is written for a refused run"
    assert seconds < 15, f"{case}: {seconds:.1f}s from command to error"
    print(f"{case}: {seconds:.2f}s")


def test_a_split_the_config_names_must_exist(tmp_path, dataset):
    proc, _ = _train(tmp_path, "--data", dataset, "data.valid_split=validation")
    assert proc.returncode == 2 and "has no split(s) validation (it has: train, valid, test)" in proc.stderr
    assert "NO_RAY" in proc.stdout


def test_a_good_run_gets_past_the_checks(tmp_path, dataset, monkeypatch):
    """The same checks let a valid run through to the launch (stopped there by the test)."""
    import tf4ctr_dist.cli.train as train_cli
    from tf4ctr_dist.cli import main

    launched = []
    monkeypatch.setattr(train_cli, "launch", lambda cfg: launched.append(cfg))
    assert main(["train", "--data", dataset, "--out", str(tmp_path / "run"), "--workers", "2", "batch_size=512",
                 "epochs=0"]) == 0
    (cfg,) = launched
    assert cfg.train.batch_size == 512 and cfg.train.epochs == 0 and cfg.data.url == dataset


# The serving commands' own options, refused the same way (argparse: usage, then one error line).
SERVING_CASES = {
    "export block of 0 MiB": (["export", "--run", "RUN", "--out", "m.tf4ctr", "--block-mb", "0"],
                              "tf4ctr export: error: --block-mb must be > 0, got 0.0"),
    "predict precision fp16": (["predict", "--model", "m.tf4ctr", "--data", "d.csv", "--out", "o.parquet",
                                "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    "predict on 0 workers": (["predict", "--model", "m.tf4ctr", "--data", "d.csv", "--out", "o.parquet",
                              "--workers", "0"], "tf4ctr predict: error: --workers must be >= 1, got 0"),
    "serve precision fp16": (["serve", "m.tf4ctr", "--precision", "fp16"], "argument --precision: invalid choice"),
}


@pytest.mark.parametrize("case", list(SERVING_CASES))
def test_serving_options_refused_in_seconds(tmp_path, case):
    argv, message = SERVING_CASES[case]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written"
    assert time.perf_counter() - t0 < 15
