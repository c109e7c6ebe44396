"""Field declarations shared by the converters: kind, vocabulary mode, and the raw-value cleaning
(numeric bucketing, sequence splitting and truncation) that turns input columns into tokens.

A spec declares fields as a name or a mapping, with spec-level defaults and per-field overrides:

    vocab_mode: counted          # default for every field: counted | hashed
    min_count: 2                 # default for counted fields
    buckets: 1000000             # default for hashed fields
    fields:                      # bars-csv / parquet-logs: which columns (formats with fixed fields: not accepted)
      - user_id                                        # categorical, spec defaults
      - {name: item_id, vocab_mode: hashed, buckets: 4000000}
      - {name: hist, kind: sequence, max_len: 20, splitter: "|", keep: last}
      - {name: price, kind: numeric, bucketing: criteo}          # or bucketing: {boundaries: [1, 10, 100]}
      - {name: age, kind: numeric, normalizer: standard}         # value x vector (none | min_max | standard)
    field_options:               # any format: per-field overrides by name (precedence over `fields`)
      C3: {vocab_mode: hashed, buckets: 2000000}

Per-field keys: kind (categorical | sequence | numeric), vocab_mode, min_count (counted only),
buckets (hashed only), max_len / splitter / keep (sequence: split a string column on `splitter`
or take a list column, drop empty items, keep the first or last max_len, or `keep: error`: a
longer sequence is refused naming its file and line; bars-csv's default).
A numeric field needs one of two keys:
  bucketing   the value becomes a categorical id: `criteo` = missing -> 0, v > 2 ->
              floor(ln(v)^2), else int(v); or {boundaries: [b0, b1, ...]} = number of
              boundaries <= v, missing -> the missing token. Then counted or hashed like any id.
  normalizer  none | min_max | standard: the value is embedded as value x vector, the way
              FuxiCTR/BARS embed numeric features (one learned vector v_f per field, a row's
              embedding x * v_f, x the value after the normaliser, fit on train; a missing value
              gives the zero vector). Stored as a float32 column (manifest kind numeric);
              vocab_mode, min_count and buckets do not apply. See data_tools.numeric.
A NaN or infinite value of a normalizer field is refused naming its file, row and column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import FieldSpec
from tf4ctr_dist.data.tokens import NORMALIZERS, bucketize_criteo

from .numeric import ValueNormalizer
from .options import VOCAB_MODES, OptionError
from .vocab import HASH_NAME, MISSING, HashedVocabulary, Vocabulary, as_strings

KINDS = ("categorical", "sequence", "numeric")
KEEPS = ("first", "last", "error")  # a sequence longer than max_len: keep its first / last items, or refuse it
FIELD_KEYS = {"name", "kind", "vocab_mode", "min_count", "buckets", "max_len", "splitter", "keep", "bucketing",
              "normalizer"}
ID_KEYS = ("vocab_mode", "min_count", "buckets")  # settings of fields with ids


@dataclass(frozen=True)
class FieldPlan:
    """One output field and how its raw values become ids."""

    name: str
    kind: str = "categorical"  # categorical | sequence | numeric (bucketised: stored as categorical)
    vocab_mode: str = "counted"  # "none" for a value x vector field
    min_count: int = 1
    buckets: int | None = None
    max_len: int | None = None
    splitter: str = "|"
    keep: str = "first"
    bucketing: Any = None  # numeric: "criteo" or {"boundaries": [...]}
    boundaries: tuple[float, ...] = field(default=(), compare=False)
    normalizer: str | None = None  # numeric embedded as value x vector: none | min_max | standard

    @property
    def embeds_value(self) -> bool:
        return self.normalizer is not None

    @property
    def stored_kind(self) -> str:
        if self.embeds_value:
            return "numeric"
        return "sequence" if self.kind == "sequence" else "categorical"

    @property
    def counted(self) -> bool:
        return self.vocab_mode == "counted"

    def field_spec(self, vocab: Vocabulary | HashedVocabulary | ValueNormalizer) -> FieldSpec:
        return FieldSpec(self.name, self.stored_kind, vocab.size, self.max_len, self.vocab_mode)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        """For the manifest's spec: enough to redo the mapping (a value field's normaliser
        statistics are added by the pipeline once fit)."""
        out: dict[str, Any] = {"kind": self.kind, "vocab_mode": self.vocab_mode}
        if self.embeds_value:
            return out
        if self.counted:
            out["min_count"] = self.min_count
        else:
            out["buckets"] = self.buckets
            out["hash"] = HASH_NAME
        if self.kind == "sequence":
            out.update(max_len=self.max_len, splitter=self.splitter, keep=self.keep)
        if self.kind == "numeric":
            out["bucketing"] = self.bucketing
        return out


def _int(value: Any, what: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise OptionError(f"{what} should be an integer >= {minimum}, got {value!r}")
    return value


def resolve_fields(
    entries: Sequence[Any],
    *,
    vocab_mode: str = "counted",
    min_count: int = 1,
    buckets: int | None = None,
    field_options: Mapping[str, Any] | None = None,
    kinds: Sequence[str] = KINDS,
    fixed: Mapping[str, Mapping[str, Any]] | None = None,
    default_keep: str = "first",
) -> list[FieldPlan]:
    """Field entries (name or mapping) + spec defaults + field_options -> FieldPlans.

    `fixed`: per-field settings a format imposes (e.g. MovieLens Genres is a sequence); a spec
    may change their vocabulary settings but not their kind. `default_keep`: a sequence field's
    `keep` when the spec gives none ("error": a longer sequence is bad input).
    """
    if vocab_mode not in VOCAB_MODES:
        raise OptionError(f"vocab_mode should be one of {list(VOCAB_MODES)}, got {vocab_mode!r}")
    _int(min_count, "min_count", 1)
    if buckets is not None:
        _int(buckets, "buckets", 1)
    if not isinstance(field_options or {}, Mapping):
        raise OptionError(f"field_options should map field names to settings, got {field_options!r}")
    options = dict(field_options or {})
    if not isinstance(entries, (list, tuple)):
        raise OptionError(f"fields should be a list of column names or mappings, got {entries!r}")
    plans: list[FieldPlan] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise OptionError(f"fields[{i}] should be a column name or a mapping with a 'name', got {entry!r}")
        plans.append(
            _plan(dict(entry), options.pop(entry["name"], None), fixed, kinds, vocab_mode, min_count, buckets, default_keep)
        )
    if options:
        raise OptionError(f"field_options name unknown field(s) {sorted(options)}; fields are {[p.name for p in plans]}")
    names = [p.name for p in plans]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OptionError(f"field(s) {dupes} declared more than once")
    return plans


def _plan(
    entry: dict[str, Any],
    override: Any,
    fixed: Mapping[str, Mapping[str, Any]] | None,
    kinds: Sequence[str],
    vocab_mode: str,
    min_count: int,
    buckets: int | None,
    default_keep: str = "first",
) -> FieldPlan:
    name = entry["name"]
    if override is not None:
        if not isinstance(override, Mapping):
            raise OptionError(f"field_options.{name} should be a mapping of settings, got {override!r}")
        if "name" in override:
            raise OptionError(f"field_options.{name}: 'name' cannot be changed")
        entry.update(override)
    unknown = sorted(set(entry) - FIELD_KEYS)
    if unknown:
        raise OptionError(f"field {name!r}: unknown setting(s) {unknown}; allowed: {sorted(FIELD_KEYS - {'name'})}")
    base = dict((fixed or {}).get(name, {}))
    if "kind" in entry and "kind" in base and entry["kind"] != base["kind"]:
        raise OptionError(f"field {name!r} is a {base['kind']} field in this format; kind cannot be changed")
    merged = {**base, **entry}
    kind = merged.get("kind", "categorical")
    if kind not in kinds:
        raise OptionError(f"field {name!r}: kind should be one of {list(kinds)}, got {kind!r}")
    if kind == "numeric" and "normalizer" in merged:
        return _value_plan(name, entry, merged)
    mode = merged.get("vocab_mode", vocab_mode)
    if mode not in VOCAB_MODES:
        raise OptionError(f"field {name!r}: vocab_mode should be one of {list(VOCAB_MODES)}, got {mode!r}")
    if mode == "hashed":
        if "min_count" in entry:
            raise OptionError(f"field {name!r}: min_count applies to vocab_mode counted only (this field is hashed)")
        n = merged.get("buckets", buckets)
        if n is None:
            raise OptionError(f"field {name!r}: vocab_mode hashed needs buckets (per field or a spec-level default)")
        n = _int(n, f"field {name!r}: buckets", 1)
        count = 1
    else:
        if "buckets" in entry:
            raise OptionError(f"field {name!r}: buckets applies to vocab_mode hashed only (this field is counted)")
        n = None
        count = _int(merged.get("min_count", min_count), f"field {name!r}: min_count", 1)
    max_len, splitter, keep = None, "|", "first"
    if kind == "sequence":
        max_len = _int(merged.get("max_len"), f"sequence field {name!r}: max_len", 1)
        splitter = merged.get("splitter", "|")
        if not isinstance(splitter, str) or not splitter:
            raise OptionError(f"field {name!r}: splitter should be a non-empty string, got {splitter!r}")
        keep = merged.get("keep", default_keep)
        if keep not in KEEPS:
            raise OptionError(f"field {name!r}: keep should be one of {list(KEEPS)}, got {keep!r}")
    else:
        for key in ("max_len", "splitter", "keep"):
            if key in entry:
                raise OptionError(f"field {name!r}: {key} applies to sequence fields only")
    bucketing, boundaries = None, ()
    if kind == "numeric":
        bucketing = merged.get("bucketing")
        if bucketing == "criteo":
            pass
        elif isinstance(bucketing, Mapping) and set(bucketing) == {"boundaries"}:
            values = bucketing["boundaries"]
            if (
                not isinstance(values, list) or not values
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                or any(b <= a for a, b in zip(values, values[1:]))
            ):
                raise OptionError(f"field {name!r}: bucketing.boundaries should be a non-empty increasing list of numbers")
            boundaries = tuple(float(v) for v in values)
            bucketing = {"boundaries": list(values)}
        else:
            raise OptionError(
                f"numeric field {name!r} needs bucketing: criteo or bucketing: {{boundaries: [b0, b1, ...]}} "
                f"(categorical ids), or normalizer: {' | '.join(NORMALIZERS)} (value x vector); got bucketing {bucketing!r}"
            )
    else:
        for key in ("bucketing", "normalizer"):
            if key in entry:
                raise OptionError(f"field {name!r}: {key} applies to numeric fields only")
    return FieldPlan(name, kind, mode, count, n, max_len, splitter, keep, bucketing, boundaries)


def _value_plan(name: str, entry: Mapping[str, Any], merged: Mapping[str, Any]) -> FieldPlan:
    """A numeric field embedded as value x vector (it has no ids, so no vocabulary settings)."""
    normalizer = merged["normalizer"]
    if normalizer not in NORMALIZERS:
        raise OptionError(f"field {name!r}: normalizer should be one of {list(NORMALIZERS)}, got {normalizer!r}")
    if "bucketing" in merged:
        raise OptionError(f"numeric field {name!r}: give bucketing (categorical ids) or normalizer (value x vector), not both")
    for key in (*ID_KEYS, "max_len", "splitter", "keep"):
        if key in entry:
            raise OptionError(f"field {name!r}: {key} does not apply to a numeric field embedded as value x vector "
                            "(normalizer); it has no ids")
    return FieldPlan(name, "numeric", "none", normalizer=normalizer)


def make_vocab(plan: FieldPlan, counted: Vocabulary | None = None) -> Vocabulary | HashedVocabulary:
    if plan.counted:
        assert counted is not None
        return counted
    assert plan.buckets is not None
    return HashedVocabulary(plan.buckets)


# ---- raw values -> tokens -------------------------------------------------------------------


def numeric_tokens(plan: FieldPlan, values: np.ndarray) -> pa.Array:
    """Bucket tokens (decimal text) of float values (NaN = missing)."""
    values = np.asarray(values, dtype=np.float64)
    if plan.bucketing == "criteo":
        return pa.array(bucketize_criteo(values)).cast(pa.string())
    buckets = np.searchsorted(np.asarray(plan.boundaries), values, side="right")
    tokens = pa.array(buckets).cast(pa.string())
    missing = np.isnan(values)
    if missing.any():
        tokens = pc.if_else(pa.array(missing), pa.scalar(MISSING), tokens)
    return tokens


def clean_lists(lists: pa.Array | pa.ChunkedArray, max_len: int, keep: str = "first") -> pa.ListArray:
    """list<string> with empty / null items dropped, null lists empty, at most max_len items
    per row (the first or the last ones)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    n = len(lists)
    if n == 0:
        return pa.array([], pa.list_(pa.string()))
    items = as_strings(pc.list_flatten(lists))
    parents = pc.list_parent_indices(lists).to_numpy()
    good = pc.not_equal(items, MISSING).to_numpy(zero_copy_only=False)
    items = items.filter(pa.array(good))
    parents = parents[good]
    lengths = np.bincount(parents, minlength=n)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(len(parents)) - starts[parents]
    if keep == "last":
        pos = lengths[parents] - 1 - pos
    kept = pos < max_len
    if not kept.all():
        items = items.filter(pa.array(kept))
        lengths = np.minimum(lengths, max_len)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), items)


def split_strings(column: pa.Array | pa.ChunkedArray, splitter: str) -> pa.Array:
    """A string column of `splitter`-joined items -> list<string>."""
    return pc.split_pattern(as_strings(column), pattern=splitter)


def lookup_lists(vocab: Vocabulary | HashedVocabulary, lists: pa.ListArray) -> pa.ListArray:
    """Map every item of clean list<string> rows (see clean_lists) to ids; same row lengths."""
    ids = vocab.lookup(lists.values) if len(lists.values) else np.empty(0, dtype=np.int64)
    return pa.ListArray.from_arrays(lists.offsets, pa.array(ids, pa.int64()))


def sequence_lengths(lists: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Items per row of a list<string> column, empty and null items not counted."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    n = len(lists)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    items = as_strings(pc.list_flatten(lists))
    parents = pc.list_parent_indices(lists).to_numpy()
    good = pc.not_equal(items, MISSING).to_numpy(zero_copy_only=False)
    return np.bincount(parents[good], minlength=n)


def parse_floats(column: pa.Array | pa.ChunkedArray, where: Callable[[int], str], name: str) -> np.ndarray:
    """A string column of numbers ("" = missing -> NaN) as float64; DataError naming the row
    (`where(row)`: e.g. "FILE: line N") and the value otherwise."""
    text = pc.utf8_trim_whitespace(as_text(column))
    empty = pc.equal(text, "")
    try:
        values = pc.cast(pc.if_else(empty, pa.scalar(None, pa.string()), text), pa.float64())
    except pa.ArrowInvalid:
        for row, value in enumerate(text.to_pylist()):
            try:
                float(value) if value else None
            except ValueError:
                raise DataError(f"{where(row)}: column {name!r} = {value!r}; expected a number or empty") from None
        raise
    return values.to_numpy(zero_copy_only=False).astype(np.float64)


def as_text(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column if pa.types.is_string(column.type) else column.cast(pa.string())
