"""Streaming, rank-sharded, resumable Parquet reader: one split of a prepared dataset -> Batches.

Sharding (exact distributed eval, resumable training):
  * per epoch the split's row groups are ordered (a permutation seeded by (seed, epoch) when
    shuffling, else file order) and seen as one virtual row sequence of N rows;
  * rank r owns the contiguous slice [r*N//W, (r+1)*N//W): every row is read by exactly one rank
    and shares differ by at most one row;
  * a rank opens only the row groups overlapping its slice; when shuffling, rows are shuffled
    within windows of `shuffle_buffer_row_groups` row groups (seeded by seed, epoch, rank, window);
  * every rank yields ceil(ceil(N/W) / B) batches, so all ranks run the same number of
    collective steps. pad_tail=True (eval): every batch has exactly B rows, rows past the rank's
    share are padding (valid=0, label 0, no ids, sample_id -1, group 0). pad_tail=False
    (training): no padding rows; tail batches are smaller (see `batch_sizes`);
  * `iter_epoch(epoch, start_batch=k)` yields exactly the batches k.. of an uninterrupted epoch,
    skipping whole windows without reading them.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
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
from .manifest import GROUP_COLUMN, FieldSpec, Manifest, confined_path
from .storage import Location, StorageUnavailable, describe, resolve
from .tokens import lookup_weights
from .validate import check_part, validate_row_group



@dataclass(frozen=True)
class _Rows:
    """Decoded rows. Categorical ids sit in one (C, n) matrix so shuffling is one fancy-index and
    a batch's KJT values (field-major) are one ravel; sequence fields stay Arrow list arrays;
    numeric values sit in one (N, n) matrix like the ids."""

    labels: np.ndarray  # (n,) float32
    groups: np.ndarray  # (n,) int64
    sample_ids: np.ndarray  # (n,) int64
    ids: np.ndarray  # (C, n) int64, categorical fields in manifest order
    lists: tuple[pa.Array, ...]  # one list<int> array per sequence field, manifest order
    numbers: np.ndarray  # (N, n) float32, numeric fields in manifest order; NaN = missing

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> "_Rows":
        return _Rows(
            self.labels[start:stop], self.groups[start:stop], self.sample_ids[start:stop],
            self.ids[:, start:stop], tuple(a.slice(start, stop - start) for a in self.lists),
            self.numbers[:, start:stop],
        )

    def take(self, index: np.ndarray) -> "_Rows":
        return _Rows(
            self.labels[index], self.groups[index], self.sample_ids[index],
            self.ids[:, index], tuple(a.take(pa.array(index)) for a in self.lists), self.numbers[:, index],
        )

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]
        return _Rows(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.groups for p in parts]),
            np.concatenate([p.sample_ids for p in parts]),
            np.concatenate([p.ids for p in parts], axis=1),
            tuple(pa.concat_arrays([p.lists[i] for p in parts]) for i in range(len(parts[0].lists))),
            np.concatenate([p.numbers for p in parts], axis=1),
        )


class _VerifiedFile:
    """A read-only file that serves only byte ranges whose sha256 matched the manifest. pyarrow
    parses exactly the bytes that were verified; a read outside them is an error, never a
    silent fetch of unverified data."""

    def __init__(self, size: int, where: str) -> None:
        self._size, self._where = size, where
        self._spans: dict[int, bytes] = {}
        self._pos = 0
        self.closed = False

    def add(self, start: int, data: bytes) -> None:
        self._spans[start] = data

    def drop(self, start: int) -> None:
        self._spans.pop(start, None)

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else n
        for start, data in self._spans.items():
            if start <= self._pos and self._pos + n <= start + len(data):
                out = data[self._pos - start : self._pos - start + n]
                self._pos += n
                return out
        raise DataError(f"{self._where}: read of bytes [{self._pos}, {self._pos + n}) outside the verified row groups")

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self._spans.clear()


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
        shuffle_buffer_rows: int | None = None,
        prefetch: bool = True,
        max_open_files: int = 16,
        pad_tail: bool = True,
        verify: bool = True,
        retry_seconds: float | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if local_batch_size < 1:
            raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
        if shuffle_buffer_row_groups < 1:
            raise ValueError(f"shuffle_buffer_row_groups must be >= 1, got {shuffle_buffer_row_groups}")
        # retry_seconds: transient storage errors (refused connections, timeouts, 5xx,
        # throttling) are retried for this long before the read fails (None: the default).
        self.loc: Location = resolve(dataset_url, storage_options, retry_seconds)
        self.manifest = manifest
        self.split = split
        self.info = manifest.split(split)
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = local_batch_size
        self.shuffle, self.seed = shuffle, seed
        self.shuffle_buffer_row_groups = shuffle_buffer_row_groups
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.pad_tail = pad_tail
        # Checksums while reading: each row group's bytes against the manifest's spans (or,
        # for manifests written before spans existed, each part's sha256 when first opened).
        self.verify = verify
        self._verified_parts: set[int] = set()
        self.max_open_files = max(1, max_open_files)
        self._fields: list[FieldSpec] = list(manifest.fields)
        self._cat = [f.name for f in self._fields if f.kind == "categorical"]
        self._seq = [f.name for f in self._fields if f.kind == "sequence"]
        self._num = [f.name for f in self._fields if f.kind == "numeric"]
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
        """Consecutive pieces shuffled together: shuffle_buffer_row_groups row groups, grown
        until the window holds at least shuffle_buffer_rows rows (when given)."""
        pieces = self._pieces(epoch)
        min_groups = self.shuffle_buffer_row_groups if self.shuffle else 1
        min_rows = (self.shuffle_buffer_rows or 0) if self.shuffle else 0
        windows: list[_Window] = []
        first, chunk = 0, []
        for piece in pieces:
            chunk.append(piece)
            rows = sum(p.rows for p in chunk)
            if len(chunk) >= min_groups and rows >= min_rows:
                windows.append(_Window(tuple(chunk), first, rows, len(windows)))
                first, chunk = first + rows, []
        if chunk:
            rows = sum(p.rows for p in chunk)
            windows.append(_Window(tuple(chunk), first, rows, len(windows)))
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
        if self.pad_tail:
            sizes = [size] * (rows // size) + ([rows % size] if rows % size else [])
            return sizes + [0] * (total - len(sizes))
        # Every rank checks every rank's plan, so all raise together (a rank that failed alone
        # would leave the others blocked in a collective).
        plans = [self._train_sizes(hi - lo, total) for lo, hi in map(self._share, range(self.world_size))]
        if any(plan is None for plan in plans):
            raise ValueError(
                f"split {self.split!r} has {self.num_rows} rows: too few for {self.world_size} "
                f"workers at local batch {size} (training needs at least 2 rows in every batch)"
            )
        return plans[self.rank]  # type: ignore[return-value]

    def _train_sizes(self, rows: int, total: int) -> list[int] | None:
        """pad_tail=False batch sizes of a share of `rows` rows; None if some batch would hold
        fewer than 2 rows."""
        size = self.local_batch_size
        sizes = [size] * (rows // size) + ([rows % size] if rows % size else [])
        if len(sizes) < total:
            if not sizes or sizes[-1] < 4:
                return None
            last = sizes.pop()
            sizes += [last - 2, 2]
        if len(sizes) >= 2 and sizes[-1] < 2:
            sizes[-2] -= 2 - sizes[-1]
            sizes[-1] = 2
        return sizes if all(s >= 2 for s in sizes) else None

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

        buffer: list[_Rows] = []
        buffered = 0
        produced = start_batch
        for rows_read, window in self._read_windows(epoch, todo):
            if window.first < skip:
                rows_read = rows_read.slice(skip - window.first, len(rows_read))
            buffer.append(rows_read)
            buffered += len(rows_read)
            while produced < total and sizes[produced] > 0 and buffered >= sizes[produced]:
                rows, buffer = _take(buffer, sizes[produced])
                buffered -= sizes[produced]
                yield self._to_batch(rows, self.local_batch_size if self.pad_tail else sizes[produced])
                produced += 1
        while produced < total:  # padding-only batches keep ranks in lock-step
            rows, buffer = _take(buffer, sizes[produced]) if sizes[produced] else (None, buffer)
            yield self._to_batch(rows, self.local_batch_size if self.pad_tail else sizes[produced])
            produced += 1

    def _read_windows(self, epoch: int, windows: list[_Window]) -> Iterator[tuple[_Rows, _Window]]:
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

    def _read_window(self, epoch: int, window: _Window) -> _Rows:
        rows = _Rows.concat([self._read_piece(p) for p in window.pieces])
        if self.shuffle and len(rows) > 1:
            rng = np.random.default_rng([self.seed, epoch, self.rank, window.index])
            rows = rows.take(rng.permutation(len(rows)))
        return rows

    def _read_piece(self, piece: _Piece) -> _Rows:
        group = piece.group
        pf = self._file(group.part)
        where = f"{self._url(group.part)} row group {group.index}"
        handle = self._files[group.part][0]
        span_start = None
        if isinstance(handle, _VerifiedFile):
            span_start = self._load_span(group.part, group.index, handle)
        try:
            if span_start is None:  # reads through the fsspec handle: may meet an outage
                table = self.loc.retry(lambda: pf.read_row_group(group.index, columns=self._columns), where)
            else:  # verified bytes already in memory
                table = pf.read_row_group(group.index, columns=self._columns)
        except (DataError, StorageUnavailable):
            raise
        except Exception as exc:
            raise DataError(f"{where}: cannot read ({describe(exc, self.loc.storage_options)}); corrupt or truncated Parquet?") from None
        finally:
            if span_start is not None:
                handle.drop(span_start)
        if table.num_rows != group.rows:
            raise DataError(f"{where}: has {table.num_rows} rows, manifest says {group.rows}")
        validate_row_group(table, self.manifest, where)
        table = table.slice(piece.start, piece.rows)
        n = table.num_rows
        ids = np.empty((len(self._cat), n), dtype=np.int64)
        for i, name in enumerate(self._cat):
            ids[i] = table.column(name).to_numpy()
        numbers = np.empty((len(self._num), n), dtype=np.float32)
        for i, name in enumerate(self._num):  # validated finite, so NaN can mark the nulls
            numbers[i] = table.column(name).cast(pa.float32()).fill_null(np.nan).to_numpy()
        # Group ids are 64-bit hashes and must stay exact, else distinct groups merge in gAUC.
        # validate_row_group refused nulls, so the column converts as integers; to_numpy() of one
        # with nulls would go through float64 (ids above 2**53 rounded, nulls -> int64 min).
        groups = table.column(GROUP_COLUMN).to_numpy()
        if groups.dtype.kind not in "iu":
            raise DataError(f"{where}: column {GROUP_COLUMN!r} read as {groups.dtype}; expected 64-bit integer group ids")
        return _Rows(
            labels=table.column(self.manifest.label).to_numpy().astype(np.float32, copy=False),
            groups=groups.astype(np.int64, copy=False),
            sample_ids=np.arange(group.first_row + piece.start, group.first_row + piece.stop, dtype=np.int64),
            ids=ids,
            lists=tuple(table.column(name).combine_chunks() for name in self._seq),
            numbers=numbers,
        )

    # ---- files --------------------------------------------------------------------------------

    def _url(self, part: int) -> str:
        return self.loc.url_of(self.info.parts[part].path)

    def _fetch(self, part: int, start: int, end: int) -> bytes:
        info, url = self.info.parts[part], self._url(part)
        path = self.loc.path(info.path)
        try:
            data = self.loc.retry(lambda: self.loc.fs.cat_file(path, start=start, end=end), url)
        except FileNotFoundError:
            raise DataError(f"{url}: part file missing (listed in the manifest)") from None
        except (DataError, StorageUnavailable):
            raise
        except Exception as exc:
            raise self.loc.error(f"{url}: cannot read bytes [{start}, {end})", exc) from None
        return data

    def _checked(self, part: int, index: int, data: bytes, start: int) -> None:
        end, digest = self.info.parts[part].spans[index]
        what = "footer" if index == len(self.info.parts[part].row_groups) else f"row group {index}"
        if len(data) != end - start or not hmac.compare_digest(hashlib.sha256(data).hexdigest(), digest):
            raise DataError(
                f"{self._url(part)} {what} does not match its sha256 in the manifest "
                "(the part was changed or swapped after prepare; run `check` on the dataset)"
            )

    def _load_span(self, part: int, index: int, handle: _VerifiedFile) -> int:
        spans = self.info.parts[part].spans
        start = spans[index - 1][0] if index else 0
        data = self._fetch(part, start, spans[index][0])
        self._checked(part, index, data, start)
        handle.add(start, data)
        return start

    def _open_verified(self, part: int) -> tuple[_VerifiedFile, pq.ParquetFile]:
        info, url = self.info.parts[part], self._url(part)
        spans = info.spans
        start, end = spans[-2][0], spans[-1][0]
        footer = self._fetch(part, start, end)
        self._checked(part, len(spans) - 1, footer, start)
        try:
            metadata = pq.read_metadata(pa.BufferReader(footer))
            handle = _VerifiedFile(end, url)
            pf = pq.ParquetFile(handle, metadata=metadata, pre_buffer=False)
        except Exception as exc:
            raise DataError(f"{url}: not a readable Parquet file ({describe(exc, self.loc.storage_options)}); corrupt or truncated?") from None
        return handle, pf

    def _verify_whole(self, part: int) -> None:
        """Manifests without spans: the part's sha256, streamed once per reader."""
        info, url = self.info.parts[part], self._url(part)

        def stream() -> str:  # whole, so a retry starts the digest over
            digest = hashlib.sha256()
            with self.loc.fs.open(self.loc.path(info.path), "rb") as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
            return digest.hexdigest()

        try:
            hexdigest = self.loc.retry(stream, url)
        except FileNotFoundError:
            raise DataError(f"{url}: part file missing (listed in the manifest)") from None
        except StorageUnavailable:
            raise
        except Exception as exc:
            raise self.loc.error(f"{url}: cannot read", exc) from None
        if not hmac.compare_digest(hexdigest, info.sha256):
            raise DataError(f"{url}: sha256 does not match the manifest (the part was changed or swapped after prepare)")
        self._verified_parts.add(part)

    def _file(self, part: int) -> pq.ParquetFile:
        """Open each part once and keep a few open (bounded: one handle per part would not scale)."""
        if part in self._files:
            self._files.move_to_end(part)
            return self._files[part][1]
        info, url = self.info.parts[part], self._url(part)
        # Also for manifests that did not come through load_manifest (which checks them all).
        path = confined_path(self.loc, info.path, f"splits.{self.split}.parts[{part}]")
        if self.verify and info.spans is not None:
            handle, pf = self._open_verified(part)
            check_part(pf, self.manifest, url, info.row_groups)
            self._remember(part, handle, pf)
            return pf
        if self.verify and part not in self._verified_parts:
            self._verify_whole(part)
        opened = [False]  # whether the failing attempt got as far as parsing

        def open_part() -> tuple[Any, pq.ParquetFile]:
            # No fsspec read cache: pyarrow coalesces a row group's column reads (pre_buffer).
            opened[0] = False
            handle = self.loc.fs.open(path, "rb", **({} if self.loc.is_local else {"cache_type": "none"}))
            opened[0] = True
            try:
                return handle, pq.ParquetFile(handle, pre_buffer=True)
            except BaseException:
                handle.close()
                raise

        try:
            handle, pf = self.loc.retry(open_part, url)
        except FileNotFoundError:
            raise DataError(f"{url}: part file missing (listed in the manifest)") from None
        except StorageUnavailable:
            raise
        except Exception as exc:
            if not opened[0]:
                raise self.loc.error(f"{url}: cannot open", exc) from None
            raise DataError(f"{url}: not a readable Parquet file ({describe(exc, self.loc.storage_options)}); corrupt or truncated?") from None
        check_part(pf, self.manifest, url, info.row_groups)
        self._remember(part, handle, pf)
        return pf

    def _remember(self, part: int, handle: Any, pf: pq.ParquetFile) -> None:
        self._files[part] = (handle, pf)
        while len(self._files) > self.max_open_files:
            _, (old, _) = self._files.popitem(last=False)
            old.close()

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

    def _to_batch(self, rows: _Rows | None, size: int) -> Batch:
        """`size` rows (the first len(rows) real, the rest padding) -> Batch."""
        n = len(rows) if rows is not None else 0
        labels = np.zeros(size, dtype=np.float32)
        groups = np.zeros(size, dtype=np.int64)
        sample_ids = np.full(size, -1, dtype=np.int64)
        valid = np.zeros(size, dtype=np.float32)
        lengths = np.zeros((len(self._fields), size), dtype=np.int32)  # (F, B), field-major
        weights = np.empty(0, dtype=np.float32) if self._num else None
        if rows is None or n == 0:
            values = np.empty(0, dtype=np.int64)
        elif not self._seq and not self._num and rows.ids.all():
            # Fast path (e.g. every BARS / Criteo dataset): one id per field and row, no PAD.
            values = rows.ids.ravel()  # (C*n,) field-major, as the KJT wants
            lengths[:, :n] = 1
        else:
            values, weights = self._jagged(rows, lengths)
        if n:
            labels[:n] = rows.labels
            groups[:n] = rows.groups
            sample_ids[:n] = rows.sample_ids
            valid[:n] = 1.0
        kjt = KeyedJaggedTensor(
            keys=[f.name for f in self._fields],
            values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
            lengths=torch.from_numpy(lengths.ravel()),
            weights=None if weights is None else torch.from_numpy(weights),
        )
        return Batch(
            sparse_features=kjt,
            labels=torch.from_numpy(labels),
            group_ids=torch.from_numpy(groups),
            sample_ids=torch.from_numpy(sample_ids),
            valid=torch.from_numpy(valid),
        )

    def _jagged(self, rows: _Rows, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """General case: PAD (id 0) removed everywhere, sequence fields flattened. Fills `lengths`.

        Returns (values, weights): weights (len(values),) float32 when the dataset has numeric
        fields (see `lookup_weights`), else None."""
        n = len(rows)
        values: list[np.ndarray] = []
        cat = seq = num = 0
        for f, spec in enumerate(self._fields):
            if spec.kind == "categorical":
                ids = rows.ids[cat]
                cat += 1
                present = ids != 0  # PAD means "no id": zero length, pools to the zero vector
                lengths[f, :n] = present
                values.append(ids[present])
            elif spec.kind == "numeric":
                present = ~np.isnan(rows.numbers[num])  # missing: no lookup, the zero vector
                num += 1
                lengths[f, :n] = present
                values.append(np.zeros(int(present.sum()), dtype=np.int64))  # the one row, id 0
            else:
                column = rows.lists[seq]
                seq += 1
                ids = pc.list_flatten(column).to_numpy().astype(np.int64, copy=False)
                row_lengths = pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int32)
                pad = ids == 0
                if pad.any():  # tolerate explicit PAD inside lists: drop it, shorten the row
                    owner = np.repeat(np.arange(n), row_lengths)
                    row_lengths -= np.bincount(owner[pad], minlength=n).astype(np.int32)
                    ids = ids[~pad]
                lengths[f, :n] = row_lengths
                values.append(ids)
        if not self._num:
            return np.concatenate(values), None
        weights, num = [], 0
        for f, spec in enumerate(self._fields):
            weights.append(lookup_weights(spec.kind, lengths[f, :n], rows.numbers[num] if spec.kind == "numeric" else None))
            num += spec.kind == "numeric"
        return np.concatenate(values), np.concatenate(weights)


def _take(buffer: list[_Rows], k: int) -> tuple[_Rows | None, list[_Rows]]:
    """Split the first k rows off a list of row blocks (views; one copy when spanning blocks)."""
    if k == 0:
        return None, buffer
    taken: list[_Rows] = []
    need = k
    while need:
        head = buffer[0]
        if len(head) <= need:
            taken.append(head)
            need -= len(head)
            buffer = buffer[1:]
        else:
            taken.append(head.slice(0, need))
            buffer = [head.slice(need, len(head)), *buffer[1:]]
            need = 0
    return _Rows.concat(taken), buffer
