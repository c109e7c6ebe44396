"""Checkpoints of a sharded training run, written with torch.distributed.checkpoint (DCP).

Layout under the checkpoint root (a local path or any fsspec URL, e.g. s3://):

    index.json              the committed checkpoints, oldest first: the only file readers trust
    e0002-s000150/          one checkpoint (epoch index 2, 150 batches of it trained)
        .metadata *.distcp  DCP: sharded tables, fused optimizer state, dense weights + Adam
        rank-00001.pt       one rank's private state: RNG, partial epoch sums, sample counts
        train_state.json    epoch, step, lr, early stopping, history, plan, world size

Every rank writes its DCP shards and its rank file; after a barrier rank 0 writes
train_state.json and then replaces index.json atomically. A checkpoint therefore exists for
readers only once all of it is on storage; folders that index.json does not list are debris
of a crash and are deleted at the next commit. The last ``keep`` checkpoints are kept, plus
the one marked best.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Optional

import fsspec
import torch
import torch.distributed as dist

from tf4ctr_dist.config import ConfigError

logger = logging.getLogger("tf4ctr_dist")

INDEX = "index.json"
TRAIN_STATE = "train_state.json"


@dataclass(frozen=True)
class CheckpointEntry:
    """One committed checkpoint: training continues at batch ``step`` of epoch ``epoch``."""

    name: str
    epoch: int  # 0-based epoch to continue (== epochs trained when step is 0)
    step: int  # batches of that epoch already trained (per rank)
    world_size: int
    best: bool = False  # the weights early stopping chose so far
    finished: bool = False  # training ended here (last epoch or early stop)

    @staticmethod
    def name_for(epoch: int, step: int) -> str:
        return f"e{epoch:04d}-s{step:06d}"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class CheckpointStore:
    """Reads and writes the checkpoints of one run. All ranks call every method (collectives run
    on ``pg``, a gloo group of its own, so they never interleave with the pipeline's traffic)."""

    def __init__(self, url: str, rank: int, world_size: int, keep: int = 2, pg: Optional[Any] = None):
        if keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {keep}")
        self.url = url.rstrip("/")
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.pg = pg
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self._entries: Optional[list[CheckpointEntry]] = None

    # ---- reading -----------------------------------------------------------------------------
    def entries(self) -> list[CheckpointEntry]:
        """Committed checkpoints, oldest first (rank 0 reads index.json; every rank gets it)."""
        if self._entries is None:
            raw = self._read_index() if self.rank == 0 else None
            raw = self._broadcast(raw)
            self._entries = [CheckpointEntry(**e) for e in raw]
        return list(self._entries)

    def latest(self) -> Optional[CheckpointEntry]:
        entries = self.entries()
        return entries[-1] if entries else None

    def best(self) -> Optional[CheckpointEntry]:
        marked = [e for e in self.entries() if e.best]
        return marked[-1] if marked else None

    def _read_index(self) -> list[dict]:
        path = f"{self.root}/{INDEX}"
        if not self.fs.exists(path):
            return []
        try:
            return json.loads(self.fs.cat_file(path))["checkpoints"]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{self.url}/{INDEX} is not a checkpoint index ({e}); move it away to start over") from None

    def train_state(self, entry: CheckpointEntry) -> dict:
        with self.fs.open(f"{self.root}/{entry.name}/{TRAIN_STATE}", "r") as f:
            return json.load(f)

    def rank_state(self, entry: CheckpointEntry) -> dict:
        with self.fs.open(f"{self.root}/{entry.name}/rank-{self.rank:05d}.pt", "rb") as f:
            return torch.load(io.BytesIO(f.read()), weights_only=False)

    def load(self, entry: CheckpointEntry, app_state: dict[str, Any]) -> None:
        """Fill ``app_state`` (e.g. {"model": dmp.state_dict(), "optim": ...}) in place from
        ``entry``. DCP reshards: tables saved table-wise by 4 ranks load into any other layout."""
        import torch.distributed.checkpoint as dcp

        dcp.load(app_state, storage_reader=self._reader(entry), process_group=self.pg)

    def tensor_shapes(self, entry: CheckpointEntry) -> dict[str, tuple[int, ...]]:
        """Global shape of every tensor in ``entry`` (from its DCP metadata)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = self._reader(entry).read_metadata()
        return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def _reader(self, entry: CheckpointEntry):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        path = f"{self.url}/{entry.name}"
        return FileSystemReader(path.removeprefix("file://")) if _is_local(self.url) else FsspecReader(path)

    # ---- writing -----------------------------------------------------------------------------
    def save(
        self,
        entry: CheckpointEntry,
        app_state: dict[str, Any],
        rank_state: dict[str, Any],
        train_state: dict[str, Any],
        before_commit=None,
    ) -> float:
        """Write ``entry`` and commit it; returns the seconds it took. ``before_commit`` runs on
        every rank after its own files are written (fault-injection tests use it)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        t0 = time.perf_counter()
        path = f"{self.url}/{entry.name}"
        writer = (
            FileSystemWriter(path.removeprefix("file://"), single_file_per_rank=True, sync_files=True, overwrite=True)
            if _is_local(self.url)
            else FsspecWriter(path, single_file_per_rank=True, sync_files=False, overwrite=True)
        )
        dcp.save(app_state, storage_writer=writer, process_group=self.pg)
        buf = io.BytesIO()
        torch.save(rank_state, buf)
        with self.fs.open(f"{self.root}/{entry.name}/rank-{self.rank:05d}.pt", "wb") as f:
            f.write(buf.getvalue())
        if before_commit is not None:
            before_commit()
        self._barrier()
        entries = self.entries()
        if self.rank == 0:
            self._write_atomic(f"{self.root}/{entry.name}/{TRAIN_STATE}", json.dumps(train_state, default=str))
            entries = [e for e in entries if e.name != entry.name] + [entry]
            kept = self._retained(entries)
            self._write_atomic(f"{self.root}/{INDEX}", json.dumps({"checkpoints": [asdict(e) for e in kept]}, indent=1))
            self._remove_unlisted({e.name for e in kept})
        else:
            entries = self._retained([e for e in entries if e.name != entry.name] + [entry])
        self._entries = entries
        self._barrier()
        return time.perf_counter() - t0

    def _retained(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        best = self._last_best(entries)
        recent = {e.name for e in entries[-self.keep :]}
        return [e for e in entries if e.name in recent or (best is not None and e.name == best.name)]

    @staticmethod
    def _last_best(entries: list[CheckpointEntry]) -> Optional[CheckpointEntry]:
        marked = [e for e in entries if e.best]
        return marked[-1] if marked else None

    def clear_debris(self) -> list[str]:
        """Rank 0 deletes checkpoint folders that index.json does not list (a crashed write);
        returns their names. Call before training starts."""
        listed = {e.name for e in self.entries()}
        removed = self._remove_unlisted(listed) if self.rank == 0 else []
        self._barrier()
        return removed

    def reset(self) -> None:
        """Forget every checkpoint (resume=never): the index goes first, then the folders."""
        if self.rank == 0:
            index = f"{self.root}/{INDEX}"
            if self.fs.exists(index):
                self.fs.rm(index)
            self._remove_unlisted(set())
        self._entries = []
        self._barrier()

    def _remove_unlisted(self, listed: set[str]) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        removed = []
        for info in self.fs.ls(self.root, detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            if info["type"] == "directory" and _looks_like_checkpoint(name) and name not in listed:
                self.fs.rm(info["name"], recursive=True)
                removed.append(name)
        return removed

    def _write_atomic(self, path: str, text: str) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "w") as f:
            f.write(text)
        self.fs.mv(tmp, path)

    # ---- collectives -------------------------------------------------------------------------
    def _broadcast(self, obj: Any) -> Any:
        if self.world_size == 1 or not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier(group=self.pg)


def _looks_like_checkpoint(name: str) -> bool:
    head, _, tail = name.partition("-")
    return len(head) == 5 and head[0] == "e" and head[1:].isdigit() and tail[:1] == "s" and tail[1:].isdigit()


@torch.no_grad()
def materialize_optimizer_state(leaves: list) -> None:
    """Create the lazily allocated state of plain torch optimizers (Adam's moments) so that a
    checkpoint can be loaded into it: one step with zero gradients at lr 0 changes no weight."""
    for opt in leaves:
        if not isinstance(opt, torch.optim.Optimizer) or opt.state:
            continue
        saved_lr = [g["lr"] for g in opt.param_groups]
        saved_grads = []
        for g in opt.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                saved_grads.append(p.grad)
                p.grad = torch.zeros_like(p)
        opt.step()
        it = iter(saved_grads)
        for g, lr in zip(opt.param_groups, saved_lr):
            g["lr"] = lr
            for p in g["params"]:
                p.grad = next(it)


def checkpoint_root(out: str, configured: Optional[str]) -> str:
    return (configured or f"{out.rstrip('/')}/checkpoints").rstrip("/")
