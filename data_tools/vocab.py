"""Per-field vocabularies fit on the TRAIN split, in two modes.

counted (`Vocabulary`): 0 = PAD, 1..n = tokens seen >= min_count times in train (sorted by UTF-8
    bytes, so ids never depend on input order or chunking), n+1 = OOV (unseen, rare or missing
    values). vocab_size = n + 2. Needs one counting pass over train. Saved with the dataset as
    vocab/<field>.parquet (token, id, count; see data_tools.pipeline).
hashed (`HashedVocabulary`): id = 1 + (stable_hash(value) mod buckets), vocab_size = buckets + 1.
    No counting pass and no state: the same raw value gets the same id in every split, file,
    process and machine. There is no OOV row: an unseen value is just another value that lands in
    a bucket (collisions share a row). A missing value ("" or null) is hashed as the empty string,
    so it has its own (shared) bucket; PAD (0) is never produced. For unbounded industrial ids.

stable_hash is SipHash-2-4 of the value's UTF-8 bytes with pandas' fixed key ("0123456789123456"),
computed by `pandas.util.hash_array`: vectorised, independent of PYTHONHASHSEED, and the same hash
the converters already use for the `_group` column. Non-string values are hashed as their
decimal text (Arrow's cast to string), so an int64 id 123 and the string "123" share a bucket.

Bounded-memory counting (`VocabCounter`, used by every converter). Exact counts of a
Criteo-sized train split (45M rows, ~34M distinct tokens over 39 fields) take ~1 GB as one Arrow
table, 2-3 GB while aggregating it, ~6 GB as Python dicts, and grow with the data. The counter
keeps per-batch partial counts as Arrow tables (field, token, count); past a quarter of
`memory_budget` bytes it aggregates them (group-by sum), and an aggregate still over an eighth
of the budget is *spilled*: hash-partitioned by token_hash(token) into `partitions` record
batches of one Arrow IPC run file on local disk. At the end (the in-memory rest spilled as a
last run) each partition is merged on its own from its batch of every run (read from the file,
not memory-mapped: mapped pages count in the process's RSS), filtered by min_count, and only
the kept tokens and their counts stay in memory.
Peak memory of counting is about the budget (the pending quarter, the group-by's working set,
the spill's sorted copy; measured: Arrow's pool peaked at 342 MiB with a 256 MiB budget on a
5M-row Criteo-shaped input) and, while merging, one partition (~distinct tokens x 24 bytes /
partitions). Nothing on the way holds one Python object per token: token_hash works on Arrow's
buffers with numpy (measured: the earlier spill, through stable_hash's Python strings, held
more memory than the counts it spilled).
Why hash-partitioned spilling rather than a count-min sketch followed by an exact pass over
candidates: it is exact, reads the input once (the sketch needs a second counting pass, i.e.
a third read of train for Criteo), the spill volume is proportional to distinct tokens (each
run is already aggregated), and the same partial-count tables are what the Ray engine's shard
tasks return and the driver merges (see data_tools.engine).
The kept vocabulary itself must fit in memory (`Vocabulary`: ~30 bytes + the token per entry):
use min_count or hashed mode for fields with hundreds of millions of ids. The merge keeps one
open file per spill run (a smaller budget spills more often): raise vocab_memory_mb for inputs
of billions of rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tf4ctr_dist.data.tokens import MISSING, as_strings, stable_hash  # noqa: F401  (data_tools' names)

HASH_NAME = "siphash24-utf8 (pandas.util.hash_array); id = 1 + hash mod buckets"
# Bytes the counting may use (VocabCounter). 64 MiB: measured no slower than 256 MiB on 10M
# Criteo-shaped rows (58k vs 60k rows/s) with a lower peak (648 vs 727-760 MiB), and 1M rows
# already spill, so the peak is the same regime at every input size (565 MiB at 1M).
DEFAULT_MEMORY_BUDGET = 64 << 20
DEFAULT_PARTITIONS = 64

COUNT_SCHEMA = pa.schema([("field", pa.int32()), ("token", pa.string()), ("count", pa.int64())])


def hash_ids(column: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """int64 ids 1 + stable_hash mod buckets, in [1, buckets]."""
    return (stable_hash(column) % np.uint64(buckets)).astype(np.int64) + 1


class HashedVocabulary:
    """vocab_mode "hashed": no fitting, no state but the bucket count."""

    mode = "hashed"

    def __init__(self, buckets: int) -> None:
        if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
            raise ValueError(f"buckets must be a positive integer, got {buckets!r}")
        self.buckets = buckets

    @property
    def size(self) -> int:
        """Embedding rows: PAD + buckets."""
        return self.buckets + 1

    def lookup(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return hash_ids(column, self.buckets)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_POLY = np.uint64(0x100000001B3)  # FNV-64 prime: the per-byte multiplier of token_hash
_POWERS = np.ones(1, dtype=np.uint64)
_HASH_SLICE = 1 << 17  # strings per vectorised step: bounds token_hash's temporaries (~24 B per byte)


def _powers(n: int) -> np.ndarray:
    """_POLY ** k (mod 2^64) for k < n, grown on demand."""
    global _POWERS
    if len(_POWERS) < n:
        size = max(n, 2 * len(_POWERS))
        grown = np.full(size, _POLY, dtype=np.uint64)
        grown[0] = 1
        _POWERS = np.multiply.accumulate(grown)  # wraps mod 2^64, as intended
    return _POWERS[:n]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the polynomial hash over all 64 bits."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def token_hash(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 hash of every string, computed on Arrow's buffers with numpy (no Python objects).

    Internal only (spill partitions, vocabulary lookup); never stored, so it may change. Not
    stable_hash: that one goes through one Python str per distinct value, which at the counting
    scale (millions of distinct tokens per spill) cost more memory than the counts themselves.
    """
    strings = as_strings(strings)
    width = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    n = len(strings)
    out = np.empty(n, dtype=np.uint64)
    buffers = strings.buffers()
    offsets = np.frombuffer(buffers[1], dtype=width, count=n + 1, offset=strings.offset * np.dtype(width).itemsize)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.empty(0, np.uint8)
    for a in range(0, n, _HASH_SLICE):
        b = min(n, a + _HASH_SLICE)
        o = offsets[a : b + 1].astype(np.int64)
        lengths = np.diff(o)
        total = int(o[-1] - o[0])
        h = lengths.astype(np.uint64) * _M2
        if total:
            starts = o[:-1] - o[0]
            pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
            terms = (data[o[0] : o[-1]].astype(np.uint64) + np.uint64(1)) * _powers(int(lengths.max()))[pos]
            nonempty = lengths > 0
            h[nonempty] += np.add.reduceat(terms, starts[nonempty])
        out[a:b] = _mix(h)
    return out


class Vocabulary:
    """vocab_mode "counted": tokens in id order (id = position + 1), with their train counts.

    Stored compactly: the tokens as one Arrow string array, their token_hash, and an
    open-addressing table (slot -> position, linear probing, load <= 1/2) built with numpy:
    ~30 bytes + the token's bytes per entry, where a pandas Index of Python strings took ~100.
    lookup() probes the table for each distinct value of a column and confirms a hash match by
    comparing the tokens themselves, so a collision can never give a value another value's id.
    """

    mode = "counted"

    def __init__(self, tokens: pa.Array | Sequence[str], counts: np.ndarray | None = None) -> None:
        tokens = pa.array(tokens, pa.string()) if not isinstance(tokens, (pa.Array, pa.ChunkedArray)) else tokens
        self._tokens = as_strings(tokens)
        n = len(self._tokens)
        self.counts = np.asarray(counts, dtype=np.int64) if counts is not None else np.zeros(n, dtype=np.int64)
        if len(self.counts) != n:
            raise ValueError(f"{n} tokens but {len(self.counts)} counts")
        self._hashes = token_hash(self._tokens)
        self._mask = (1 << max(4, (2 * n - 1).bit_length())) - 1
        self._table = np.full(self._mask + 1, -1, dtype=np.int32 if n < 2**31 - 1 else np.int64)
        pending = np.arange(n, dtype=np.int64)
        slot = (self._hashes & np.uint64(self._mask)).astype(np.int64)
        while pending.size:
            free = np.flatnonzero(self._table[slot] == -1)
            taken, first = np.unique(slot[free], return_index=True)  # one winner per free slot
            self._table[taken] = pending[free[first]]
            placed = np.zeros(len(pending), dtype=bool)
            placed[free[first]] = True
            pending, slot = pending[~placed], (slot[~placed] + 1) & self._mask

    @property
    def tokens(self) -> list[str]:
        """The tokens as Python strings (for tests and small vocabularies)."""
        return self._tokens.to_pylist()

    def table(self) -> pa.Table:
        """token, id, count per token, in id order (what vocab/<field>.parquet holds)."""
        n = len(self._tokens)
        return pa.table(
            {"token": self._tokens, "id": pa.array(np.arange(1, n + 1, dtype=np.int64)), "count": pa.array(self.counts)}
        )

    @property
    def size(self) -> int:
        """Embedding rows: PAD + tokens + OOV."""
        return len(self._tokens) + 2

    @property
    def oov(self) -> int:
        return len(self._tokens) + 1

    def lookup(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ids (int64) for a string column; unknown or missing values -> OOV."""
        column = as_strings(column)
        if len(column) == 0:
            return np.empty(0, dtype=np.int64)
        # Look each distinct value up once (Arrow's dictionary encoding is C++).
        encoded = pc.dictionary_encode(column)
        uniques = encoded.dictionary
        ids = np.full(len(uniques), self.oov, dtype=np.int64)
        if len(self._tokens):
            h = token_hash(uniques)
            pending = np.arange(len(uniques), dtype=np.int64)
            slot = (h & np.uint64(self._mask)).astype(np.int64)
            while pending.size:
                pos = self._table[slot]
                filled = pos >= 0  # an empty slot ends the probe: not in the vocabulary
                pending, slot, pos = pending[filled], slot[filled], pos[filled]
                hit = np.flatnonzero(self._hashes[pos] == h[pending])
                if hit.size:
                    same = pc.equal(uniques.take(pa.array(pending[hit])), self._tokens.take(pa.array(pos[hit])))
                    same = same.to_numpy(zero_copy_only=False)
                    ids[pending[hit[same]]] = pos[hit[same]] + 1
                    found = np.zeros(len(pending), dtype=bool)
                    found[hit[same]] = True
                    pending, slot = pending[~found], slot[~found]
                slot = (slot + 1) & self._mask
        return ids[encoded.indices.to_numpy()]


def _sorted_vocabulary(tokens: pa.Array, counts: pa.Array) -> Vocabulary:
    order = pc.sort_indices(tokens)  # UTF-8 byte order: ids independent of input order
    return Vocabulary(pc.take(tokens, order), pc.take(counts, order).to_numpy())


# ---- bounded-memory multi-field counting ----------------------------------------------------


def count_values(field: int, column: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Partial counts (field, token, count) of one string column."""
    counts = pc.value_counts(column)
    if isinstance(counts, pa.ChunkedArray):
        counts = counts.combine_chunks()
    tokens = counts.field("values")
    if not pa.types.is_string(tokens.type):
        tokens = tokens.cast(pa.string())
    return pa.table(
        [pa.array(np.full(len(tokens), field, dtype=np.int32)), tokens, counts.field("counts")],
        schema=COUNT_SCHEMA,
    )


def aggregate_counts(tables: Sequence[pa.Table]) -> pa.Table:
    """Sum counts per (field, token). Row order is unspecified (vocabularies are sorted later)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return COUNT_SCHEMA.empty_table()
    if len(tables) == 1 and tables[0].num_rows <= 1:
        return tables[0]
    merged = pa.concat_tables(tables).group_by(["field", "token"]).aggregate([("count", "sum")])
    return pa.table(
        [merged.column("field"), merged.column("token"), merged.column("count_sum")], schema=COUNT_SCHEMA
    )


class VocabCounter:
    """Exact token counts for several fields within a memory budget (see module docstring).

    add() partial count tables; vocabularies() once at the end; close() (or use as a context
    manager) removes the spill files.
    """

    def __init__(
        self,
        num_fields: int,
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        partitions: int = DEFAULT_PARTITIONS,
        spill_dir: str | None = None,
    ) -> None:
        if memory_budget < 1 or partitions < 1:
            raise ValueError(f"memory_budget and partitions must be >= 1, got {memory_budget}, {partitions}")
        self.num_fields = num_fields
        self.memory_budget = int(memory_budget)
        self.partitions = int(partitions)
        self._spill_parent = spill_dir
        self._spill_dir: str | None = None
        self._runs: list[str] = []
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self.spilled_bytes = 0

    @property
    def spills(self) -> int:
        return len(self._runs)

    def add(self, partial: pa.Table) -> None:
        if not partial.num_rows:
            return
        if partial.schema != COUNT_SCHEMA:
            partial = partial.cast(COUNT_SCHEMA)
        self._pending.append(partial)
        self._pending_bytes += partial.nbytes
        # Aggregating needs about twice what it reads (the group-by's keys and its output), and
        # spilling a table needs a sorted copy of it: holding a quarter of the budget before
        # aggregating and spilling what is still over an eighth keeps the peak within the budget.
        if self._pending_bytes > self.memory_budget // 4:
            merged = aggregate_counts(self._pending)
            self._pending, self._pending_bytes = [], 0
            if merged.nbytes > self.memory_budget // 8:
                self._spill(merged)
            else:
                self._pending, self._pending_bytes = [merged], merged.nbytes

    def _partition_of(self, tokens: pa.Array | pa.ChunkedArray) -> np.ndarray:
        # High bits: the low ones of the same hash pick a vocabulary's lookup slots.
        return ((token_hash(tokens) >> np.uint64(40)) % np.uint64(self.partitions)).astype(np.int32)

    def _spill(self, table: pa.Table) -> None:
        if self._spill_dir is None:
            if self._spill_parent:
                os.makedirs(self._spill_parent, exist_ok=True)
            self._spill_dir = tempfile.mkdtemp(prefix="tf4ctr-vocab-", dir=self._spill_parent)
        partition = self._partition_of(table.column("token"))
        order = np.argsort(partition, kind="stable")
        bounds = np.searchsorted(partition[order], np.arange(self.partitions + 1))
        del partition
        table = table.take(pa.array(order))  # the one copy a spill makes
        del order
        path = os.path.join(self._spill_dir, f"run-{len(self._runs):05d}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, COUNT_SCHEMA) as writer:
            for p in range(self.partitions):  # record batch p of every run = partition p
                rows = table.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p]))
                writer.write_batch(pa.record_batch([c.combine_chunks() for c in rows.columns], schema=COUNT_SCHEMA))
        self._runs.append(path)
        self.spilled_bytes += os.path.getsize(path)

    def _kept(self, table: pa.Table, min_counts: np.ndarray) -> pa.Table:
        """Rows of an aggregated table whose count reaches their field's min_count (not MISSING)."""
        need = pa.array(min_counts[table.column("field").to_numpy()])
        keep = pc.and_(pc.greater_equal(table.column("count"), need), pc.not_equal(table.column("token"), MISSING))
        return table.filter(keep)

    def _merged_partitions(self) -> Iterator[pa.Table]:
        """Aggregated counts, one spill partition at a time."""
        # Plain file reads, not memory maps: the pages of a map stay in the process's RSS
        # until it is closed, which made the merge's RSS the size of all the spill files.
        files = [pa.OSFile(path, "rb") for path in self._runs]
        try:
            readers = [pa.ipc.open_file(f) for f in files]
            for p in range(self.partitions):
                held: list[pa.Table] = []
                held_bytes = 0
                for r in readers:
                    batch = r.get_batch(p)
                    if batch.num_rows:
                        held.append(pa.Table.from_batches([batch]))
                        held_bytes += batch.nbytes
                        if held_bytes > self.memory_budget // 4:  # a partition of very many runs
                            held = [aggregate_counts(held)]
                            held_bytes = held[0].nbytes
                yield aggregate_counts(held)
        finally:
            for f in files:
                f.close()

    def vocabularies(self, min_counts: Sequence[int]) -> list[Vocabulary]:
        """One Vocabulary per field (index = field number in the partial tables)."""
        if len(min_counts) != self.num_fields:
            raise ValueError(f"need {self.num_fields} min_counts, got {len(min_counts)}")
        need = np.asarray(min_counts, dtype=np.int64)
        if not self._runs:
            kept = [self._kept(aggregate_counts(self._pending), need)]
        else:
            if self._pending:
                self._spill(aggregate_counts(self._pending))
            kept = [self._kept(t, need) for t in self._merged_partitions()]
        self._pending, self._pending_bytes = [], 0
        table = pa.concat_tables(kept).combine_chunks()
        del kept
        field = table.column("field").to_numpy()
        out = []
        for f in range(self.num_fields):
            rows = table.filter(pa.array(field == f))
            out.append(_sorted_vocabulary(rows.column("token").combine_chunks(), rows.column("count").combine_chunks()))
        return out

    def close(self) -> None:
        self._pending, self._pending_bytes = [], 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
        self._runs = []

    def __enter__(self) -> "VocabCounter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
