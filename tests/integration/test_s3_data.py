"""Prepare and read datasets on a local S3 server (moto); unreachable endpoints fail fast."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.bars_csv import prepare_bars_csv
from tests.data_helpers import read_split, tiny_bars, valid_sample_ids
from tests.s3server import SECRET_KEY, S3Server, free_port, storage_options_for
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import load_manifest


def _upload(s3: S3Server, local: str, key: str) -> str:
    import s3fs

    s3fs.S3FileSystem(**s3.storage_options).put_file(local, f"{s3.bucket}/{key}")
    return s3.url(key)


def test_prepare_and_read_on_s3(s3_server: S3Server, tmp_path: Path) -> None:
    local = tiny_bars(tmp_path)
    inputs = [_upload(s3_server, f, f"raw/{Path(f).name}") for f in local]  # inputs on S3 too
    out = s3_server.url("datasets", "tiny")
    m = prepare_bars_csv(*inputs, out, group_col="u", row_group_rows=8, storage_options=s3_server.storage_options)
    assert load_manifest(out, s3_server.storage_options) == m
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    keys = [k.split("/tiny/", 1)[1] for k in fs.find(f"{s3_server.bucket}/datasets/tiny")]
    assert "manifest.json" in keys and not any(k.startswith(".staging-") for k in keys)
    for split in ("train", "valid", "test"):
        for world_size in (1, 2):
            per_rank = read_split(
                out, m, split, world_size=world_size, batch_size=7, shuffle=True, seed=1,
                storage_options=s3_server.storage_options,
            )
            ids = np.concatenate([valid_sample_ids(b) for b in per_rank])
            assert sorted(ids.tolist()) == list(range(m.splits[split].rows))
    with pytest.raises(DataError, match="already holds a dataset") as info:
        prepare_bars_csv(*inputs, out, storage_options=s3_server.storage_options)
    assert SECRET_KEY not in str(info.value)


def test_missing_s3_objects(s3_server: S3Server, tmp_path: Path) -> None:
    opts = s3_server.storage_options
    with pytest.raises(DataError, match="no manifest.json at s3://.*/nothing: dataset missing"):
        load_manifest(s3_server.url("nothing"), opts)
    train, valid, test = tiny_bars(tmp_path)
    with pytest.raises(DataError, match="input file not found: s3://.*/raw/absent.csv"):
        prepare_bars_csv(train, valid, s3_server.url("raw/absent.csv"), s3_server.url("out1"), storage_options=opts)
    with pytest.raises(DataError, match="cannot write to output URL s3://no-such-bucket-tf4ctr/x") as info:
        prepare_bars_csv(train, valid, test, "s3://no-such-bucket-tf4ctr/x", storage_options=opts)
    assert SECRET_KEY not in str(info.value)


def test_unreachable_endpoint_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tf4ctr_dist.data.storage import RETRY_ENV, StorageUnavailable

    monkeypatch.setenv(RETRY_ENV, "0")  # no retry window (tests/integration/test_storage_outage.py has one)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    opts = storage_options_for(closed, connect_timeout=1, attempts=1)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="cannot reach .*connection refused.*Could not connect") as info:
        load_manifest("s3://some-bucket/ds", opts)
    assert "s3://some-bucket/ds/manifest.json" in str(info.value) and SECRET_KEY not in str(info.value)
    train, valid, test = tiny_bars(tmp_path)
    with pytest.raises(DataError, match="s3://some-bucket/out") as info:
        prepare_bars_csv(train, valid, test, "s3://some-bucket/out", storage_options=opts)
    assert SECRET_KEY not in str(info.value)
    assert time.monotonic() - started < 20


def test_cli_on_s3_with_credentials_from_env(s3_server: S3Server, capsys: pytest.CaptureFixture) -> None:
    from data_tools.cli import main

    url = s3_server.url("datasets", "cli-synthetic")
    endpoint = ["--endpoint-url", s3_server.endpoint_url]  # keys come from AWS_* env (set by the fixture)
    assert main(["prepare", "synthetic", "--out", url, "--set", "rows=300", "--set", "fields=3", *endpoint]) == 0
    assert main(["check", url, "--quiet", *endpoint]) == 0
    out = capsys.readouterr()
    assert "OK:" in out.out and SECRET_KEY not in out.out + out.err
