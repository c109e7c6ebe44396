"""BARS-style CSV -> prepared Parquet dataset (e.g. Frappe x1: label + categorical columns)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import GROUP_COLUMN, FieldSpec, Manifest
from tf4ctr_dist.data.storage import display_url

from .csv_input import TextInput, group_ids, open_text_input, parse_labels
from .vocab import TokenCounter, Vocabulary
from .writer import DEFAULT_ROW_GROUP_ROWS, DEFAULT_ROW_GROUPS_PER_PART, DatasetWriter


def prepare_bars_csv(
    train: str,
    valid: str,
    test: str,
    out_url: str,
    *,
    label_col: str = "label",
    group_col: str | None = None,
    min_count: int = 2,
    fields: list[str] | None = None,
    row_group_rows: int | None = None,
    row_groups_per_part: int = DEFAULT_ROW_GROUPS_PER_PART,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert three CSV files (header; `label_col` in {0,1}; all other used columns categorical).

    Vocabularies are fit on TRAIN only (tokens seen >= min_count times; empty cells are missing
    and map to OOV). Two streaming passes over train (count, then transform), one over valid and
    test. `storage_options` apply to the inputs and the output. Returns the written manifest.
    """
    if min_count < 1:
        raise DataError(f"min_count must be >= 1, got {min_count}")
    inputs = {
        split: open_text_input(url, storage_options, delimiter=",")
        for split, url in (("train", train), ("valid", valid), ("test", test))
    }
    if fields is None:
        fields = [c for c in inputs["train"].columns if c != label_col]
    fields = list(fields)
    if not fields:
        raise DataError(f"{inputs['train'].url}: no feature columns besides label {label_col!r}")
    if label_col in fields:
        raise DataError(f"label column {label_col!r} cannot also be a field")
    needed = _unique([label_col, *fields, *([group_col] if group_col else [])])
    for inp in inputs.values():
        inp.require(needed)

    counters, train_rows = _count_tokens(inputs["train"], fields, label_col)
    if row_group_rows is None:
        row_group_rows = adaptive_row_group_rows(train_rows)
    vocabs = {name: counters[name].vocabulary(min_count) for name in fields}
    specs = [FieldSpec(name, "categorical", vocabs[name].size, None, "counted") for name in fields]

    with DatasetWriter(
        out_url,
        fields=specs,
        label=label_col,
        group=group_col,
        row_group_rows=row_group_rows,
        row_groups_per_part=row_groups_per_part,
        overwrite=overwrite,
        storage_options=storage_options,
    ) as writer:
        for split, inp in inputs.items():
            out = writer.split(split)
            for offset, batch in inp.batches(needed):
                out.write(_transform(inp, batch, offset, label_col, fields, group_col, vocabs))
        spec = {
            "format": "bars-csv",
            "inputs": {split: display_url(url) for split, url in (("train", train), ("valid", valid), ("test", test))},
            "label_col": label_col,
            "group_col": group_col,
            "fields": fields,
            "min_count": min_count,
            "row_group_rows": row_group_rows,
        }
        return writer.commit(spec, created_by="data_tools.bars_csv")


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def adaptive_row_group_rows(train_rows: int) -> int:
    """Small datasets get at least ~16 row groups, so the per-epoch row-group permutation
    changes which rows each worker reads; large ones the reader-friendly default."""
    return int(min(DEFAULT_ROW_GROUP_ROWS, max(1024, -(-train_rows // 16))))


def _count_tokens(inp: TextInput, fields: list[str], label_col: str) -> tuple[dict[str, TokenCounter], int]:
    counters = {name: TokenCounter() for name in fields}
    rows = 0
    for offset, batch in inp.batches(_unique([label_col, *fields])):
        rows += batch.num_rows
        parse_labels(inp, batch.column(label_col), offset, label_col)  # fail early on bad labels
        for name in fields:
            counters[name].update(batch.column(name))
    return counters, rows


def _transform(
    inp: TextInput,
    batch: pa.RecordBatch,
    offset: int,
    label_col: str,
    fields: list[str],
    group_col: str | None,
    vocabs: dict[str, Vocabulary],
) -> pa.Table:
    columns: dict[str, Any] = {label_col: parse_labels(inp, batch.column(label_col), offset, label_col)}
    for name in fields:
        columns[name] = vocabs[name].lookup(batch.column(name))
    columns[GROUP_COLUMN] = (
        group_ids(batch.column(group_col)) if group_col else np.zeros(batch.num_rows, dtype=np.int64)
    )
    return pa.table(columns)
