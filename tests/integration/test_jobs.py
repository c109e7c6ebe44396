"""The job entry points as users run them: a subprocess, a local Ray cluster, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.data_helpers import write_csv

REPO = Path(__file__).resolve().parents[2]


def _bars_csvs(tmp: Path, rows: int = 3000) -> tuple[str, str, str]:
    header = "label,user,item,hour"
    def make(n: int, offset: int) -> list[str]:
        out = []
        for i in range(offset, offset + n):
            user, item, hour = i % 97, (i * 7) % 211, i % 24
            label = int((user % 3 == 0) ^ (item % 5 == 0) ^ (hour < 6))
            out.append(f"{label},u{user},i{item},h{hour}")
        return out
    return (write_csv(tmp / "train.csv", header, make(rows, 0)),
            write_csv(tmp / "valid.csv", header, make(rows // 4, rows)),
            write_csv(tmp / "test.csv", header, make(rows // 4, rows + rows // 4)))


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_train_bars_end_to_end_from_csv(tmp_path):
    train, valid, test = _bars_csvs(tmp_path)
    out = tmp_path / "run"
    proc = _run(["jobs/train_bars.py", "--train", train, "--valid", valid, "--test", test,
                 "--group-col", "user", "--workers", "2", "--seed", "7", "--out", str(out),
                 "batch_size=256", "eval_batch_size=1024", "epochs=3", "easy_hidden_units=[32]",
                 "hard_hidden_units=[32,32]", "emb_reg=0.01", "log_every=0"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert set(result["valid"]) >= {"AUC", "gAUC", "logloss"} and set(result["test"]) >= {"AUC", "gAUC", "logloss"}
    assert result["epochs"] >= 1 and result["config"]["loss"]["alpha"] == 0.25
    # The labels are a deterministic function of the ids: the model must learn it.
    assert result["test"]["AUC"] > 0.75
    assert "test" in proc.stdout and "AUC=" in proc.stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result["epochs"]
    # The same command again finds the finished run's checkpoints: no training, same result.
    again = _run(["jobs/train_bars.py", "--train", train, "--valid", valid, "--test", test,
                  "--group-col", "user", "--workers", "2", "--seed", "7", "--out", str(out),
                  "batch_size=256", "eval_batch_size=1024", "epochs=3", "easy_hidden_units=[32]",
                  "hard_hidden_units=[32,32]", "emb_reg=0.01", "log_every=0"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "finished run" in again.stdout
    assert "epoch 1:" not in again.stdout
    assert json.loads((out / "result.json").read_text())["test"] == result["test"]


def test_train_bars_refuses_a_missing_column_and_writes_nothing(tmp_path):
    train, valid, test = _bars_csvs(tmp_path, rows=200)
    write_csv(tmp_path / "bad_valid.csv", "label,user,item", ["1,u1,i1", "0,u2,i2"])
    out = tmp_path / "run"
    proc = _run(["jobs/train_bars.py", "--train", train, "--valid", str(tmp_path / "bad_valid.csv"),
                 "--test", test, "--out", str(out)], timeout=120)
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("tf4ctr train: error:") and "bad_valid.csv" in error and "hour" in error
    assert "Traceback" not in proc.stderr
    assert not (out / "dataset" / "manifest.json").exists()
    assert not (out / "result.json").exists()


def test_unknown_override_is_an_error(tmp_path):
    proc = _run(["jobs/criteo_full.py", "--data", str(tmp_path), "alpah=0.3"], timeout=60)
    assert proc.returncode == 2
    assert "alpah" in proc.stderr


def test_impossible_placement_is_refused_before_any_worker_starts(tmp_path):
    proc = _run(["jobs/criteo_full.py", "--data", str(tmp_path), "sharding=table_wise",
                 "embedding_optimizer=adam"], timeout=120)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("tf4ctr train: error:") and "fused CPU kernels support only" in error
    assert "local Ray cluster" not in proc.stdout  # refused in the driver, no cluster started


def test_retrain_warm_starts_on_new_partitions(tmp_path):
    import yaml

    from data_tools.daily_logs import generate_daily_logs, spec_for
    from data_tools.parquet_logs import prepare_parquet_logs

    logs = tmp_path / "logs"
    dates = generate_daily_logs(str(logs), days=5, rows_per_day=3000, fields=3, head=300, seed=1)
    spec = spec_for(3, [dates[0]], [dates[1]], [dates[2]], buckets=2000)
    prepare_parquet_logs(str(logs), str(tmp_path / "ds-old"), **spec)
    small = ["batch_size=512", "eval_batch_size=2048", "epochs=2", "easy_hidden_units=[32]",
             "hard_hidden_units=[32,32]", "embedding_dim=8", "log_every=0"]
    first = _run(["jobs/criteo_full.py", "--config", "demo", "--data", str(tmp_path / "ds-old"),
                  "--out", str(tmp_path / "old"), *small])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    new = tmp_path / "new"
    proc = _run(["jobs/retrain.py", "--from", str(tmp_path / "old"), "--logs", str(logs), "--spec", str(spec_path),
                 "--train-dates", f"{dates[1]},{dates[2]}", "--valid-dates", dates[3], "--test-dates", dates[4],
                 "--out", str(new), "epochs=1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warm start: weights from" in proc.stdout
    result = json.loads((new / "result.json").read_text())
    assert result["config"]["checkpoint"]["warm_start"] == str(tmp_path / "old")
    assert result["epochs"] == 1 and result["test"]["AUC"] > 0.55
    manifest = json.loads((new / "dataset" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 6000  # the two new days only
    # A table size that differs from the source run's is refused with the reason.
    bad = _run(["jobs/retrain.py", "--from", str(tmp_path / "old"), "--logs", str(logs), "--spec", str(spec_path),
                "--train-dates", dates[1], "--valid-dates", dates[3], "--test-dates", dates[4], "--out", str(tmp_path / "bad"),
                "embedding_dim=16"])
    # Ray echoes the worker's traceback; the job's own last line is the clear reason.
    assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]  # a configuration mistake
    ours = [line for line in bad.stderr.splitlines() if line.startswith("tf4ctr retrain: error:")]
    assert len(ours) == 1 and "checkpoint.warm_start:" in ours[0] and "does not fit this model" in ours[0], bad.stderr[-3000:]


def test_benchmark_job_runs_end_to_end_and_writes_the_report(tmp_path):
    """`python -m benchmarks` on a tiny dataset: every training path it times (ours, the reference,
    the interleaved one-process comparison) and the inference comparison run and land in the JSON
    (figures are not checked: speed is measured by the benchmark itself, not asserted)."""
    out = tmp_path / "bench.json"
    r = _run(["-m", "benchmarks", "--rows-small", "20000", "--batch", "512", "--only",
              "train_1w,reference,interleaved,inference", "--steps", "4", "--windows", "2", "--warmup", "1",
              "--interleaved-rounds", "2", "--skip-s3", "--skip-rss", "--eval-batches", "0",
              "--eval-batch", "1024", "--inference-batches", "1",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio ours 1w / reference, interleaved" in r.stdout
    report = json.loads(out.read_text())
    for key in ("ratio_vs_reference", "ratio_vs_reference_interleaved", "ratio_vs_reference_bf16_interleaved",
                "roofline_share", "ingest_vs_step", "rss_10m_over_1m", "targets", "machine", "config"):
        assert key in report
    assert report["ratio_vs_reference"] > 0 and report["ratio_vs_reference_interleaved"] > 0
    rounds = report["raw"]["interleaved"]["rounds"]
    assert set(rounds) == {"reference", "default", "default_bf16", "eager_bn"} and all(len(v) == 2 for v in rounds.values())
    assert report["ratio_vs_reference_eager_bn_interleaved"] > 0
    one = report["raw"]["train"]["table_wise_1w"]
    assert one["table_kernel"] is True  # fused row-wise Adagrad on CPU: the compiled table kernel...
    assert one["concurrent_table_backward"] is False  # ...which has the threads itself
    assert one["cpu_kernel"] is True  # fp32 on CPU: the compiled BatchNorm/ReLU/dropout kernel
    assert report["ingest_vs_step"] is None  # ingest not run: reported as unmeasured, not as 0
    inference = report["raw"]["inference"]
    assert set(inference["rounds"]) == {"reference", "default", "bf16", "eager", "scorer"}
    assert all(len(v) == 2 for v in inference["rounds"].values())
    assert report["inference_vs_reference"] > 0 and report["inference_roofline_share"] > 0
    # the fused path is the eager one up to float rounding; bf16 is not
    assert inference["max_abs_diff_vs_eager"]["default"] < 1e-5 < inference["max_abs_diff_vs_eager"]["bf16"]
    # the same keys as the recorded full run that tests/unit/test_benchmarks.py holds the report to
    from tests.unit.test_benchmarks import RECORDED

    recorded = json.loads(RECORDED.read_text())
    for section in ("reference", "interleaved", "inference"):
        assert set(report["raw"][section]) == set(recorded["raw"][section]), section
    assert set(one) == set(recorded["raw"]["train"]["table_wise_1w"]) - {"eval", "profile"}  # not run here
    assert set(report) == set(recorded)
