"""Raw feature values -> embedding ids, exactly as `tf4ctr prepare` mapped them.

The rules (the dataset format's, see tf4ctr_dist.data.manifest and data_tools.vocab/fields; the
tokens, hashes and Criteo buckets come from tf4ctr_dist.data.tokens, which the preparation uses
too, and a test holds the two to the same ids on the same raw files):

* Every value is read as text: nulls become "" (missing), non-strings their decimal text
  (Arrow's cast), so an int 123 and the string "123" are the same token.
* counted fields: 0 = PAD, 1..n = the saved tokens in order, n + 1 = OOV (unseen, rare or
  missing values).
* hashed fields: 1 + SipHash-2-4(utf-8 text, pandas' fixed key) mod buckets; missing is hashed
  as "" like any value; there is no OOV row.
* numeric fields are bucketed first (criteo: missing -> 0, v > 2 -> floor(ln(v)^2), else int(v);
  boundaries: number of boundaries <= v, missing -> ""), then mapped as above; or, embedded as
  value x vector (manifest kind numeric), looked up as id 0 with the weight (x - shift) /
  divisor from the dataset's normaliser (spec.vocab; missing: null or "" -> no lookup, a NaN or
  infinite value is refused). With such fields every lookup carries a weight: 1 for an id,
  1/L for each id of a sequence of length L (tf4ctr_dist.data.tokens.lookup_weights).
* sequence fields: a string column split on the field's splitter (or a list column), empty items
  dropped, the first or last max_len kept, each item mapped; PAD never appears.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.tokens import (
    MISSING, as_strings, bucketize_criteo, lookup_weights, missing_values, normalize, stable_hash,
)


def hashed_ids(column: pa.Array, buckets: int) -> np.ndarray:
    """int64 ids 1 + stable hash mod buckets (each distinct value hashed once)."""
    return (stable_hash(column) % np.uint64(buckets)).astype(np.int64) + 1


@dataclass
class FieldMapper:
    """How one field's raw values become ids (built from the manifest's field and spec)."""

    name: str
    kind: str  # categorical | sequence | numeric (bucketised or value x vector)
    vocab_mode: str  # counted | hashed | none (value x vector)
    vocab_size: int
    tokens: Optional[pd.Index] = None  # counted: token -> position (id - 1)
    buckets: Optional[int] = None  # hashed
    bucketing: Any = None  # numeric: "criteo" or {"boundaries": [...]}
    max_len: Optional[int] = None
    splitter: str = "|"
    keep: str = "first"
    shift: Optional[float] = None  # numeric value x vector: weight = (x - shift) / divisor
    divisor: float = 1.0

    @property
    def stored_kind(self) -> str:
        """The manifest's kind: what the model's lookups of this field are."""
        if self.shift is not None:
            return "numeric"
        return "sequence" if self.kind == "sequence" else "categorical"

    @property
    def oov(self) -> int:
        return self.vocab_size - 1

    def lookup(self, strings: pa.Array) -> np.ndarray:
        """Ids of a string array (no sequence handling)."""
        if self.vocab_mode == "hashed":
            assert self.buckets is not None
            return hashed_ids(strings, self.buckets)
        strings = as_strings(strings)
        if len(strings) == 0:
            return np.empty(0, dtype=np.int64)
        encoded = pc.dictionary_encode(strings)
        uniques = encoded.dictionary.to_numpy(zero_copy_only=False)
        pos = self.tokens.get_indexer(np.asarray(uniques, dtype=object)) if len(self.tokens) else np.full(len(uniques), -1)
        ids = np.where(pos >= 0, pos + 1, self.oov).astype(np.int64)
        # "" is never a counted token, whatever the index holds
        ids[np.asarray(uniques, dtype=object) == MISSING] = self.oov
        return ids[encoded.indices.to_numpy()]

    def numeric_tokens(self, column: pa.Array) -> pa.Array:
        try:
            values = as_numeric(column)
        except (pa.ArrowInvalid, ValueError) as e:
            raise DataError(f"field {self.name!r}: numeric values expected ({e})") from None
        if self.bucketing == "criteo":
            return pa.array(bucketize_criteo(values)).cast(pa.string())
        boundaries = np.asarray(self.bucketing["boundaries"], dtype=np.float64)
        tokens = pa.array(np.searchsorted(boundaries, values, side="right")).cast(pa.string())
        missing = np.isnan(values)
        return pc.if_else(pa.array(missing), pa.scalar(MISSING), tokens) if missing.any() else tokens

    def values(self, column: pa.Array) -> np.ndarray:
        """A value x vector field's weights (n,) float32 after the normaliser, NaN where missing."""
        missing = missing_values(column)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = pc.utf8_trim_whitespace(column)  # as `prepare` reads a CSV cell
        try:
            x = as_numeric(column)
        except (pa.ArrowInvalid, ValueError) as e:
            raise DataError(f"field {self.name!r}: numeric values expected ({e})") from None
        bad = np.flatnonzero(~np.isfinite(x) & ~missing)
        if bad.size:
            raise DataError(f"field {self.name!r}: row {int(bad[0])} has the value {x[bad[0]]}; expected a finite "
                            "number, or null / empty for a missing value")
        return normalize(np.where(missing, np.nan, x), float(self.shift or 0.0), self.divisor)

    def lookups(self, column: pa.Array, weighted: bool) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(values, lengths, weights) of the field for n rows: lengths (n,) int32, values
        (sum lengths,) ids, weights (sum lengths,) float32 when ``weighted`` (the model has
        value x vector fields), else None."""
        if self.stored_kind == "numeric":
            x = self.values(column)
            lengths = (~np.isnan(x)).astype(np.int32)
            return np.zeros(int(lengths.sum()), np.int64), lengths, lookup_weights("numeric", lengths, x)
        values, lengths = self.ids(column)
        return values, lengths, lookup_weights(self.stored_kind, lengths) if weighted else None

    def ids(self, column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(values, lengths) of an id field for n rows: lengths (n,) int32, values (sum lengths,)."""
        n = len(column)
        if self.kind == "sequence":
            lists = self._lists(column)
            values = self.lookup(lists.values) if len(lists.values) else np.empty(0, np.int64)
            return values, np.diff(lists.offsets.to_numpy()).astype(np.int32)
        strings = self.numeric_tokens(column) if self.kind == "numeric" else column
        values = self.lookup(strings)
        present = values != 0
        return values[present], present.astype(np.int32)[:n]

    def _lists(self, column: pa.Array) -> pa.ListArray:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            column = pc.split_pattern(as_strings(column), pattern=self.splitter)
        n = len(column)
        if n == 0:
            return pa.array([], pa.list_(pa.string()))
        items = as_strings(pc.list_flatten(column))
        parents = pc.list_parent_indices(column).to_numpy()
        good = pc.not_equal(items, MISSING).to_numpy(zero_copy_only=False)
        items, parents = items.filter(pa.array(good)), parents[good]
        lengths = np.bincount(parents, minlength=n)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pos = np.arange(len(parents)) - starts[parents]
        if self.keep == "last":
            pos = lengths[parents] - 1 - pos
        kept = pos < int(self.max_len or 0)
        if not kept.all():
            items = items.filter(pa.array(kept))
            lengths = np.minimum(lengths, self.max_len)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), items)


def as_numeric(column: pa.Array) -> np.ndarray:
    """float64 values, NaN for null / "" (text is parsed)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
    return column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


def build_mappers(fields: Sequence[Mapping[str, Any]], spec: Mapping[str, Any],
                  vocabularies: Mapping[str, Sequence[str]]) -> list[FieldMapper]:
    """One FieldMapper per manifest field. ``fields``: the manifest's field dicts; ``spec``: its
    spec (spec.vocab says kind/bucketing/splitter per field); ``vocabularies``: the saved tokens
    of every counted field, in id order."""
    described = spec.get("vocab") or {}
    mappers = []
    for f in fields:  # spec.vocab's shape was checked when its manifest was parsed (data.manifest)
        info = described.get(f["name"]) or {}
        mode = f.get("vocab_mode", "counted")
        kind = info.get("kind", f["kind"])
        m = FieldMapper(name=f["name"], kind=kind, vocab_mode=mode, vocab_size=int(f["vocab_size"]),
                        bucketing=info.get("bucketing"), max_len=f.get("max_len") or info.get("max_len"),
                        splitter=info.get("splitter", "|"), keep=info.get("keep", "first"))
        if f["kind"] == "numeric":
            shift, divisor = info.get("shift"), info.get("divisor")
            if not isinstance(shift, (int, float)) or not isinstance(divisor, (int, float)) or not divisor:
                raise DataError(f"numeric field {f['name']!r}: the manifest's spec.vocab gives no normaliser "
                                f"(shift, divisor), got {shift!r}, {divisor!r}")
            m.shift, m.divisor = float(shift), float(divisor)
            mappers.append(m)
            continue
        if mode == "hashed":
            m.buckets = int(info.get("buckets") or f["vocab_size"] - 1)
        else:
            if f["name"] not in vocabularies:
                raise DataError(f"field {f['name']!r}: counted field without a saved vocabulary "
                                "(the dataset's manifest lists no vocab file for it)")
            tokens = list(vocabularies[f["name"]])
            if len(tokens) + 2 != m.vocab_size:
                raise DataError(f"field {f['name']!r}: {len(tokens)} saved tokens but vocab_size {m.vocab_size} "
                                "(expected tokens + PAD + OOV)")
            m.tokens = pd.Index(tokens, dtype=object)
        if kind == "numeric" and m.bucketing is None:
            raise DataError(f"numeric field {f['name']!r}: the manifest's spec gives no bucketing")
        mappers.append(m)
    return mappers


def to_table(rows: Any, names: Sequence[str], lists: Collection[str] = ()) -> pa.Table:
    """Raw rows as an Arrow table with (at least) the columns ``names``.

    rows: a pyarrow Table, a pandas DataFrame, a dict column -> list of values, or a list of
    dicts (one per row). A missing column is a DataError naming it. Each of ``names`` holds
    one value (text, a number or null) per row; those in ``lists`` (the sequence fields) may
    hold a list of such values instead. Anything else (an object, a list where one value
    belongs, a list of lists) is a DataError naming the first such row and its field: the
    mappers' casts to text have no rule for it."""
    lists = set(lists)
    if isinstance(rows, pa.Table):
        table = rows
    elif isinstance(rows, pd.DataFrame):
        table = pa.Table.from_pandas(rows, preserve_index=False)
    elif isinstance(rows, Mapping):
        lengths = {k: len(v) for k, v in rows.items() if isinstance(v, (list, tuple, np.ndarray, pa.Array))}
        if len(lengths) != len(rows):
            bad = sorted(k for k in rows if k not in lengths)
            raise DataError(f"columns {bad}: expected a list of values per column")
        if len(set(lengths.values())) > 1:
            raise DataError(f"columns have different lengths: {lengths}")
        # the feature columns only: another (an id the caller keeps) is not read, so not refused
        table = pa.table({k: _column(k, v, k in lists) for k, v in rows.items() if k in names})
    elif isinstance(rows, (list, tuple)):
        if not all(isinstance(r, Mapping) for r in rows):
            raise DataError("rows: expected a list of objects (column -> value)")
        table = pa.table({k: _column(k, [r.get(k) for r in rows], k in lists) for k in names}) if rows else \
            pa.table({k: pa.array([], pa.string()) for k in names})
    else:
        raise DataError(f"rows: expected a dict of columns, a list of row objects, a pyarrow table or a "
                        f"pandas frame, got {type(rows).__name__}")
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise DataError(f"rows: missing feature column(s) {missing}; the model needs {list(names)}")
    for name in names:
        kind = table.schema.field(name).type
        lists_ok = name in lists and (pa.types.is_list(kind) or pa.types.is_large_list(kind))
        if pa.types.is_nested(kind) and not (lists_ok and not pa.types.is_nested(kind.value_type)):
            _refuse_column(name, table.column(name), lists_ok)
    return table


def _refuse_column(name: str, column: pa.ChunkedArray, items: bool) -> None:
    """DataError naming the first row of an Arrow column whose type has no single values: its
    first non-null row, or (``items``: a sequence field's list column of nested items) the first
    row holding such an item. Found by Arrow's kernels, not by converting the column to Python."""
    column = column.combine_chunks()
    expected = "one value (text or a number)"
    if items:
        expected += " or a list of such values"
        valid = pc.is_valid(pc.list_flatten(column)).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(column).to_numpy()
        row = int(parents[valid.argmax()]) if valid.any() else 0
    else:
        valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
        row = int(valid.argmax()) if valid.any() else 0
    try:
        what = _describe(column.slice(row, 1).to_pylist()[0] if len(column) else None)
    except RecursionError:  # deeply nested: its type says enough
        what = f"a value of type {_cut(str(column.type))}"
    raise DataError(f"row {row}, field {name!r}: {what}; expected {expected}")


def _column(name: str, values: Any, lists: bool = False) -> pa.Array:
    if isinstance(values, pa.Array):
        return values
    values = list(values)
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    # mixed types (e.g. 3 and "x", or an int beyond int64): the text of each, as training reads a
    # CSV cell; a sequence field's lists stay lists, of the text of each item
    if lists and all(v is None or isinstance(v, (list, tuple)) for v in values):
        _refuse_nested(name, values, True)
        return pa.array([None if v is None else [None if x is None else str(x) for x in v] for v in values],
                        pa.list_(pa.string()))
    _refuse_nested(name, values, False, mixed=lists)
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def _refuse_nested(name: str, values: Sequence[Any], lists: bool, mixed: bool = False) -> None:
    """DataError naming the first row of Python ``values`` that is not one value (nor, when
    ``lists``, a list of values); ``mixed``: a sequence field whose rows mix lists and values."""
    for row, v in enumerate(values):
        if isinstance(v, (list, tuple)) and lists and not mixed:
            if any(isinstance(x, (Mapping, list, tuple)) for x in v):
                raise DataError(f"row {row}, field {name!r}: {_describe(v)}; expected a list of values "
                                "(text or numbers)")
        elif isinstance(v, (Mapping, list, tuple)):
            expected = "one value (text or a number)"
            if mixed and isinstance(v, (list, tuple)):
                expected = "the same form in every row: a list of values, or text to split"
            elif mixed:
                expected += " or a list of such values"
            raise DataError(f"row {row}, field {name!r}: {_describe(v)}; expected {expected}")


_REPR = reprlib.Repr()  # bounded in depth and length: a message quotes a hostile value, not all of it
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 3, 3, 30, 30


def _describe(value: Any) -> str:
    """What a raw value is, for a message: 'an object {...}', 'a list [...]'."""
    kind = "an object" if isinstance(value, Mapping) else "a list" if isinstance(value, (list, tuple)) else "the value"
    return f"{kind} {_cut(_REPR.repr(value))}"


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
