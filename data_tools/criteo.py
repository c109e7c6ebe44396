"""Criteo (Kaggle display advertising) -> prepared Parquet dataset, BARS Criteo x4 protocol.

Input: the release file (tab-separated, no header: label, I1..I13, C1..C26) or the same columns
as CSV with a header (e.g. DeepCTR's criteo_sample.txt); detected from the first line of each
file. Several files (the 1TB release's day_0 .. day_23): a folder (its files, hidden and
`_`-prefixed names skipped) or a glob, read in natural name order (day_2 before day_10).
Numeric fields are bucketised (missing -> 0; v > 2 -> floor(ln(v)^2); else int(v), truncating
toward zero) and then treated as categorical like C1..C26. Rows are split train/valid/test 8:1:1
by a seeded hash of the row number (deterministic, independent of chunking; row r of the k-th
file counts as row k * 2^40 + r, so one file splits as it always did); vocabularies are fit
on the train rows only (min_count 10), or hashed (vocab_mode / field_options, see
data_tools.fields). With the Ray engine the file is cut into byte ranges at line ends; a fast
parallel line count gives every range its first row number, so the split of a row never depends
on the sharding.

BARS Criteo_x4 (reczoo/Datasets): `split_rule: stratified` cuts one raw input into 10 folds
stratified by label (seed 2018; folds 8:1:1 for split 0.8/0.1/0.1; data_tools.splits), after a
first pass that reads only the labels. Or three inputs: the already split x4 train/valid/test.csv
(header Label,I1..I13,C1..C26, comma separated), bucketised on the way in the same way.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import Manifest
from tf4ctr_dist.data.storage import display_url, resolve

from .csv_input import TextInput, TextShard, check_shard_rows, open_text_input, parse_labels, plan_text_shards, shard_bytes
from .engine import Engine
from .fields import FieldPlan, bucketize_criteo, resolve_fields
from .options import CriteoOptions
from .pipeline import Chunk, Source, prepare
from .progress import Progress
from .splits import folds_to_splits, stratified_folds

LABEL = "label"
NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
FIELDS = NUMERIC + CATEGORICAL
COLUMNS = [LABEL, *FIELDS]
NUMERIC_BUCKETING = "missing -> 0; v > 2 -> floor(ln(v)^2); else int(v)"

bucketize = bucketize_criteo
FILE_ROWS = 1 << 40  # row-number stride between input files (for the split hash)


def _natural_key(path: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", posixpath.basename(path))]


def expand_inputs(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The input files of `url`: itself (a file), a folder's files, or a glob's matches, in
    natural name order. DataError when a folder or glob holds no file."""
    loc = resolve(url, storage_options)
    try:
        if any(ch in loc.root for ch in "*?["):
            paths = [p for p in loc.fs.glob(loc.root) if loc.fs.isfile(p)]
        elif loc.fs.isdir(loc.root):
            paths = [p for p in loc.fs.ls(loc.root, detail=False) if loc.fs.isfile(p)]
        else:
            return [url]
    except Exception as exc:
        raise loc.error(f"cannot list input {loc.url}", exc) from None
    paths = sorted((p for p in paths if not posixpath.basename(p).startswith((".", "_"))), key=_natural_key)
    if not paths:
        raise DataError(f"input {loc.url}: no files (an empty folder, or a glob that matches none)")
    return [p if loc.is_local else loc.fs.unstrip_protocol(p) for p in paths]


def split_of_rows(first_row: int, n: int, seed: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of rows first_row .. first_row+n-1.

    A splitmix64 hash of (seed, row number) mapped to [0, 1): the same row always lands in the
    same split, however the file is chunked.
    """
    return split_of_row_numbers(np.arange(first_row, first_row + n, dtype=np.uint64), seed, fractions)


def split_of_row_numbers(rows: np.ndarray, seed: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """split_of_rows for arbitrary (non-contiguous) row numbers."""
    x = np.asarray(rows, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(2**53)
    return np.searchsorted(np.cumsum(fractions)[:2], u, side="right").astype(np.int8)


def check_split(split: Sequence[float]) -> tuple[float, float, float]:
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise DataError(f"split must be three non-negative fractions summing to 1, got {tuple(split)}")
    return (float(split[0]), float(split[1]), float(split[2]))


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


class CriteoSource(Source):
    created_by = "data_tools.criteo"
    label = LABEL

    def __init__(
        self, input_url: str, fields: list[FieldPlan], seed: int, fractions: tuple[float, float, float],
        storage_options: Mapping[str, Any] | None, min_count: int = 10, split_rule: str = "hash",
    ) -> None:
        self.min_count = min_count
        self.split_rule = split_rule
        self._split: list[np.ndarray] | None = None  # stratified: split index per row, per input
        self.input_url = input_url
        self.inputs = [
            open_text_input(url, storage_options, delimiter=None, header=None, columns=COLUMNS)
            for url in expand_inputs(input_url, storage_options)
        ]
        for inp in self.inputs:
            inp.require(COLUMNS)
        self.inp = self.inputs[0]
        self.fields = fields
        self.seed, self.fractions = seed, fractions

    def shards(self, engine: Engine) -> list[TextShard]:
        return [s for k, inp in enumerate(self.inputs) for s in plan_text_shards(inp, k, (0, 1, 2), engine)]

    def shard_bytes(self, shard: TextShard) -> int:
        return shard_bytes(self.inputs[shard.source], shard)

    def read(self, shard: TextShard, names: Sequence[str]) -> Iterator[Chunk]:
        inp, rows, base = self.inputs[shard.source], 0, shard.source * FILE_ROWS
        for offset, batch, position in inp.batches(COLUMNS, start=shard.start, end=shard.end, first_row=shard.first_row):
            labels = parse_labels(inp, batch.column(LABEL), offset, LABEL)
            tokens = {}
            for name in names:
                if name in NUMERIC:
                    tokens[name] = pa.array(_numeric(inp, batch.column(name), offset, name)).cast(pa.string())
                else:
                    tokens[name] = batch.column(name)
            rows += batch.num_rows
            if self.split_rule == "stratified":
                split = self._stratified(shard.source, offset, batch.num_rows)
            else:
                split = split_of_rows(base + offset, batch.num_rows, self.seed, self.fractions)
            yield Chunk(labels, tokens, split, position=position)
        check_shard_rows(inp, shard, rows)

    def _stratified(self, source: int, offset: int, n: int) -> np.ndarray:
        """Split index of rows offset..offset+n-1 of input `source`: the 10 stratified folds are
        dealt over the labels of every input (one label-only pass, on first use)."""
        if self._split is None:
            labels = [
                np.concatenate([parse_labels(inp, b.column(LABEL), o, LABEL) for o, b, _ in inp.batches([LABEL])] or [np.zeros(0)])
                for inp in self.inputs
            ]
            split = folds_to_splits(stratified_folds(np.concatenate(labels), 10, self.seed), x4_folds(self.fractions))
            self._split = np.split(split, np.cumsum([len(x) for x in labels])[:-1])
        part = self._split[source]
        if offset + n > len(part):
            raise DataError(f"{self.inputs[source].url}: changed while being read (more rows than counted)")
        return part[offset : offset + n]

    def spec(self) -> dict[str, Any]:
        return {
            "format": "criteo",
            "split_rule": self.split_rule,
            "input": display_url(self.input_url),
            **({"files": [inp.url for inp in self.inputs]} if len(self.inputs) > 1 else {}),
            "header": self.inp.header,
            "delimiter": self.inp.delimiter,
            # the input's column order, for scoring raw files without a header (tf4ctr predict)
            "raw_columns": list(self.inp.columns),
            "min_count": self.min_count,
            "split": list(self.fractions),
            "seed": self.seed,
            "numeric_fields": NUMERIC,
            "numeric_bucketing": NUMERIC_BUCKETING,
        }


def x4_folds(fractions: tuple[float, float, float]) -> list[int]:
    """Split fractions -> folds of 10 per split (0.8/0.1/0.1 -> [8, 1, 1]); DataError unless
    every fraction is a whole number of tenths."""
    folds = [round(f * 10) for f in fractions]
    if any(abs(f * 10 - k) > 1e-6 for f, k in zip(fractions, folds)):
        raise DataError(f"split_rule stratified deals 10 folds: split must be tenths (e.g. 0.8/0.1/0.1), got {list(fractions)}")
    return folds


def x4_csv_source(files: Sequence[str], opts: CriteoOptions, storage_options: Mapping[str, Any] | None) -> Source:
    """The BARS Criteo_x4 train/valid/test.csv: a bars-csv source with I1..I13 numeric (Criteo
    bucketing) and C1..C26 categorical; label column `Label` (or `label`)."""
    from .bars_csv import BarsSource

    if len(files) != 3:
        raise DataError(f"criteo x4 CSVs: expected three files (train, valid, test), got {len(files)}")
    header = open_text_input(files[0], storage_options, delimiter=",").columns
    label = "label" if "label" in header and "Label" not in header else "Label"
    entries = [*({"name": n, "kind": "numeric", "bucketing": "criteo"} for n in NUMERIC), *CATEGORICAL]
    source = BarsSource(
        (files[0], files[1], files[2]), label, None, entries, opts.vocab.field_defaults(), storage_options,
        created_by="data_tools.criteo", spec_format="criteo",
    )
    return source


def prepare_criteo(
    input_url: str | Sequence[str],
    out_url: str,
    options: CriteoOptions | None = None,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    engine: Engine | None = None,
    progress: Progress | None = None,
    **keys: Any,
) -> Manifest:
    """Convert a Criteo file (TSV without header, or CSV/TSV with header; .gz etc. inferred), or
    the files of a folder or glob (see expand_inputs); or a list of the three BARS x4
    train/valid/test.csv files (x4_csv_source).

    `options` and/or its flat keys (`min_count=2`, `split=(...)`, ...; data_tools.options).
    """
    opts = CriteoOptions.build(options, keys)
    source: Source
    if not isinstance(input_url, str):
        source = x4_csv_source(list(input_url), opts, storage_options)
    else:
        fractions = check_split(opts.splits.split)
        if opts.split_rule == "stratified":
            x4_folds(fractions)
        plans = resolve_fields(FIELDS, **opts.vocab.field_defaults(), kinds=("categorical",))
        source = CriteoSource(
            input_url, plans, opts.splits.seed, fractions, storage_options, opts.vocab.min_count, opts.split_rule,
        )
    return prepare(
        source, out_url, opts.write, engine=engine, overwrite=overwrite, storage_options=storage_options,
        vocab_memory_mb=opts.vocab.vocab_memory_mb, progress=progress,
    )
