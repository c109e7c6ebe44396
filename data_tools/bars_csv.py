"""BARS-style CSV -> prepared Parquet dataset (e.g. Frappe x1: label + categorical columns).

Three files (train, valid, test), each with a header; the label column in {0, 1}; every other
used column categorical unless its field entry says otherwise (data_tools.fields):
- sequence: `{name: genre_ids, kind: sequence, max_len: 3, splitter: "|"}` - the cell split on
  `splitter`, empty items dropped; a row with more than max_len items is an error naming the
  file and line unless the field sets `keep: first` or `keep: last` (then truncated). The model
  mean-pools the ids.
- numeric: `{name: price, kind: numeric, bucketing: criteo}` or `bucketing: {boundaries: [...]}`
  - bucketised into categorical ids; or `{name: price, kind: numeric, normalizer: standard}`
  (none | min_max | standard) - embedded as value x vector as FuxiCTR does (data_tools.numeric):
  an empty cell is missing, a cell that is no finite number is an error naming file and line.
Vocabularies are fit on TRAIN only (counted: tokens seen >= min_count times, empty cells are
missing and map to OOV) or hashed per field (see data_tools.fields).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import Manifest
from tf4ctr_dist.data.storage import display_url

from .csv_input import (
    TextInput, TextShard, check_shard_rows, count_rows, group_ids, open_text_input, parse_labels, plan_text_shards,
    shard_bytes,
)
from .derive import PREPROCESS
from .engine import Engine
from .numeric import column_values
from .fields import FieldPlan, clean_lists, numeric_tokens, parse_floats, resolve_fields, sequence_lengths, split_strings
from .options import BarsCsvOptions
from .splits import exact_split, folds_to_splits, stratified_folds
from .pipeline import Chunk, Source, adaptive_row_group_rows, prepare
from .progress import Progress

__all__ = ["prepare_bars_csv", "adaptive_row_group_rows"]


def field_tokens(plan: FieldPlan, column: Any, inp: TextInput, offset: int) -> Any:
    """Raw string cells of one field -> its tokens: the column (categorical), bucket tokens
    (numeric), float64 values with nulls (numeric value x vector), clean list<string> rows
    (sequence). DataError naming file, line and column."""
    if plan.kind == "numeric":
        where = lambda row: f"{inp.url}: line {inp.line_of(offset + row)}"  # noqa: E731
        if plan.embeds_value:
            return column_values(column, where, plan.name, lambda c: parse_floats(c, where, plan.name))
        return numeric_tokens(plan, parse_floats(column, where, plan.name))
    if plan.kind == "sequence":
        assert plan.max_len is not None
        lists = split_strings(column, plan.splitter)
        if plan.keep == "error":
            lengths = sequence_lengths(lists)
            over = np.flatnonzero(lengths > plan.max_len)
            if over.size:
                row = int(over[0])
                raise DataError(
                    f"{inp.url}: line {inp.line_of(offset + row)}: column {plan.name!r} has {int(lengths[row])} items "
                    f"(split on {plan.splitter!r}), more than max_len {plan.max_len}; raise max_len or set "
                    "keep: first / keep: last to truncate"
                )
        return clean_lists(lists, plan.max_len, "first" if plan.keep == "error" else plan.keep)
    return column


DERIVE_KEYS = ("copy_from", "preprocess")


def split_derivations(entries: list[Any]) -> tuple[list[Any], dict[str, str], dict[str, str]]:
    """Field entries -> (entries without copy_from / preprocess, source column per field,
    preprocess name per derived field). copy_from: the raw column a field is computed from
    (default: the field's own name); preprocess: a data_tools.derive.PREPROCESS name."""
    out, sources, preprocess = [], {}, {}
    for entry in entries:
        if isinstance(entry, Mapping) and any(k in entry for k in DERIVE_KEYS):
            entry = dict(entry)
            name = entry.get("name")
            source = entry.pop("copy_from", name)
            step = entry.pop("preprocess", None)
            if not isinstance(source, str) or not source:
                raise DataError(f"field {name!r}: copy_from should be a column name, got {source!r}")
            if step is not None and step not in PREPROCESS:
                raise DataError(f"field {name!r}: unknown preprocess {step!r}; known: {sorted(PREPROCESS)}")
            if isinstance(name, str):
                sources[name] = source
                if step is not None:
                    preprocess[name] = step
        out.append(entry)
    for entry in out:
        name = entry if isinstance(entry, str) else entry.get("name") if isinstance(entry, Mapping) else None
        if isinstance(name, str):
            sources.setdefault(name, name)
    return out, sources, preprocess


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


class BarsSource(Source):
    created_by = "data_tools.bars_csv"

    def __init__(
        self, urls: tuple[str, str, str], label_col: str, group_col: str | None, entries: list[Any] | None,
        resolve: Mapping[str, Any], storage_options: Mapping[str, Any] | None, *,
        default_keep: str = "error", created_by: str | None = None, spec_format: str = "bars-csv",
        one_file_split: tuple[str, tuple[float, float, float], int] | None = None,
    ) -> None:
        # one_file_split (rule, fractions, seed): `urls` is one file, cut into the three splits
        # by data_tools.splits (rule "exact" or "stratified"); else three files, one per split.
        self.one_file_split = one_file_split
        self._split: Any = None
        if created_by:
            self.created_by = created_by
        self.spec_format = spec_format
        self.urls = urls
        self.inputs = [open_text_input(url, storage_options, delimiter=",") for url in urls]
        if entries is None:
            entries = [c for c in self.inputs[0].columns if c != label_col]
        entries, self.sources, self.preprocess = split_derivations(list(entries))
        self.fields: list[FieldPlan] = resolve_fields(entries, default_keep=default_keep, **resolve)
        if not self.fields:
            raise DataError(f"{self.inputs[0].url}: no feature columns besides label {label_col!r}")
        names = [f.name for f in self.fields]
        if label_col in names:
            raise DataError(f"label column {label_col!r} cannot also be a field")
        self.label, self.group = label_col, group_col
        self.needed = _unique([label_col, *(self.sources[n] for n in names), *([group_col] if group_col else [])])
        for inp in self.inputs:
            inp.require(self.needed)
        self.resolve = dict(resolve)
        self.plans = {f.name: f for f in self.fields}

    def shards(self, engine: Engine) -> list[TextShard]:
        if self.one_file_split:
            return plan_text_shards(self.inputs[0], 0, (0, 1, 2), engine)
        return [s for i, inp in enumerate(self.inputs) for s in plan_text_shards(inp, i, (i,), engine)]

    def shard_bytes(self, shard: TextShard) -> int:
        return shard_bytes(self.inputs[shard.source], shard)

    def _split_rows(self, offset: int, n: int) -> Any:
        if not self.one_file_split:
            return None
        if self._split is None:
            rule, fractions, seed = self.one_file_split
            inp = self.inputs[0]
            if rule == "stratified":
                labels = [parse_labels(inp, b.column(self.label), o, self.label) for o, b, _ in inp.batches([self.label])]
                fold = stratified_folds(np.concatenate(labels) if labels else np.zeros(0), 10, seed)
                self._split = folds_to_splits(fold, [round(f * 10) for f in fractions])
            else:
                self._split = exact_split(count_rows(inp, (0, inp.size())), seed, fractions)
        if offset + n > len(self._split):
            raise DataError(f"{self.inputs[0].url}: changed while being read (more rows than counted)")
        return self._split[offset : offset + n]

    def read(self, shard: TextShard, names: Sequence[str]) -> Iterator[Chunk]:
        inp, rows = self.inputs[shard.source], 0
        columns = _unique([self.label, *(self.sources[n] for n in names), *([self.group] if self.group else [])])
        for offset, batch, position in inp.batches(columns, start=shard.start, end=shard.end, first_row=shard.first_row):
            labels = parse_labels(inp, batch.column(self.label), offset, self.label)
            groups = group_ids(batch.column(self.group)) if self.group else None
            rows += batch.num_rows
            tokens = {}
            for name in names:
                column = batch.column(self.sources[name])
                if name in self.preprocess:
                    where = lambda row, offset=offset: f"{inp.url}: line {inp.line_of(offset + row)}"  # noqa: E731
                    column = PREPROCESS[self.preprocess[name]](column, where, self.sources[name])
                tokens[name] = field_tokens(self.plans[name], column, inp, offset)
            split = self._split_rows(offset, batch.num_rows)
            yield Chunk(labels, tokens, shard.source if split is None else split, groups, position)
        check_shard_rows(inp, shard, rows)

    def train_rows_hint(self) -> int | None:
        """Estimated from the file size and the first ~1 MB of lines (no extra pass over train)."""
        inp = self.inputs[0]
        if inp.compressed:
            return None
        with inp.loc.fs.open(inp.loc.path(), "rb") as f:
            head = f.read(1 << 20)
        lines = max(1, head.count(b"\n"))
        return max(1, int(inp.size() / (len(head) / lines)) - 1)

    def spec(self) -> dict[str, Any]:
        return {
            "format": self.spec_format,
            "inputs": {split: display_url(url) for split, url in zip(("train", "valid", "test"), self.urls)}
            if not self.one_file_split else {"all": display_url(self.urls[0])},
            **({"split_rule": self.one_file_split[0], "split": list(self.one_file_split[1]), "seed": self.one_file_split[2]}
               if self.one_file_split else {}),
            "label_col": self.label,
            "group_col": self.group,
            # the input's column order, for scoring raw files without a header (tf4ctr predict)
            "raw_columns": list(self.inputs[0].columns),
            "fields": [f.name for f in self.fields],
            **({"derived": {n: {"from": self.sources[n], "preprocess": p} for n, p in self.preprocess.items()}}
               if self.preprocess else {}),
            "min_count": self.resolve["min_count"],
            **({"numeric": {f.name: "value x vector" if f.embeds_value else "bucketised"
                            for f in self.fields if f.kind == "numeric"}}
               if any(f.kind == "numeric" for f in self.fields) else {}),
        }


def prepare_bars_csv(
    train: str,
    valid: str,
    test: str,
    out_url: str,
    options: BarsCsvOptions | None = None,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    engine: Engine | None = None,
    progress: Progress | None = None,
    **keys: Any,
) -> Manifest:
    """Convert three CSV files (header; `label_col` in {0,1}; all other used columns categorical).

    `options` and/or its flat keys (`label_col`, `group_col`, `fields`, `min_count`, ...;
    data_tools.options). `fields`: column names or per-field mappings (data_tools.fields);
    default all but the label. Two streaming passes over train (count, then transform; one when
    every field is hashed), one over valid and test. `storage_options` apply to the inputs and
    the output. Returns the written manifest.
    """
    opts = BarsCsvOptions.build(options, keys)
    source = BarsSource(
        (train, valid, test), opts.label_col, opts.group_col, opts.fields, opts.vocab.field_defaults(), storage_options,
    )
    return prepare(
        source, out_url, opts.write, engine=engine, overwrite=overwrite, storage_options=storage_options,
        vocab_memory_mb=opts.vocab.vocab_memory_mb, progress=progress,
    )
