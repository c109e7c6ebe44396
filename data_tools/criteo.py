"""Criteo (Kaggle display advertising) -> prepared Parquet dataset, BARS Criteo x4 protocol.

Input: the release file (tab-separated, no header: label, I1..I13, C1..C26) or the same columns
as CSV with a header (e.g. DeepCTR's criteo_sample.txt); detected from the first line.
Numeric fields are bucketised (missing -> 0; v > 2 -> floor(ln(v)^2); else int(v), truncating
toward zero) and then treated as categorical like C1..C26. Rows are split train/valid/test 8:1:1
by a seeded hash of the row number (deterministic, independent of chunking); vocabularies are fit
on the train rows only (min_count 10).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import GROUP_COLUMN, SPLITS, FieldSpec, Manifest
from tf4ctr_dist.data.storage import display_url

from .csv_input import TextInput, open_text_input, parse_labels
from .vocab import TokenCounter, Vocabulary
from .writer import DEFAULT_ROW_GROUP_ROWS, DEFAULT_ROW_GROUPS_PER_PART, DatasetWriter

LABEL = "label"
NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
FIELDS = NUMERIC + CATEGORICAL
COLUMNS = [LABEL, *FIELDS]


def bucketize(values: np.ndarray) -> np.ndarray:
    """Criteo numeric bucketing on floats (NaN = missing): int64 buckets."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros(values.shape, dtype=np.int64)  # missing -> 0
    present = ~np.isnan(values)
    big = present & (values > 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[big] = np.floor(np.log(values[big]) ** 2).astype(np.int64)
    small = present & ~big
    out[small] = np.trunc(values[small]).astype(np.int64)  # int(v): toward zero, also for negatives
    return out


def split_of_rows(first_row: int, n: int, seed: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of rows first_row .. first_row+n-1.

    A splitmix64 hash of (seed, row number) mapped to [0, 1): the same row always lands in the
    same split, however the file is chunked.
    """
    x = np.arange(first_row, first_row + n, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(2**53)
    return np.searchsorted(np.cumsum(fractions)[:2], u, side="right").astype(np.int8)


def _numeric(inp: TextInput, column: pa.Array, offset: int, name: str) -> np.ndarray:
    """Parse a numeric column ("" = missing) and bucketise; DataError naming file, line, column."""
    text = pc.utf8_trim_whitespace(column)
    empty = pc.equal(text, "")
    try:
        values = pc.cast(pc.if_else(empty, pa.scalar(None, pa.string()), text), pa.float64())
    except pa.ArrowInvalid:
        for row, value in enumerate(text.to_pylist()):
            try:
                float(value) if value else None
            except ValueError:
                raise DataError(
                    f"{inp.url}: line {inp.line_of(offset + row)}: column {name!r} = {value!r}; expected a number or empty"
                ) from None
        raise
    return bucketize(values.to_numpy(zero_copy_only=False))


def _tokens(inp: TextInput, batch: pa.RecordBatch, offset: int, name: str) -> pa.Array:
    """Raw tokens of one field as strings (numeric fields: their bucket)."""
    if name in NUMERIC:
        return pa.array(_numeric(inp, batch.column(name), offset, name)).cast(pa.string())
    return batch.column(name)


def prepare_criteo(
    input_url: str,
    out_url: str,
    *,
    min_count: int = 10,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 2018,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    row_groups_per_part: int = DEFAULT_ROW_GROUPS_PER_PART,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert one Criteo file (TSV without header, or CSV/TSV with header; .gz etc. inferred)."""
    if min_count < 1:
        raise DataError(f"min_count must be >= 1, got {min_count}")
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise DataError(f"split must be three non-negative fractions summing to 1, got {split}")
    inp = open_text_input(input_url, storage_options, delimiter=None, header=None, columns=COLUMNS)
    inp.require(COLUMNS)
    fractions = (float(split[0]), float(split[1]), float(split[2]))

    # Pass 1: count tokens on the train rows only.
    counters = {name: TokenCounter() for name in FIELDS}
    for offset, batch in inp.batches(COLUMNS):
        parse_labels(inp, batch.column(LABEL), offset, LABEL)
        train = pa.array(split_of_rows(offset, batch.num_rows, seed, fractions) == 0)
        for name in FIELDS:
            counters[name].update(pc.filter(_tokens(inp, batch, offset, name), train))
    vocabs: dict[str, Vocabulary] = {name: counters[name].vocabulary(min_count) for name in FIELDS}
    specs = [FieldSpec(name, "categorical", vocabs[name].size, None, "counted") for name in FIELDS]

    # Pass 2: transform and route each row to its split.
    with DatasetWriter(
        out_url,
        fields=specs,
        label=LABEL,
        group=None,
        row_group_rows=row_group_rows,
        row_groups_per_part=row_groups_per_part,
        overwrite=overwrite,
        storage_options=storage_options,
    ) as writer:
        outs = [writer.split(name) for name in SPLITS]
        for offset, batch in inp.batches(COLUMNS):
            columns: dict[str, Any] = {LABEL: parse_labels(inp, batch.column(LABEL), offset, LABEL)}
            for name in FIELDS:
                columns[name] = vocabs[name].lookup(_tokens(inp, batch, offset, name))
            columns[GROUP_COLUMN] = np.zeros(batch.num_rows, dtype=np.int64)
            table = pa.table(columns)
            which = split_of_rows(offset, batch.num_rows, seed, fractions)
            for index, out in enumerate(outs):
                out.write(table.filter(pa.array(which == index)))
        spec = {
            "format": "criteo",
            "input": display_url(input_url),
            "header": inp.header,
            "delimiter": inp.delimiter,
            "min_count": min_count,
            "split": list(fractions),
            "seed": seed,
            "numeric_fields": NUMERIC,
            "numeric_bucketing": "missing -> 0; v > 2 -> floor(ln(v)^2); else int(v)",
            "row_group_rows": row_group_rows,
        }
        return writer.commit(spec, created_by="data_tools.criteo")
