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
    monkeypatch.setattr(train_cli, "launch", lambda cfg, checked=None: launched.append(cfg))
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


def test_a_setting_the_model_cannot_use_is_refused_on_the_driver(tmp_path, dataset):
    """train.sync_batch_norm on a model without BatchNorm: the driver builds the model on meta
    (from the manifest) and refuses, before Ray; the same setting on a model with BatchNorm gets
    through to the launch."""
    proc, seconds = _train(tmp_path, "--data", dataset, "--workers", "2", "batch_size=512",
                           "sync_batch_norm=true", "batch_norm=false")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.sync_batch_norm=true, but this model has no BatchNorm layer" in lines[0]
    assert "NO_RAY" in proc.stdout
    assert not (tmp_path / "run").exists()
    assert seconds < 30


def test_the_launch_checks_the_dataset_and_the_model_too(tmp_path, dataset, monkeypatch):
    """`launch` (every entry point's last step: train, retrain, jobs/) repeats the driver's checks
    on the prepared dataset it is about to hand to the workers."""
    import tf4ctr_dist.train.launch as train_launch
    from tf4ctr_dist.cli.train import launch
    from tf4ctr_dist.config import ConfigError, RunConfig

    monkeypatch.setattr(train_launch, "run_training", lambda cfg: pytest.fail("reached the workers"))
    cfg = RunConfig().with_overrides({"data.url": dataset, "out": str(tmp_path / "run"), "cluster.workers": 2,
                                      "train.batch_size": 512, "train.sync_batch_norm": True,
                                      "model.batch_norm": False})
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        launch(cfg)
    with pytest.raises(ConfigError, match=r"has no split\(s\) validation"):
        launch(cfg.with_overrides({"model.batch_norm": True, "data.valid_split": "validation"}))


def test_options_and_settings_in_any_order_and_mistakes_named_by_the_command(tmp_path):
    """Every command's positionals, options and key=value settings may be intermixed (the sweep
    file first, then --out, then settings); an unknown option is reported by the command."""
    from tf4ctr_dist.cli import main

    (tmp_path / "t.yaml").write_text("grid: {alpha: [0.25]}\nseeds: [1]\n")
    proc = subprocess.run([sys.executable, "-c", _PROBE, "sweep", "t.yaml", "--out", "sw", "epochs=1",
                           "--data", "/nonexistent/dataset", "batch_size=512"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # parsed whole: the sweep got as far as the dataset check
    assert proc.returncode == 1 and "no manifest.json at /nonexistent/dataset" in proc.stderr, proc.stderr
    assert "unrecognized" not in proc.stderr
    proc, _ = _train(tmp_path, "--workers", "2", "epochs=1", "batch_size=512", "--bogus")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "tf4ctr train: error: unrecognized arguments: --bogus", proc.stderr
    assert main(["train", "--workers", "1", "epochs=0", "--seed", "3", "--out", str(tmp_path / "r"),
                 "--config", "no_such_preset"]) == 2  # a settings word between options is not swallowed


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "model:\n  ssem: [ser\n", "bad.yaml: not valid YAML (line 3, column 1)"),
    ("bad.json", '{"model": {"ssem": "ser",}}', "bad.json: not valid JSON (line 1, column 26)"),
    ("list.yaml", "- a\n- b\n", "list.yaml: expected a mapping (key: value lines) at the top level, got a list"),
    ("evil.yaml", 'model: !!python/object/apply:os.system ["touch PWNED"]\n', "could not determine a constructor"),
])
def test_a_broken_config_file_is_one_line_naming_the_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    for argv in (["train", "--config", name], ["sweep", name, "--out", "sw"]):
        proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tf4ctr {argv[0]}: error: ") and message in lines[0], lines
    assert not (tmp_path / "PWNED").exists()


def test_credentials_in_a_url_never_reach_a_message(tmp_path):
    for argv in (["check", "s3://AKIAKEY:SeCrEt@bucket/ds"], ["retrain", "--from", "s3://AKIAKEY:SeCrEt@bucket/run",
                                                             "--data", "ds"]):
        proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.returncode in (1, 2) and "carries credentials" in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"tf4ctr {argv[0]}: error: ")
        assert "SeCrEt" not in proc.stdout + proc.stderr and "AKIAKEY" not in proc.stdout + proc.stderr


def test_a_config_or_setting_that_names_the_dataset_is_used(tmp_path, dataset, monkeypatch):
    """`--config RUN/config.json` (a run's own configuration) or `data.url=...` without --data
    trains on that dataset, not on the synthetic demo data."""
    import json

    import tf4ctr_dist.cli.train as train_cli
    from tf4ctr_dist.cli import main
    from tf4ctr_dist.config import RunConfig

    launched = []
    monkeypatch.setattr(train_cli, "launch", lambda cfg, checked=None: launched.append(cfg))
    saved = RunConfig().with_overrides({"data.url": dataset, "cluster.workers": 2, "train.batch_size": 512,
                                        "name": "earlier"})
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    assert main(["train", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "a"), "epochs=0"]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--workers", "2", f"data.url={dataset}", "batch_size=512",
                 "epochs=0"]) == 0
    first, second = launched
    assert first.data.url == dataset and first.train.batch_size == 512
    assert second.data.url == dataset and second.name == "train"  # the prepared-data preset, not the demo
