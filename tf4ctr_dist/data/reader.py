"""Streaming, rank-sharded, resumable Parquet reader: one split of a prepared dataset -> Batches.

Sharding (exact distributed eval, resumable training):
  * per epoch the split's row groups are ordered (a permutation seeded by (seed, epoch) when
    shuffling, else file order) and seen as one virtual row sequence of N rows;
  * rank r owns the contiguous slice [r*N//W, (r+1)*N//W): every row is read by exactly one rank
    and shares differ by at most one row;
  * a rank opens only the row groups overlapping its slice; when shuffling, rows are shuffled
    within windows of `shuffle_buffer_row_groups` row groups (seeded by seed, epoch, rank, window);
  * every rank yields ceil(ceil(N/W) / B) batches of exactly B rows; rows past the rank's share
    are padding (valid=0, label 0, no ids, sample_id -1, group 0), so all ranks run the same
    number of collective steps;
  * `iter_epoch(epoch, start_batch=k)` yields exactly the batches k.. of an uninterrupted epoch,
    skipping whole windows without reading them.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .batch import Batch
from .errors import DataError
from .manifest import GROUP_COLUMN, FieldSpec, Manifest
from .storage import Location, describe, resolve
from .validate import check_part, validate_row_group

SAMPLE_ID_COLUMN = "_sample_id"  # added by the reader, never stored


@dataclass(frozen=True)
class _RowGroup:
    part: int  # index into the split's parts
    index: int  # row group index within the part
    rows: int
    first_row: int  # split row index (= sample id) of its first row, in file order


@dataclass(frozen=True)
class _Piece:
    """Rows [start, stop) of one row group."""

    group: _RowGroup
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _Window:
    """Consecutive pieces whose rows are shuffled together; `first` = offset in the rank's stream."""

    pieces: tuple[_Piece, ...]
    first: int
    rows: int
    index: int


class ParquetSplitReader:
    """Reads one split for one rank. Create one per (split, rank); iterate epochs with iter_epoch."""

    def __init__(
        self,
        dataset_url: str,
        split: str,
        *,
        manifest: Manifest,
        rank: int,
        world_size: int,
        local_batch_size: int,
        shuffle: bool,
        seed: int = 0,
        storage_options: Mapping[str, Any] | None = None,
        shuffle_buffer_row_groups: int = 4,
        prefetch: bool = True,
        max_open_files: int = 16,
        pad_tail: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if local_batch_size < 1:
            raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
        if shuffle_buffer_row_groups < 1:
            raise ValueError(f"shuffle_buffer_row_groups must be >= 1, got {shuffle_buffer_row_groups}")
        self.loc: Location = resolve(dataset_url, storage_options)
        self.manifest = manifest
        self.split = split
        self.info = manifest.split(split)
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = local_batch_size
        self.shuffle, self.seed = shuffle, seed
        self.shuffle_buffer_row_groups = shuffle_buffer_row_groups
        self.pad_tail = pad_tail
        self.max_open_files = max(1, max_open_files)
        self._fields: list[FieldSpec] = list(manifest.fields)
        self._columns = manifest.column_names()
        self._groups: list[_RowGroup] = []
        first = 0
        for p, part in enumerate(self.info.parts):
            for g, rows in enumerate(part.row_groups):
                self._groups.append(_RowGroup(p, g, rows, first))
                first += rows
        self.num_rows = first
        self._files: OrderedDict[int, tuple[Any, pq.ParquetFile]] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-read") if prefetch else None

    # ---- plan ---------------------------------------------------------------------------------

    def _share(self, rank: int) -> tuple[int, int]:
        n, w = self.num_rows, self.world_size
        return rank * n // w, (rank + 1) * n // w

    def rank_rows(self, epoch: int) -> int:
        """Real (non-padding) rows this rank reads in `epoch`."""
        lo, hi = self._share(self.rank)
        return hi - lo

    def num_batches(self, epoch: int) -> int:
        """Batches per epoch; identical on every rank (the largest share decides)."""
        max_share = -(-self.num_rows // self.world_size)
        return -(-max_share // self.local_batch_size)

    def _order(self, epoch: int) -> list[_RowGroup]:
        if not self.shuffle:
            return self._groups
        # Same on every rank: seeded by (seed, epoch) only.
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._groups))
        return [self._groups[i] for i in perm]

    def _pieces(self, epoch: int) -> list[_Piece]:
        lo, hi = self._share(self.rank)
        pieces: list[_Piece] = []
        pos = 0
        for group in self._order(epoch):
            start, stop = max(lo, pos), min(hi, pos + group.rows)
            if start < stop:
                pieces.append(_Piece(group, start - pos, stop - pos))
            pos += group.rows
            if pos >= hi:
                break
        return pieces

    def _windows(self, epoch: int) -> list[_Window]:
        pieces = self._pieces(epoch)
        size = self.shuffle_buffer_row_groups if self.shuffle else 1
        windows, first = [], 0
        for i in range(0, len(pieces), size):
            chunk = tuple(pieces[i : i + size])
            rows = sum(p.rows for p in chunk)
            windows.append(_Window(chunk, first, rows, len(windows)))
            first += rows
        return windows

    # ---- iteration ----------------------------------------------------------------------------

    def batch_sizes(self, epoch: int) -> list[int]:
        """Real rows in each of this rank's batches (len == num_batches(epoch)).

        pad_tail=True: full batches, the tail padded with valid=0 rows (eval: fixed shapes).
        pad_tail=False (training): no padding rows at all, because padding would enter
        BatchNorm's batch statistics; the last batch is simply smaller, as in a single-process
        run. Shares differ by at most one row, so a rank may need one extra step: it then splits
        its last batch, and a 1-row tail borrows a row (BatchNorm cannot train on one sample).
        """
        total, size, rows = self.num_batches(epoch), self.local_batch_size, self.rank_rows(epoch)
        sizes = [size] * (rows // size) + ([rows % size] if rows % size else [])
        if self.pad_tail:
            return sizes + [0] * (total - len(sizes))
        if len(sizes) < total:
            if not sizes or sizes[-1] < 4:
                raise ValueError(
                    f"split {self.split!r} has {self.num_rows} rows: too few for {self.world_size} "
                    f"workers at local batch {size}"
                )
            last = sizes.pop()
            sizes += [last - 2, 2]
        if len(sizes) >= 2 and sizes[-1] < 2:
            sizes[-2] -= 2 - sizes[-1]
            sizes[-1] = 2
        return sizes

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield batches start_batch .. num_batches(epoch)-1 of `epoch` for this rank."""
        total = self.num_batches(epoch)
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch must be in [0, {total}], got {start_batch}")
        sizes = self.batch_sizes(epoch)
        skip = sum(sizes[:start_batch])
        windows = self._windows(epoch)
        first_window = max(0, bisect.bisect_right([w.first for w in windows], skip) - 1)
        todo = [w for w in windows[first_window:] if w.first + w.rows > skip]

        buffer: list[pa.Table] = []
        buffered = 0
        produced = start_batch
        for table, window in self._read_windows(epoch, todo):
            if window.first < skip:
                table = table.slice(skip - window.first)
            buffer.append(table)
            buffered += table.num_rows
            while produced < total and sizes[produced] > 0 and buffered >= sizes[produced]:
                rows, buffer = _take(buffer, sizes[produced])
                buffered -= sizes[produced]
                yield self._to_batch(rows, self.local_batch_size if self.pad_tail else sizes[produced])
                produced += 1
        while produced < total:  # padding-only batches keep ranks in lock-step
            rows, buffer = _take(buffer, sizes[produced]) if sizes[produced] else (None, buffer)
            yield self._to_batch(rows, self.local_batch_size if self.pad_tail else sizes[produced])
            produced += 1

    def _read_windows(self, epoch: int, windows: list[_Window]) -> Iterator[tuple[pa.Table, _Window]]:
        """Read (and shuffle) windows in order, one ahead on a background thread when enabled."""
        if self._pool is None:
            for window in windows:
                yield self._read_window(epoch, window), window
            return
        pending: Future | None = None
        for i, window in enumerate(windows):
            future = pending or self._pool.submit(self._read_window, epoch, window)
            pending = self._pool.submit(self._read_window, epoch, windows[i + 1]) if i + 1 < len(windows) else None
            yield future.result(), window

    def _read_window(self, epoch: int, window: _Window) -> pa.Table:
        tables = [self._read_piece(p) for p in window.pieces]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if self.shuffle and table.num_rows > 1:
            rng = np.random.default_rng([self.seed, epoch, self.rank, window.index])
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        return table

    def _read_piece(self, piece: _Piece) -> pa.Table:
        group = piece.group
        pf = self._file(group.part)
        where = f"{self._url(group.part)} row group {group.index}"
        try:
            table = pf.read_row_group(group.index, columns=self._columns)
        except Exception as exc:
            raise DataError(f"{where}: cannot read ({describe(exc, self.loc.storage_options)}); corrupt or truncated Parquet?") from None
        if table.num_rows != group.rows:
            raise DataError(f"{where}: has {table.num_rows} rows, manifest says {group.rows}")
        validate_row_group(table, self.manifest, where)
        table = table.slice(piece.start, piece.rows)
        sample_ids = np.arange(group.first_row + piece.start, group.first_row + piece.stop, dtype=np.int64)
        return table.append_column(SAMPLE_ID_COLUMN, pa.array(sample_ids))

    # ---- files --------------------------------------------------------------------------------

    def _url(self, part: int) -> str:
        return self.loc.url_of(self.info.parts[part].path)

    def _file(self, part: int) -> pq.ParquetFile:
        """Open each part once and keep a few open (bounded: one handle per part would not scale)."""
        if part in self._files:
            self._files.move_to_end(part)
            return self._files[part][1]
        info, url = self.info.parts[part], self._url(part)
        path = self.loc.path(info.path)
        try:
            # No fsspec read cache: pyarrow coalesces a row group's column reads (pre_buffer).
            handle = self.loc.fs.open(path, "rb", **({} if self.loc.is_local else {"cache_type": "none"}))
        except FileNotFoundError:
            raise DataError(f"{url}: part file missing (listed in the manifest)") from None
        except Exception as exc:
            raise self.loc.error(f"{url}: cannot open", exc) from None
        try:
            pf = pq.ParquetFile(handle, pre_buffer=True)
        except Exception as exc:
            handle.close()
            raise DataError(f"{url}: not a readable Parquet file ({describe(exc, self.loc.storage_options)}); corrupt or truncated?") from None
        check_part(pf, self.manifest, url, info.row_groups)
        self._files[part] = (handle, pf)
        while len(self._files) > self.max_open_files:
            _, (old, _) = self._files.popitem(last=False)
            old.close()
        return pf

    def close(self) -> None:
        if self._pool is not None:  # first: the read-ahead thread may be using the files
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for handle, _ in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> "ParquetSplitReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- batch assembly -----------------------------------------------------------------------

    def _to_batch(self, table: pa.Table | None, size: int) -> Batch:
        """`size` rows (the first `table.num_rows` real, the rest padding) -> Batch."""
        n = table.num_rows if table is not None else 0
        labels = np.zeros(size, dtype=np.float32)
        groups = np.zeros(size, dtype=np.int64)
        sample_ids = np.full(size, -1, dtype=np.int64)
        valid = np.zeros(size, dtype=np.float32)
        values: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        if n:
            labels[:n] = table.column(self.manifest.label).to_numpy()
            groups[:n] = table.column(GROUP_COLUMN).to_numpy()
            sample_ids[:n] = table.column(SAMPLE_ID_COLUMN).to_numpy()
            valid[:n] = 1.0
        for spec in self._fields:
            field_lengths = np.zeros(size, dtype=np.int32)
            if not n:
                values.append(np.empty(0, dtype=np.int64))
            elif spec.kind == "categorical":
                ids = table.column(spec.name).to_numpy()
                present = ids != 0  # PAD (0) means "no id": zero length, pools to zero
                field_lengths[:n] = present
                values.append(ids if present.all() else ids[present])
            else:
                column = table.column(spec.name).combine_chunks()
                ids = pc.list_flatten(column).to_numpy()
                row_lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int32)
                pad = ids == 0
                if pad.any():  # tolerate explicit PAD inside lists: drop it, shorten the row
                    rows = np.repeat(np.arange(n), row_lengths)
                    row_lengths = row_lengths - np.bincount(rows[pad], minlength=n).astype(np.int32)
                    ids = ids[~pad]
                field_lengths[:n] = row_lengths
                values.append(ids)
            lengths.append(field_lengths)
        kjt = KeyedJaggedTensor(
            keys=[f.name for f in self._fields],
            values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        return Batch(
            sparse_features=kjt,
            labels=torch.from_numpy(labels),
            group_ids=torch.from_numpy(groups),
            sample_ids=torch.from_numpy(sample_ids),
            valid=torch.from_numpy(valid),
        )


def _take(buffer: list[pa.Table], k: int) -> tuple[pa.Table | None, list[pa.Table]]:
    """Split the first k rows off a list of tables (zero-copy slices)."""
    if k == 0:
        return None, buffer
    taken: list[pa.Table] = []
    need = k
    while need:
        head = buffer[0]
        if head.num_rows <= need:
            taken.append(head)
            need -= head.num_rows
            buffer = buffer[1:]
        else:
            taken.append(head.slice(0, need))
            buffer = [head.slice(need), *buffer[1:]]
            need = 0
    return (taken[0] if len(taken) == 1 else pa.concat_tables(taken)), buffer
