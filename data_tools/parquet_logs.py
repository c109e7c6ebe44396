"""Date-partitioned Parquet logs -> prepared Parquet dataset.

Input: a folder or URL holding Hive-style partitions, `ROOT/dt=2026-11-26/part-*.parquet` (files
may sit deeper, e.g. `dt=.../hour=07/...`; names starting with "_" or "." are ignored, as are
entries of ROOT that are not partitions). The dataset spec names everything:

    label: click                    # integer, floating or boolean column, values 0/1
    group: user_id                  # optional: gAUC group column (string or integer)
    partition_key: dt               # optional, default dt
    train_dates: [2026-11-24, 2026-11-25]      # dates or inclusive ranges "2026-11-01..2026-11-23"
    valid_dates: [2026-11-26]                  # optional (the split is then not written)
    test_dates: [2026-11-27]                   # optional
    min_count: 2                    # counted fields; vocab_mode / buckets / field_options as usual
    fields:
      - {name: user_id, vocab_mode: hashed, buckets: 1000000}
      - category
      - {name: hist_items, kind: sequence, max_len: 20}          # list column or "a|b|c" strings
      - {name: price, kind: numeric, bucketing: {boundaries: [1, 10, 100]}}
      - {name: age, kind: numeric, normalizer: standard}         # value x vector (data_tools.numeric)

Each split is the union of its dates' partitions (dates ascending, files by path, row groups in
file order); a date may belong to one split only. Vocabularies are fit on the train dates.
Before any data is read, every file's footer is checked: a file that is not readable Parquet
(truncated, corrupt), a missing column, a column whose type differs from the same column in
the other partitions (schema drift: integer vs floating vs string vs list; integer widths may
differ), and a requested partition with no rows are errors naming the file (and partition).
Rows are then streamed one row group at a time (bounded memory); a label outside {0, 1} or an
unreadable row group is an error naming the file, row group and column.
"""

from __future__ import annotations

import datetime as _dt
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import SPLITS, Manifest
from tf4ctr_dist.data.storage import Location, describe, display_url, resolve

from .engine import Engine
from .fields import FieldPlan, clean_lists, numeric_tokens, resolve_fields, split_strings
from .numeric import column_values
from .options import ParquetLogsOptions
from .pipeline import Chunk, Source, prepare
from .progress import Progress
from .vocab import as_strings, stable_hash


@dataclass(frozen=True)
class _File:
    url: str  # for messages
    path: str  # in the filesystem
    date: str
    split: int
    row_groups: tuple[int, ...]  # rows per row group
    row_group_bytes: tuple[int, ...]


@dataclass(frozen=True)
class ParquetShard:
    """Row groups [start, stop) of file `file`."""

    file: int
    start: int
    stop: int
    splits: tuple[int, ...]


def type_class(t: pa.DataType) -> str:
    """What schema-drift checks compare: integer widths and string flavours do not matter (the
    tokens are the same), integer vs floating vs string vs list do."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "floating"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return "string"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"list<{type_class(t.value_type)}>"
    return str(t)


_ALLOWED = {
    "label": {"integer", "floating", "boolean"},
    "group": {"integer", "string"},
    "categorical": {"integer", "string", "boolean", "floating"},
    "numeric": {"integer", "floating", "boolean"},
    "sequence": {"string", "list<string>", "list<integer>"},
}


def _date_text(value: Any, key: str) -> str:
    if isinstance(value, _dt.datetime):
        return value.date().isoformat()
    if isinstance(value, _dt.date):  # YAML reads 2026-11-26 as a date
        return value.isoformat()
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    raise DataError(f"{key}: expected dates (YYYY-MM-DD) or ranges 'A..B', got {value!r}")


def select_dates(spec: Any, available: Sequence[str], key: str, root: str, partition_key: str) -> list[str]:
    """Partition values named by a list of dates / inclusive 'A..B' ranges (string order, which
    is date order for ISO dates)."""
    if spec is None:
        return []
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    chosen: list[str] = []
    for item in items:
        text = _date_text(item, key)
        if ".." in text:
            lo, _, hi = (p.strip() for p in text.partition(".."))
            found = [d for d in available if lo <= d <= hi]
            if not found:
                raise DataError(f"{key}: range {text} matches no {partition_key}=... partition under {root} (has {list(available)[:10]})")
        else:
            if text not in available:
                raise DataError(f"{key}: no partition {partition_key}={text} under {root} (has {list(available)[:10]})")
            found = [text]
        chosen.extend(d for d in found if d not in chosen)
    return sorted(chosen)


class ParquetLogsSource(Source):
    created_by = "data_tools.parquet_logs"

    def __init__(
        self,
        input_url: str,
        *,
        label: str,
        group: str | None,
        fields: list[Any],
        dates: Mapping[str, Any],
        partition_key: str,
        resolve_options: Mapping[str, Any],
        storage_options: Mapping[str, Any] | None,
    ) -> None:
        self.loc: Location = resolve(input_url, storage_options)
        self.label, self.group = label, group
        self.partition_key = partition_key
        self.resolve_options = dict(resolve_options)
        self.fields = resolve_fields(fields, **resolve_options)
        if not self.fields:
            raise DataError("parquet-logs: 'fields' is empty")
        names = [f.name for f in self.fields]
        if label in names:
            raise DataError(f"label column {label!r} cannot also be a field")
        self.columns = list(dict.fromkeys([label, *names, *([group] if group else [])]))
        partitions = self._partitions()
        self.dates: dict[int, list[str]] = {}
        owner: dict[str, str] = {}
        for i, split in enumerate(SPLITS):
            key = f"{split}_dates"
            chosen = select_dates(dates.get(key), sorted(partitions), key, self.loc.url, partition_key)
            for d in chosen:
                if d in owner:
                    raise DataError(f"{partition_key}={d} is in both {owner[d]} and {key}; a date belongs to one split")
                owner[d] = key
            if chosen:
                self.dates[i] = chosen
        if 0 not in self.dates:
            raise DataError("parquet-logs needs train_dates (dates or ranges of the training partitions)")
        self.split_indexes = tuple(sorted(self.dates))
        self.files: list[_File] = []
        self._reference: dict[str, tuple[str, str, pa.DataType]] = {}  # column -> (class, url, type) first seen
        for i in self.split_indexes:
            for date in self.dates[i]:
                self._scan_partition(partitions[date], date, i)

    # ---- planning (driver) --------------------------------------------------------------------

    def _partitions(self) -> dict[str, str]:
        fs, root = self.loc.fs, self.loc.path()
        try:
            if not fs.isdir(root):
                raise DataError(f"input {self.loc.url}: not found or not a folder of {self.partition_key}=... partitions")
            entries = fs.ls(root, detail=True)
        except DataError:
            raise
        except Exception as exc:
            raise self.loc.error(f"cannot list input {self.loc.url}", exc) from None
        found: dict[str, str] = {}
        prefix = f"{self.partition_key}="
        for entry in entries:
            name = posixpath.basename(entry["name"].rstrip("/"))
            if entry.get("type") == "directory" and name.startswith(prefix):
                found[name[len(prefix):]] = entry["name"].rstrip("/")
        if not found:
            raise DataError(f"input {self.loc.url}: no {prefix}... partition folders")
        return found

    def _url(self, path: str) -> str:
        return self.loc.url_of(posixpath.relpath(path, self.loc.path()))

    def _scan_partition(self, path: str, date: str, split: int) -> None:
        where = f"partition {self.partition_key}={date} ({self._url(path)})"
        try:
            found = sorted(self.loc.fs.find(path))
        except Exception as exc:
            raise self.loc.error(f"cannot list {where}", exc) from None
        files = [p for p in found if not any(part.startswith(("_", ".")) for part in posixpath.relpath(p, path).split("/"))]
        if not files:
            raise DataError(f"{where} is empty: no data files")
        rows = 0
        for file_path in files:
            rows += self._check_file(file_path, date, split)
        if rows == 0:
            raise DataError(f"{where} is empty: its {len(files)} file(s) hold no rows")

    def _check_file(self, path: str, date: str, split: int) -> int:
        url = self._url(path)
        try:
            with self.loc.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                schema, meta = pf.schema_arrow, pf.metadata
        except Exception as exc:
            raise DataError(
                f"{url}: not a readable Parquet file ({describe(exc, self.loc.storage_options)}); corrupt or truncated?"
            ) from None
        where = f"{url} (partition {self.partition_key}={date})"
        for name in self.columns:
            if name not in schema.names:
                raise DataError(f"{where}: missing column {name!r} (the file has {schema.names})")
            got = type_class(schema.field(name).type)
            ref = self._reference.setdefault(name, (got, url, schema.field(name).type))
            if got != ref[0]:
                raise DataError(
                    f"{where}: column {name!r} has type {schema.field(name).type} but {ref[1]} has {ref[2]} "
                    "(schema drift between partitions)"
                )
            role = "label" if name == self.label else self._role(name)
            if got not in _ALLOWED[role]:
                raise DataError(f"{where}: column {name!r} has type {schema.field(name).type}; a {role} column needs {sorted(_ALLOWED[role])}")
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        sizes = tuple(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if sum(groups):
            self.files.append(_File(url, path, date, split, groups, sizes))
        return sum(groups)

    def _role(self, name: str) -> str:
        for f in self.fields:
            if f.name == name:
                return f.kind
        return "group"

    def shards(self, engine: Engine) -> list[ParquetShard]:
        target = getattr(engine, "shard_bytes", None)
        shards = []
        for i, f in enumerate(self.files):
            if not target:
                shards.append(ParquetShard(i, 0, len(f.row_groups), (f.split,)))
                continue
            start, size = 0, 0
            for g, nbytes in enumerate(f.row_group_bytes):
                size += nbytes
                if size >= target:
                    shards.append(ParquetShard(i, start, g + 1, (f.split,)))
                    start, size = g + 1, 0
            if start < len(f.row_groups):
                shards.append(ParquetShard(i, start, len(f.row_groups), (f.split,)))
        return shards

    def shard_rows(self, shard: ParquetShard) -> int:
        return sum(self.files[shard.file].row_groups[shard.start : shard.stop])

    def train_rows_hint(self) -> int:
        return sum(sum(f.row_groups) for f in self.files if f.split == 0)

    # ---- reading (anywhere) -------------------------------------------------------------------

    def read(self, shard: ParquetShard, names: Sequence[str]) -> Iterator[Chunk]:
        f = self.files[shard.file]
        plans = {p.name: p for p in self.fields}
        columns = list(dict.fromkeys([self.label, *names, *([self.group] if self.group else [])]))
        try:
            handle = self.loc.fs.open(f.path, "rb")
            pf = pq.ParquetFile(handle)
        except Exception as exc:
            raise DataError(f"{f.url}: not a readable Parquet file ({describe(exc, self.loc.storage_options)}); corrupt or truncated?") from None
        with handle:
            for g in range(shard.start, shard.stop):
                where = f"{f.url} row group {g}"
                try:
                    table = pf.read_row_group(g, columns=columns)
                except Exception as exc:
                    raise DataError(f"{where}: cannot read ({describe(exc, self.loc.storage_options)}); corrupt or truncated Parquet?") from None
                if table.num_rows != f.row_groups[g]:
                    raise DataError(f"{where}: has {table.num_rows} rows, its footer said {f.row_groups[g]} (file replaced while preparing?)")
                labels = self._labels(table.column(self.label), where)
                tokens = {name: self._tokens(plans[name], table.column(name), where) for name in names}
                groups = None
                if self.group:
                    groups = stable_hash(table.column(self.group)).view(np.int64)
                    groups[groups == 0] = 1
                yield Chunk(labels, tokens, f.split, groups)

    def _labels(self, column: pa.ChunkedArray, where: str) -> np.ndarray:
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~((values == 0.0) | (values == 1.0)))  # NaN (null) is bad too
        if bad.size:
            row = int(bad[0])
            raise DataError(f"{where}: column {self.label!r} = {column[row].as_py()!r} (row {row} of the row group); expected 0 or 1")
        return values.astype(np.float32)

    def _tokens(self, plan: FieldPlan, column: pa.ChunkedArray, where: str) -> pa.Array:
        if plan.embeds_value:
            return column_values(column, lambda row: f"{where} (row {row} of the row group)", plan.name)
        if plan.kind == "numeric":
            return numeric_tokens(plan, pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False))
        if plan.kind == "sequence":
            array = column.combine_chunks()
            if pa.types.is_dictionary(array.type):
                array = array.dictionary_decode()
            if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
                array = split_strings(array, plan.splitter)
            assert plan.max_len is not None
            return clean_lists(array, plan.max_len, plan.keep)
        return as_strings(column)

    def spec(self) -> dict[str, Any]:
        return {
            "format": "parquet-logs",
            "input": display_url(self.loc.url),
            "partition_key": self.partition_key,
            **{f"{SPLITS[i]}_dates": self.dates[i] for i in self.split_indexes},
            "label": self.label,
            "group": self.group,
            "fields": [f.name for f in self.fields],
            "min_count": self.resolve_options.get("min_count", 1),
            "files": len(self.files),
        }


def prepare_parquet_logs(
    input_url: str,
    out_url: str,
    options: ParquetLogsOptions | None = None,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    engine: Engine | None = None,
    progress: Progress | None = None,
    **keys: Any,
) -> Manifest:
    """Convert date-partitioned Parquet logs (see the module docstring for the spec).

    `options` and/or its flat keys (`label`, `fields`, `train_dates` required; data_tools.options).
    """
    opts = ParquetLogsOptions.build(options, keys)
    source = ParquetLogsSource(
        input_url,
        label=opts.label,
        group=opts.group,
        fields=opts.fields,
        dates={"train_dates": opts.train_dates, "valid_dates": opts.valid_dates, "test_dates": opts.test_dates},
        partition_key=opts.partition_key,
        resolve_options=opts.vocab.field_defaults(),
        storage_options=storage_options,
    )
    return prepare(
        source, out_url, opts.write, engine=engine, overwrite=overwrite, storage_options=storage_options,
        vocab_memory_mb=opts.vocab.vocab_memory_mb, progress=progress,
    )
