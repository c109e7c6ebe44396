"""parquet-logs and movielens read from and write to s3:// (local moto server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.check import check_dataset
from data_tools.movielens import prepare_movielens
from data_tools.parquet_logs import prepare_parquet_logs
from tests.s3server import SECRET_KEY, S3Server
from tests.unit.test_data_movielens import write_ml1m
from tests.unit.test_data_parquet_logs import DATES, SPEC, default_logs
from tf4ctr_dist.data.errors import DataError


def _upload(s3: S3Server, folder: Path, prefix: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{s3.bucket}/{prefix}/{path.relative_to(folder).as_posix()}")
    return s3.url(prefix)


def test_parquet_logs_on_s3(s3_server: S3Server, tmp_path: Path) -> None:
    opts = s3_server.storage_options
    logs = _upload(s3_server, default_logs(tmp_path / "logs"), "raw/logs")
    local = prepare_parquet_logs(str(tmp_path / "logs"), str(tmp_path / "local"), **SPEC)
    out = s3_server.url("datasets", "logs")
    m = prepare_parquet_logs(logs, out, storage_options=opts, **SPEC)
    assert {s: i.rows for s, i in m.splits.items()} == {s: i.rows for s, i in local.splits.items()}
    assert [p.sha256 for i in m.splits.values() for p in i.parts] == [p.sha256 for i in local.splits.values() for p in i.parts]
    # counted vocabularies are saved next to the parts, byte-identical to the local run's
    saved = {k: v["file"] for k, v in m.spec["vocab"].items() if "file" in v}
    assert saved and saved == {k: v["file"] for k, v in local.spec["vocab"].items() if "file" in v}
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    assert all(fs.exists(f"{out[len('s3://'):]}/{f['path']}") for f in saved.values())
    report = check_dataset(out, opts)
    assert report.ok and not report.warnings, report.problems + report.warnings
    with pytest.raises(DataError, match=f"no partition dt=2030-01-01 under s3://{s3_server.bucket}/raw/logs") as info:
        prepare_parquet_logs(logs, s3_server.url("datasets", "x"), storage_options=opts, **{**SPEC, "test_dates": ["2030-01-01"]})
    assert SECRET_KEY not in str(info.value) and DATES[0] in str(info.value)


def test_movielens_on_s3(s3_server: S3Server, tmp_path: Path) -> None:
    opts = s3_server.storage_options
    folder = _upload(s3_server, write_ml1m(tmp_path / "ml-1m"), "raw/ml-1m")
    m = prepare_movielens(folder, s3_server.url("datasets", "ml"), storage_options=opts)
    local = prepare_movielens(str(tmp_path / "ml-1m"), str(tmp_path / "ml"))
    assert [p.sha256 for i in m.splits.values() for p in i.parts] == [p.sha256 for i in local.splits.values() for p in i.parts]
