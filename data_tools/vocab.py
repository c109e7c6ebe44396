"""Per-field vocabularies fit on the TRAIN split: 0 = PAD, 1..n = tokens (sorted), n+1 = OOV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MISSING = ""  # an empty cell; never a token, always mapped to OOV
_MERGE_EVERY = 64  # batches of partial counts held before merging (bounds memory and merge cost)


class TokenCounter:
    """Streaming token counts for one field; vectorised with Arrow (no Python loop per row)."""

    def __init__(self) -> None:
        self._partials: list[pa.Table] = []

    def update(self, column: pa.Array | pa.ChunkedArray) -> None:
        counts = pc.value_counts(column)
        if isinstance(counts, pa.ChunkedArray):
            counts = counts.combine_chunks()
        self._partials.append(pa.table({"token": counts.field("values"), "count": counts.field("counts")}))
        if len(self._partials) >= _MERGE_EVERY:
            self._partials = [self._merged()]

    def _merged(self) -> pa.Table:
        if not self._partials:
            return pa.table({"token": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        table = pa.concat_tables(self._partials).group_by("token").aggregate([("count", "sum")])
        return table.rename_columns(["token", "count"]).select(["token", "count"])

    def counts(self) -> dict[str, int]:
        """All tokens with their counts (for tests and small fields)."""
        table = self._merged()
        return dict(zip(table.column("token").to_pylist(), table.column("count").to_pylist()))

    def vocabulary(self, min_count: int) -> "Vocabulary":
        table = self._merged()
        keep = pc.and_(pc.greater_equal(table.column("count"), min_count), pc.not_equal(table.column("token"), MISSING))
        tokens = pc.filter(table.column("token"), keep)
        tokens = pc.take(tokens, pc.sort_indices(tokens))  # sorted by UTF-8 bytes: ids do not depend on input order
        return Vocabulary(tokens.to_pylist())


class Vocabulary:
    """Token -> id lookup. Built once; `lookup` is a vectorised hash join."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = list(tokens)
        self._index = pd.Index(np.asarray(self.tokens, dtype=object))

    @property
    def size(self) -> int:
        """Embedding rows: PAD + tokens + OOV."""
        return len(self.tokens) + 2

    @property
    def oov(self) -> int:
        return len(self.tokens) + 1

    def lookup(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ids (int64) for a string column; unknown or missing values -> OOV."""
        values = column.to_numpy(zero_copy_only=False) if len(column) else np.empty(0, dtype=object)
        ids = self._index.get_indexer(values).astype(np.int64)  # -1 when absent
        ids += 1
        ids[ids == 0] = self.oov
        return ids
