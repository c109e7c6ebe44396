"""Offline scoring: a prepared split or raw logs -> Parquet of (row, id/label columns, score).

Prepared data (a folder or URL with manifest.json) is read with the training reader, so the ids
are exactly what training and evaluation saw. Raw files (CSV / TSV / Parquet, in the columns
the dataset was prepared from) go through the saved vocabularies (serving.features). The output
is written to a temporary name beside the target and renamed once complete: a failed or
interrupted predict leaves no partial file under the target name.

Output columns: ``row`` (int64, the row's index in the split or file), the label (and for
prepared data the ``_group`` key) or, for raw input, the label, group and ``keep`` columns as
they were read, then ``score`` (float32 probability).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import GROUP_COLUMN, MANIFEST_NAME, load_manifest
from tf4ctr_dist.data.storage import resolve
from tf4ctr_dist.serving.scorer import Scorer

RAW_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".csv.gz", ".tsv.gz")


def is_prepared(url: str, storage_options: Optional[dict] = None) -> bool:
    loc = resolve(url, storage_options)
    try:
        return bool(loc.fs.exists(loc.path(MANIFEST_NAME)))
    except (OSError, ValueError):
        return False


def predict(scorer: Scorer, data: str, out: str, split: str = "test", batch_size: int = 65_536,
            keep: Sequence[str] = (), storage_options: Optional[dict] = None) -> dict[str, Any]:
    """Score ``data`` (a prepared dataset's ``split``, or a raw file) and write ``out``."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if is_prepared(data, storage_options):
        if keep:
            raise DataError(f"--keep applies to raw input; {data} is a prepared dataset (its columns are ids)")
        batches = _prepared_batches(scorer, data, split, batch_size, storage_options)
    else:
        batches = _raw_batches(scorer, data, batch_size, keep, storage_options)
    rows = _write_atomic(out, batches, storage_options)
    return {"out": out, "rows": rows}


def _prepared_batches(scorer: Scorer, url: str, split: str, batch_size: int,
                      storage_options: Optional[dict]) -> Iterator[pa.Table]:
    from tf4ctr_dist.data.reader import ParquetSplitReader

    manifest = load_manifest(url, storage_options)
    if manifest.field_names != scorer.feature_names:
        raise DataError(f"{url}: fields {manifest.field_names} differ from the model's {scorer.feature_names}")
    manifest.split(split)  # a DataError naming the splits it has
    reader = ParquetSplitReader(url, split, manifest=manifest, rank=0, world_size=1, local_batch_size=batch_size,
                                shuffle=False, storage_options=storage_options, pad_tail=False)
    with reader:
        for batch in reader.iter_epoch(0):
            keep = (batch.valid > 0).numpy()
            scores = scorer(batch.sparse_features).numpy()[keep]
            columns = {"row": batch.sample_ids.numpy()[keep], manifest.label: batch.labels.numpy()[keep]}
            if manifest.group:
                columns[GROUP_COLUMN] = batch.group_ids.numpy()[keep]
            columns["score"] = scores.astype(np.float32)
            yield pa.table(columns)


def _raw_batches(scorer: Scorer, url: str, batch_size: int, keep: Sequence[str],
                 storage_options: Optional[dict]) -> Iterator[pa.Table]:
    loc = resolve(url, storage_options)
    path = loc.path()
    if not loc.fs.exists(path):
        raise DataError(f"{url}: no such file (and no {MANIFEST_NAME}: not a prepared dataset either)")
    passthrough = [c for c in (scorer.label, scorer.group, *keep) if c]
    first = 0
    for table in _read_raw(loc, path, url, batch_size, set(scorer.feature_names) | set(passthrough)):
        missing = [c for c in scorer.feature_names if c not in table.column_names]
        if missing:
            raise DataError(f"{url}: missing column(s) {missing}; the model's fields are {scorer.feature_names}")
        absent = [c for c in keep if c not in table.column_names]
        if absent:
            raise DataError(f"{url}: --keep column(s) {absent} not in the file (has {table.column_names})")
        try:
            scores = scorer.score(table, batch_size)
        except DataError as e:
            raise DataError(f"{url} rows {first}..{first + table.num_rows - 1}: {e}") from None
        columns = {"row": np.arange(first, first + table.num_rows, dtype=np.int64)}
        for c in dict.fromkeys(passthrough):
            if c in table.column_names and c != "row":
                columns[c] = table.column(c)
        columns["score"] = scores.astype(np.float32)
        first += table.num_rows
        yield pa.table(columns)


def _read_raw(loc, path: str, url: str, batch_size: int, wanted: set[str]) -> Iterator[pa.Table]:
    """Record batches of a raw file; text columns are read as strings (as `prepare` does)."""
    import pyarrow.csv as pacsv

    name = url.lower()
    if name.endswith(".parquet"):
        with loc.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            columns = [c for c in pf.schema_arrow.names if c in wanted]
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                yield pa.Table.from_batches([batch])
        return
    compression = "gzip" if name.endswith(".gz") else None
    with loc.fs.open(path, "rb", compression=compression) as f:
        head = f.readline().decode("utf-8", errors="replace")
        delimiter = "\t" if "\t" in head else ","
        names = [c.strip() for c in head.rstrip("\r\n").split(delimiter)]
        if not any(n in wanted for n in names):
            raise DataError(f"{url}: the first line {head.strip()[:80]!r} names none of the model's fields "
                            "(raw text input needs a header line, as BARS-style CSVs have)")
        f.seek(0)
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names},
                                                 include_columns=[c for c in names if c in wanted]),
        )
        try:
            for batch in reader:
                yield pa.Table.from_batches([batch])
        except pa.ArrowInvalid as e:
            raise DataError(f"{url}: malformed {('TSV' if delimiter == chr(9) else 'CSV')} ({e})") from None


def _write_atomic(out: str, batches: Iterator[pa.Table], storage_options: Optional[dict]) -> int:
    loc = resolve(out, storage_options)
    target = loc.path()
    parent = posixpath.dirname(target)
    if parent:
        loc.makedirs(parent)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    rows = 0
    writer = None
    try:
        with loc.fs.open(tmp, "wb") as f:
            for table in batches:
                if writer is None:
                    writer = pq.ParquetWriter(f, table.schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:
                raise DataError("nothing to score: the input has no rows")
            writer.close()
        if loc.is_local:
            os.replace(tmp, target)
        else:
            loc.fs.mv(tmp, target)
    finally:
        try:
            if loc.fs.exists(tmp):
                loc.fs.rm(tmp)
        except OSError:
            pass
    return rows
