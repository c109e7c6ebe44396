"""prepare under concurrency and interruption: one writer per output, a commit cut short can be
completed or rolled back without overwrite, stale staging folders go away."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from data_tools.writer import JOURNAL_NAME, LOCK_NAME, DatasetWriter, recover
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import FieldSpec, load_manifest

FIELDS = [FieldSpec("a", "categorical", 10)]


def _rows(n: int, label: float = 0.0) -> pa.Table:
    return pa.table({"y": pa.array([label, 1.0 - label] * (n // 2), pa.float32()),
                     "a": pa.array([1 + i % 8 for i in range(n)], pa.int64()), "_group": pa.array([0] * n, pa.int64())})


def _writer(out: Path, **kw) -> DatasetWriter:
    return DatasetWriter(str(out), fields=FIELDS, label="y", group=None, row_group_rows=4, row_groups_per_part=1, **kw)


def test_a_second_writer_fails_clearly(tmp_path):
    out = tmp_path / "ds"
    with _writer(out) as first:
        first.split("train").write(_rows(8))
        with pytest.raises(DataError, match=f"being written by another prepare \\({LOCK_NAME}"):
            _writer(out)
        with pytest.raises(DataError, match="another prepare"):
            _writer(out, overwrite=True)  # overwrite does not break someone else's lock
        first.commit({}, "first")
    assert load_manifest(str(out)).created_by.startswith("first")
    assert not (out / LOCK_NAME).exists()
    with _writer(out, overwrite=True) as again:  # the lock is released after the commit
        again.split("train").write(_rows(8))
        again.commit({}, "second")


def test_a_lock_of_a_dead_writer_on_this_host_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess

    out = tmp_path / "ds"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    (out / ".staging-deadbeef0000").mkdir()
    (out / ".staging-deadbeef0000" / "_WRITING").write_text("x")
    with _writer(out) as w:
        assert not (out / ".staging-deadbeef0000").exists()  # stale staging removed on the next run
        w.split("train").write(_rows(8))
        w.commit({}, "t")
    assert os.getpid() != dead.pid


def _interrupted_commit(out: Path, monkeypatch, after_moves: int) -> None:
    w = _writer(out)
    w.split("train").write(_rows(16))  # 4 parts
    fs = w.loc.fs
    real_mv = fs.mv
    calls = {"n": 0}

    def flaky_mv(src, dst, *a, **k):
        if calls["n"] >= after_moves:
            raise KeyboardInterrupt("killed during the commit")
        calls["n"] += 1
        return real_mv(src, dst, *a, **k)

    monkeypatch.setattr(fs, "mv", flaky_mv)
    with pytest.raises(KeyboardInterrupt):
        w.commit({}, "interrupted")
    monkeypatch.setattr(fs, "mv", real_mv)
    w._unlock()  # the killed process is gone; its lock would be taken over as above
    assert (out / JOURNAL_NAME).exists() and not (out / "manifest.json").exists()


def test_an_interrupted_commit_can_be_completed(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    _interrupted_commit(out, monkeypatch, after_moves=2)
    with pytest.raises(DataError, match="interrupted commit.*recover"):
        _writer(out)  # not silently mixed with a new write, and no overwrite needed
    assert "completed (4 files)" in recover(str(out), "complete")
    m = load_manifest(str(out))
    assert m.splits["train"].rows == 16 and len(m.splits["train"].parts) == 4
    assert not (out / JOURNAL_NAME).exists() and not list(out.glob(".staging-*"))


def test_an_interrupted_commit_can_be_rolled_back(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    _interrupted_commit(out, monkeypatch, after_moves=2)
    assert "rolled back" in recover(str(out), "rollback")
    assert not list(out.rglob("*.parquet")) and not list(out.glob(".staging-*"))
    with _writer(out) as w:  # a fresh prepare needs no overwrite
        w.split("train").write(_rows(8))
        w.commit({}, "fresh")
    assert load_manifest(str(out)).splits["train"].rows == 8
