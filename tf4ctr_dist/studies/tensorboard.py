"""TensorBoard event files of a run under RUN/tb/ (rank 0 only).

Written with tensorboardX (protobuf + numpy; no TensorFlow, no tensorboard server needed to
write). A run folder on object storage (s3://...) gets its events written to a local
temporary folder and copied up at every ``flush`` (the loop flushes at each epoch end), since
event files are appended to and object stores cannot append. tensorboardX writes events from a
background queue and its ``flush`` does not wait for that queue, so an upload first closes the
writer (which drains it) and the next event opens a new file in the same folder (TensorBoard
reads a folder's event files in order).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional, Sequence

import fsspec


class RunBoard:
    """``enabled=False`` (ranks other than 0, or train.tensorboard=false) makes every call a no-op."""

    def __init__(self, out: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None  # the open event file's writer; None after an upload until the next event
        self._closed = not enabled
        if not enabled:
            return
        url = out.rstrip("/") + "/tb"
        self.remote: Optional[str] = url if "://" in url and not url.startswith("file://") else None
        self.local = tempfile.mkdtemp(prefix="tf4ctr-tb-") if self.remote else url.removeprefix("file://")
        os.makedirs(self.local, exist_ok=True)
        self._files_opened = 0
        self._uploaded: dict[str, int] = {}  # local event file -> size last copied up
        self._writer()

    def _writer(self):
        if self.writer is None:
            from tensorboardX import SummaryWriter

            # A suffix per file: tensorboardX names files by the second they were opened.
            self._files_opened += 1
            self.writer = SummaryWriter(logdir=self.local, flush_secs=30, filename_suffix=f".{self._files_opened}")
        return self.writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        if not self._closed and value is not None:
            self._writer().add_scalar(tag, float(value), step)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.scalar(f"{prefix}/{k}", v, step)

    def histogram(self, tag: str, edges: Sequence[float], counts: Sequence[float], step: int) -> None:
        """A histogram from precomputed bin counts (len(edges) == len(counts) + 1)."""
        if self._closed or sum(counts) == 0:
            return
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        total = float(sum(counts))
        mean = sum(c * n for c, n in zip(centers, counts)) / total
        nonzero = [i for i, n in enumerate(counts) if n]
        self._writer().add_histogram_raw(
            tag, min=edges[nonzero[0]], max=edges[nonzero[-1] + 1], num=total, sum=mean * total,
            sum_squares=sum(c * c * n for c, n in zip(centers, counts)),
            bucket_limits=list(edges[1:]), bucket_counts=list(counts), global_step=step)

    def flush(self) -> None:
        if self._closed:
            return
        if not self.remote:
            if self.writer is not None:
                self.writer.flush()
            return
        if self.writer is not None:
            self.writer.close()  # drains tensorboardX's queue into the file
            self.writer = None
        fs, root = fsspec.core.url_to_fs(self.remote)
        for dirpath, _, files in os.walk(self.local):
            for name in files:
                path = os.path.join(dirpath, name)
                size = os.path.getsize(path)
                if self._uploaded.get(path) != size:  # closed files do not change: sent once
                    fs.put_file(path, f"{root}/{os.path.relpath(path, self.local)}")
                    self._uploaded[path] = size

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._closed = True
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
