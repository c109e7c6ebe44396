"""S3 outages: a TCP proxy on 127.0.0.1 in front of the moto server refuses connections for a
while; reads and checkpoint writes ride it out within the retry window and give up after it with
"cannot reach ..." (never "corrupt Parquet?")."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from data_tools.bars_csv import prepare_bars_csv
from tests.data_helpers import tiny_bars
from tests.outage_proxy import OutageProxy
from tests.s3server import SECRET_KEY, S3Server, storage_options_for
from tf4ctr_dist.data.manifest import load_manifest
from tf4ctr_dist.data.reader import ParquetSplitReader
from tf4ctr_dist.data.storage import StorageUnavailable


@pytest.fixture
def proxy(s3_server: S3Server):
    p = OutageProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def dataset(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    url = s3_server.url("datasets", "outage")
    prepare_bars_csv(*tiny_bars(tmp_path_factory.mktemp("outage")), url, group_col="u", row_group_rows=8,
                     storage_options=s3_server.storage_options)
    return url


def _arrays(batch) -> tuple[np.ndarray, ...]:
    kjt = batch.sparse_features
    return (batch.labels.numpy(), batch.sample_ids.numpy(), batch.valid.numpy(),
            kjt.values().numpy(), kjt.lengths().numpy())


def _reader(url: str, endpoint: str, retry_seconds: float) -> ParquetSplitReader:
    # One botocore attempt and a 1 s connect timeout: the retrying is ours.
    opts = storage_options_for(endpoint, connect_timeout=1, attempts=1)
    manifest = load_manifest(url, opts, retry_seconds=retry_seconds)
    return ParquetSplitReader(url, "train", manifest=manifest, rank=0, world_size=1, local_batch_size=7,
                              shuffle=True, seed=3, storage_options=opts, prefetch=False,
                              shuffle_buffer_row_groups=1, retry_seconds=retry_seconds)


def test_a_read_rides_out_an_outage_with_identical_batches(s3_server: S3Server, dataset: str, proxy: OutageProxy) -> None:
    with _reader(dataset, s3_server.endpoint_url, 0) as direct:
        expected = [_arrays(b) for b in direct.iter_epoch(1)]
    assert len(expected) >= 6
    got = []
    with _reader(dataset, proxy.endpoint, 60) as reader:
        started = time.monotonic()
        for i, batch in enumerate(reader.iter_epoch(1)):
            got.append(_arrays(batch))
            if i == 1:  # mid-epoch: row groups still to fetch
                before = proxy.connections
                proxy.outage(8)
        elapsed = time.monotonic() - started
    assert elapsed >= 8  # the outage was met, and waited out
    assert proxy.connections > before  # and the reads after it went through the proxy again
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for a, b in zip(g, e):
            np.testing.assert_array_equal(a, b)


def test_an_outage_longer_than_the_window_names_the_real_cause(s3_server: S3Server, dataset: str, proxy: OutageProxy) -> None:
    proxy.outage(60)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"cannot reach s3://.*/outage/manifest.json \(connection refused for \d+ s"):
        load_manifest(dataset, storage_options_for(proxy.endpoint, connect_timeout=1, attempts=1), retry_seconds=3)
    assert 3 <= time.monotonic() - started < 20
    proxy.outage(0)

    reader = _reader(dataset, proxy.endpoint, 3)
    batches = reader.iter_epoch(0)
    next(batches)
    proxy.outage(60)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        list(batches)
    reader.close()
    message = str(info.value)
    assert "cannot reach s3://" in message and "/outage/train/" in message and "connection refused" in message
    assert "corrupt" not in message and SECRET_KEY not in message
    assert time.monotonic() - started < 20


def test_errors_that_cannot_succeed_are_not_retried(s3_server: S3Server, proxy: OutageProxy) -> None:
    from tf4ctr_dist.data.errors import DataError

    started = time.monotonic()
    with pytest.raises(DataError, match="no manifest.json"):
        load_manifest(s3_server.url("absent"), storage_options_for(proxy.endpoint), retry_seconds=60)
    assert time.monotonic() - started < 5


def test_a_checkpoint_upload_rides_out_an_outage(s3_server: S3Server, proxy: OutageProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from tf4ctr_dist.distributed.checkpoint import CheckpointEntry, CheckpointStore

    url = s3_server.url("runs", "outage", "checkpoints")
    weight = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # the checkpoint store takes the endpoint from the env
    try:
        store = CheckpointStore(url, rank=0, world_size=1, retry_seconds=60)
        entry = CheckpointEntry(CheckpointEntry.name_for(0, 5), 0, 5, world_size=1)
        proxy.outage(8)
        started = time.monotonic()
        store.save(entry, {"model": {"w": weight}}, {"count": torch.tensor([7])}, {"epoch": 0, "step": 5})
        assert time.monotonic() - started >= 7
    finally:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
        s3fs.S3FileSystem.clear_instance_cache()
    fresh = CheckpointStore(url, 0, 1)  # straight to the server
    assert fresh.latest().name == entry.name
    target = {"model": {"w": torch.zeros(4, 3)}}
    fresh.load(fresh.latest(), target)
    assert torch.equal(target["model"]["w"], weight)
    assert fresh.train_state(fresh.latest()) == {"epoch": 0, "step": 5}
    assert torch.equal(fresh.rank_state(fresh.latest())["count"], torch.tensor([7]))
