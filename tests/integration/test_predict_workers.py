"""`tf4ctr predict --workers 2` on a local Ray cluster (127.0.0.1) writes the file one process
writes, row for row and bit for bit: a trained run's prepared test split (cut at batch
boundaries that fall inside row groups), a raw Parquet file of several row groups, and two raw
CSV files (one worker each). Progress is a line per part; no part or temporary file is left,
also when a worker fails; one CSV file falls back to one process with a log line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.distributed._launch import run_gloo
from tests.serving_data import SMALL, prepare
from tf4ctr_dist.cli import main


def _train(rank: int, world_size: int, overrides: list[str]) -> None:
    import torch

    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.train.loop import WorkerContext, train_worker

    train_worker(RunConfig().with_overrides(overrides), WorkerContext(rank=rank, world_size=world_size,
                                                                      device=torch.device("cpu")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset URL, raw test CSV, run folder, artifact): one small run, trained for one epoch."""
    folder = tmp_path_factory.mktemp("predict-workers")
    url, (_, _, test_csv) = prepare(folder, rows=(2000, 500, 1000))
    run = folder / "run"
    run_gloo(_train, 1, [f"data.url={url}", f"out={run}", "cluster.workers=1", "train.batch_size=256",
                         "train.eval_batch_size=512", "train.epochs=1", "train.monitor=[AUC]", "train.log_every=0",
                         "sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05", *SMALL],
             timeout=300)
    artifact = folder / "model.tf4ctr"
    assert main(["export", "--run", str(run), "--out", str(artifact)]) == 0
    return url, test_csv, run, artifact


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only local cluster
    import ray

    # predict joins the initialised cluster (and leaves it running): one cluster for the module
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def _predict(source: list[str], data: list[str], out: Path, *extra: str) -> pa.Table:
    assert main(["predict", *source, "--data", *data, "--out", str(out), *extra]) == 0
    return pq.read_table(out)


def _batches(path: Path) -> list[int]:
    """Rows per row group: each is one scored batch, so these are where the batches were cut.
    Equal cuts are what the bit-for-bit equality rests on (a row's score can change in the last
    bit with its batch), checked here directly, as the scores of a small model rarely show it."""
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def _left_over(folder: Path, *expected: str) -> list[str]:
    return sorted(set(os.listdir(folder)) - set(expected))


def test_prepared_split_on_two_workers_equals_one_process(trained, ray_local, tmp_path, capsys):
    url, _, run, _ = trained
    # 1000 rows in batches of 96: 11 batches, 5 + 6 per worker; worker 2 starts at row 480,
    # inside a row group, and must batch it exactly as one process does
    one = _predict(["--run", str(run)], [url], tmp_path / "one.parquet", "--batch-size", "96")
    capsys.readouterr()
    two = _predict(["--run", str(run)], [url], tmp_path / "two.parquet", "--batch-size", "96", "--workers", "2")
    assert two.column_names == ["row", "label", "score"]
    assert two.equals(one)  # same rows in the same order, same labels, same float32 scores
    assert _batches(tmp_path / "two.parquet") == _batches(tmp_path / "one.parquet") == [96] * 10 + [40]
    np.testing.assert_array_equal(two.column("row").to_numpy(), np.arange(1000))
    assert np.ptp(two.column("score").to_numpy()) > 1e-3
    log = capsys.readouterr().out
    assert "part 1/2 done" in log and "part 2/2 done" in log and "rows/s" in log, log
    assert "batches 0..5" in log and "batches 5..11" in log, log
    assert _left_over(tmp_path, "one.parquet", "two.parquet") == []  # no parts, no temporary files


def test_raw_parquet_and_several_csv_files(trained, ray_local, tmp_path, capsys):
    _, test_csv, _, artifact = trained
    model = ["--model", str(artifact)]
    raw = pacsv.read_csv(test_csv, convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in "label a b u".split()}))
    parquet = tmp_path / "test.parquet"
    pq.write_table(raw, parquet, row_group_size=150)  # 7 row groups; batches of 64 cross them
    lines = Path(test_csv).read_text().splitlines()
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text("\n".join(lines[:451]) + "\n")
    second.write_text("\n".join([lines[0], *lines[451:]]) + "\n")
    # one run, three kinds of shares: the Parquet file in two row ranges, a CSV file each
    files = [str(parquet), str(first), str(second)]
    one = _predict(model, files, tmp_path / "one.parquet", "--batch-size", "64")
    capsys.readouterr()
    two = _predict(model, files, tmp_path / "two.parquet", "--batch-size", "64", "--workers", "2")
    assert two.equals(one) and two.num_rows == 2000
    assert _batches(tmp_path / "two.parquet") == _batches(tmp_path / "one.parquet") == \
        [64] * 15 + [40] + [64] * 7 + [2] + [64] * 8 + [38]
    np.testing.assert_array_equal(two.column("row").to_numpy(), np.arange(2000))  # numbered on across files
    # the CSV files hold the Parquet file's rows (batched differently: equal within rounding)
    np.testing.assert_allclose(two.column("score").to_numpy()[1000:], two.column("score").to_numpy()[:1000], atol=1e-6)
    log = capsys.readouterr().out
    assert "test.parquet rows 0..512): 512 rows" in log and "test.parquet rows 512..1000): 488 rows" in log, log
    assert "first.csv): 450 rows" in log and "second.csv): 550 rows" in log and "part 4/4 done" in log, log

    # one CSV file cannot be split: one process, said so, the same file
    single = _predict(model, [str(first)], tmp_path / "single.parquet", "--batch-size", "64", "--workers", "2")
    assert "cannot be split without reading it" in capsys.readouterr().out
    assert single.equals(one.slice(1000, 450).set_column(0, "row", pa.array(np.arange(450))))
    assert _left_over(tmp_path, "test.parquet", "first.csv", "second.csv", "one.parquet", "two.parquet",
                      "single.parquet") == []


def test_a_failing_worker_leaves_nothing_behind(trained, ray_local, tmp_path, capsys):
    _, test_csv, _, artifact = trained
    lines = Path(test_csv).read_text().splitlines()
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("\n".join(lines[:300]) + "\n")
    broken = [lines[0], *lines[300:]]
    broken[40] += ",extra"  # line 41 of bad.csv has five columns
    bad.write_text("\n".join(broken) + "\n")
    out = tmp_path / "scores.parquet"
    code = main(["predict", "--model", str(artifact), "--data", str(good), str(bad), "--out", str(out),
                 "--workers", "2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "bad.csv: line 41: 5 columns, expected 4" in err and "Traceback" not in err, err
    assert _left_over(tmp_path, "good.csv", "bad.csv") == []  # no output, no parts folder, no temporary file
