"""`tf4ctr sweep` on a local Ray cluster: the trials are real (tiny) training runs launched by
Ray Tune; the results table matches the runs' own result.json files; a sweep whose driver is
killed resumes without training its finished trials again."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration._ray_local import REPO, process_tree

TINY = ["workers=1", "epochs=1", "batch_size=256", "eval_batch_size=1024", "log_every=0", "embedding_dim=8",
        "easy_hidden_units=[16]", "hard_hidden_units=[16,16]", "tensorboard=false"]


def _dataset(tmp_path: Path) -> str:
    from data_tools.synthetic import generate_synthetic

    url = str(tmp_path / "data")
    generate_synthetic(url, rows=2_000, fields=6, scale_vocab=1.0, seed=4, row_group_rows=500)
    return url


def _spec(tmp_path: Path, data: str, grid: dict, seeds: list[int], baseline: dict | None = None) -> str:
    import yaml

    spec = {"name": "tiny", "base": "demo", "data": data, "overrides": TINY, "grid": grid, "seeds": seeds}
    if baseline:
        spec["baseline"] = baseline
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _cmd(spec: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "tf4ctr_dist", "sweep", spec, "--out", str(out)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def _starts(run_dir: Path) -> int:
    d = run_dir / "sweep-starts"
    return len(list(d.iterdir())) if d.exists() else 0


def test_tiny_sweep_writes_the_table(tmp_path):
    pytest.importorskip("ray.tune")
    from tf4ctr_dist.studies.stats import compare

    spec = _spec(tmp_path, _dataset(tmp_path), {"dfm": ["sum", "wsf"]}, [1, 2], baseline={"dfm": "sum"})
    out = tmp_path / "sweep"
    t0 = time.monotonic()
    proc = subprocess.run(_cmd(spec, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    print(f"\nsweep of 4 trials: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = _rows(out)
    assert [(r["dfm"], r["seed"]) for r in rows] == [("sum", "1"), ("sum", "2"), ("wsf", "1"), ("wsf", "2")]
    for r in rows:
        assert r["status"] == "finished"
        run = Path(r["run_dir"])
        assert run == out / "runs" / f"dfm-{r['dfm']}" / f"seed-{r['seed']}"
        result = json.loads((run / "result.json").read_text())
        # Each trial trained its own cell and seed...
        assert result["config"]["model"]["dfm"] == r["dfm"]
        assert result["config"]["train"]["seed"] == int(r["seed"])
        # ...and the table holds that run's numbers.
        assert float(r["test_AUC"]) == pytest.approx(result["test"]["AUC"], abs=1e-12)
        assert float(r["valid_logloss"]) == pytest.approx(result["valid"]["logloss"], abs=1e-12)
        assert r["best_epoch"] == "1" and r["epochs"] == "1"
        assert _starts(run) == 1
    # Different seeds give different runs.
    assert rows[0]["test_AUC"] != rows[1]["test_AUC"]

    md = (out / "results.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| dfm=")}
    assert set(lines) == {"dfm=sum", "dfm=wsf"}
    assert "baseline" in lines["dfm=sum"]
    sums = [float(r["test_AUC"]) for r in rows if r["dfm"] == "sum"]
    wsfs = [float(r["test_AUC"]) for r in rows if r["dfm"] == "wsf"]
    mean = sum(wsfs) / 2
    std = abs(wsfs[0] - wsfs[1]) / 2 ** 0.5
    assert f"{mean:.6f} +- {std:.6f}" in lines["dfm=wsf"]
    p = compare({1: wsfs[0], 2: wsfs[1]}, {1: sums[0], 2: sums[1]}).p
    assert f"{p:.3g} (paired)" in lines["dfm=wsf"]



def test_a_grid_over_the_worker_count_runs_every_trial(tmp_path):
    """The dev cluster is sized for the largest trial, not the first: before that, the 2-worker
    trial below waited forever for a second worker on a 2-CPU machine."""
    pytest.importorskip("ray.tune")
    spec = _spec(tmp_path, _dataset(tmp_path), {"cluster.workers": [1, 2]}, [1])
    out = tmp_path / "sweep"
    proc = subprocess.run(_cmd(spec, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "; 2 + 1 per trial)" in proc.stdout  # sized for the 2-worker trial
    rows = _rows(out)
    assert [(r["cluster.workers"], r["status"]) for r in rows] == [("1", "finished"), ("2", "finished")]
    for r in rows:
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert result["config"]["cluster"]["workers"] == int(r["cluster.workers"])

def test_a_mistyped_key_fails_before_ray_starts(tmp_path):
    spec = _spec(tmp_path, str(tmp_path / "nodata"), {"dfn": ["sum", "wsf"]}, [1])
    t0 = time.monotonic()
    proc = subprocess.run(_cmd(spec, tmp_path / "sweep"), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "dfn" in proc.stderr and "did you mean 'dfm'" in proc.stderr
    assert time.monotonic() - t0 < 30  # no Ray cluster was started
    assert not (tmp_path / "sweep").exists()


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    pytest.importorskip("ray.tune")
    spec = _spec(tmp_path, _dataset(tmp_path), {"dfm": ["sum"]}, [1, 2, 3])
    out = tmp_path / "sweep"
    runs = [out / "runs" / "dfm-sum" / f"seed-{s}" for s in (1, 2, 3)]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cmd(spec, out), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while sum((r / "result.json").exists() for r in runs) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "two trials did not finish in time"
            time.sleep(0.5)
    finally:
        # The whole job dies at once: the driver, its Ray cluster and the trial in flight.
        tree = process_tree([first.pid])
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.wait(timeout=60)
        log.close()
    finished = [r for r in runs if (r / "result.json").exists()]
    assert len(finished) >= 2 and not (out / "results.csv").exists()
    stamps = {r: (r / "result.json").stat().st_mtime_ns for r in finished}

    second = subprocess.run(_cmd(spec, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the sweep" in second.stdout
    rows = _rows(out)
    assert [r["seed"] for r in rows] == ["1", "2", "3"] and all(r["status"] == "finished" for r in rows)
    for r in finished:  # trained once, result untouched
        assert _starts(r) == 1
        assert (r / "result.json").stat().st_mtime_ns == stamps[r]
    unfinished = [r for r in runs if r not in finished]
    for r in unfinished:  # trained on resume (twice if the kill caught it mid-run)
        assert 1 <= _starts(r) <= 2


def test_median_stopping_ends_a_hopeless_trial_early(tmp_path):
    """`scheduler: median`: with two sound cells done, a cell that cannot learn (learning rates of
    1e-9) falls below their median after its grace epoch and Tune stops it; the table says so."""
    pytest.importorskip("ray.tune")
    import yaml
    from data_tools.synthetic import generate_synthetic

    data = str(tmp_path / "data")
    generate_synthetic(data, rows=20_000, fields=6, scale_vocab=0.05, seed=4, row_group_rows=2_000)
    overrides = [o for o in TINY if not o.startswith("epochs=")] + ["epochs=4", "batch_size=512"]
    spec = {"name": "median", "base": "demo", "data": data, "overrides": overrides, "seeds": [1],
            "variants": {"a": {"dfm": "sum"}, "b": {"dfm": "wsf"},
                         "hopeless": {"train.lr": 1e-9, "train.embedding_lr": 1e-9}},
            "scheduler": "median", "grace_epochs": 1}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    proc = subprocess.run(_cmd(str(path), out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r for r in _rows(out)}
    assert rows["a"]["status"] == rows["b"]["status"] == "finished"
    assert rows["a"]["epochs"] == rows["b"]["epochs"] == "4"
    assert rows["hopeless"]["status"] == "stopped", rows["hopeless"]
    assert 1 <= int(rows["hopeless"]["epochs"]) < 4
    assert float(rows["hopeless"]["valid_AUC"]) < min(float(rows["a"]["valid_AUC"]), float(rows["b"]["valid_AUC"]))
    assert not (Path(rows["hopeless"]["run_dir"]) / "result.json").exists()
