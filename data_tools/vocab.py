"""Per-field vocabularies fit on the TRAIN split, in two modes.

counted (`Vocabulary`): 0 = PAD, 1..n = tokens seen >= min_count times in train (sorted by UTF-8
    bytes, so ids never depend on input order or chunking), n+1 = OOV (unseen, rare or missing
    values). vocab_size = n + 2. Needs one counting pass over train.
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
table, 2-3 GB while aggregating it, ~6 GB as Python dicts, and grow with the data: the earlier
per-field in-memory counter had no bound. The counter therefore keeps per-batch partial counts
as Arrow tables (field, token, count) and, when they exceed `memory_budget` bytes, aggregates
them (group-by sum); when the aggregate is still over half the budget it is *spilled*:
hash-partitioned by stable_hash(token) into `partitions` record batches of one Arrow IPC run
file on local disk. At the end (the in-memory rest spilled as a last run) each partition is
merged on its own from its batch of every run, filtered by min_count, and only the kept tokens
stay in memory.
Peak memory is about the budget (plus the group-by's working set, ~2x the data it aggregates)
during counting and one partition (~distinct tokens / partitions) during the merge.
Why hash-partitioned spilling rather than a count-min sketch followed by an exact pass over
candidates: it is exact, reads the input once (the sketch needs a second counting pass, i.e.
a third read of train for Criteo), the spill volume is proportional to distinct tokens (each
run is already aggregated), and the same partial-count tables are what the Ray engine's shard
tasks return and the driver merges (see data_tools.engine).
The kept vocabulary itself must fit in memory (a pandas Index of the tokens): use min_count or
hashed mode for fields with tens of millions of ids.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MISSING = ""  # an empty cell; never a counted token (-> OOV); hashed like any other value
HASH_NAME = "siphash24-utf8 (pandas.util.hash_array); id = 1 + hash mod buckets"
DEFAULT_MEMORY_BUDGET = 512 << 20  # bytes of partial counts held before spilling (VocabCounter)
DEFAULT_PARTITIONS = 64

COUNT_SCHEMA = pa.schema([("field", pa.int32()), ("token", pa.string()), ("count", pa.int64())])


def as_strings(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string array (dictionary decoded, non-strings as text); null -> "" (missing)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    return column.fill_null(MISSING) if column.null_count else column


def stable_hash(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 SipHash of every value's text (see module docstring); each distinct value once."""
    strings = as_strings(column)
    if len(strings) == 0:
        return np.empty(0, dtype=np.uint64)
    encoded = pc.dictionary_encode(strings)
    uniques = encoded.dictionary.to_numpy(zero_copy_only=False)
    hashed = pd.util.hash_array(np.asarray(uniques, dtype=object), categorize=False)
    return hashed[encoded.indices.to_numpy()]


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


class Vocabulary:
    """vocab_mode "counted": token -> id lookup. Built once; `lookup` is a vectorised hash join."""

    mode = "counted"

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = list(tokens)
        self._index = pd.Index(np.asarray(self.tokens, dtype=object), dtype=object)

    @property
    def size(self) -> int:
        """Embedding rows: PAD + tokens + OOV."""
        return len(self.tokens) + 2

    @property
    def oov(self) -> int:
        return len(self.tokens) + 1

    def lookup(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ids (int64) for a string column; unknown or missing values -> OOV."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if len(column) == 0:
            return np.empty(0, dtype=np.int64)
        # Look each distinct value up once (Arrow's dictionary encoding is C++), as an object
        # Index (pandas would otherwise convert the values to its own string dtype first).
        encoded = pc.dictionary_encode(column)
        uniques = pd.Index(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object)
        ids = self._index.get_indexer(uniques).astype(np.int64)  # -1 when absent
        ids += 1
        ids[ids == 0] = self.oov
        return ids[encoded.indices.to_numpy()]


def _sorted_vocabulary(tokens: pa.Array) -> Vocabulary:
    tokens = pc.take(tokens, pc.sort_indices(tokens))  # UTF-8 byte order: ids independent of input order
    return Vocabulary(tokens.to_pylist())


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
        if self._pending_bytes > self.memory_budget:
            merged = aggregate_counts(self._pending)
            self._pending, self._pending_bytes = [merged], merged.nbytes
            if self._pending_bytes > self.memory_budget // 2:
                self._spill(merged)
                self._pending, self._pending_bytes = [], 0

    def _partition_of(self, tokens: pa.Array | pa.ChunkedArray) -> np.ndarray:
        # High bits: independent of the low bits that hashed vocabularies use for buckets.
        return ((stable_hash(tokens) >> np.uint64(40)) % np.uint64(self.partitions)).astype(np.int64)

    def _spill(self, table: pa.Table) -> None:
        if self._spill_dir is None:
            if self._spill_parent:
                os.makedirs(self._spill_parent, exist_ok=True)
            self._spill_dir = tempfile.mkdtemp(prefix="tf4ctr-vocab-", dir=self._spill_parent)
        part = self._partition_of(table.column("token"))
        order = np.argsort(part, kind="stable")
        table = table.take(pa.array(order))
        bounds = np.searchsorted(part[order], np.arange(self.partitions + 1))
        path = os.path.join(self._spill_dir, f"run-{len(self._runs):05d}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, COUNT_SCHEMA) as writer:
            for p in range(self.partitions):
                batch = table.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])).combine_chunks()
                columns = batch.columns if batch.num_rows else [pa.array([], f.type) for f in COUNT_SCHEMA]
                writer.write_batch(pa.record_batch([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns], schema=COUNT_SCHEMA))
        self._runs.append(path)
        self.spilled_bytes += os.path.getsize(path)

    def _kept(self, table: pa.Table, min_counts: np.ndarray) -> pa.Table:
        """Rows of an aggregated table whose count reaches their field's min_count (not MISSING)."""
        need = pa.array(min_counts[table.column("field").to_numpy()])
        keep = pc.and_(pc.greater_equal(table.column("count"), need), pc.not_equal(table.column("token"), MISSING))
        return table.filter(keep).select(["field", "token"])

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
                self._pending, self._pending_bytes = [], 0
            readers = [pa.ipc.open_file(pa.memory_map(path)) for path in self._runs]
            kept = []
            for p in range(self.partitions):
                batches = [r.get_batch(p) for r in readers]
                kept.append(self._kept(aggregate_counts([pa.Table.from_batches([b]) for b in batches if b.num_rows]), need))
        table = pa.concat_tables(kept).combine_chunks()
        field = table.column("field").to_numpy()
        tokens = table.column("token")
        return [_sorted_vocabulary(pc.filter(tokens, pa.array(field == f))) for f in range(self.num_fields)]

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
