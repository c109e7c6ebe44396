"""Offline scoring: a prepared split or raw logs -> Parquet of (row, id/label columns, score).

Prepared data (a folder or URL with manifest.json) is read with the training reader, so the ids
are exactly what training and evaluation saw. Raw files (CSV / TSV / Parquet, in the columns
the dataset was prepared from; one or several, rows numbered on across them in the order given)
go through the saved vocabularies (serving.features). A CSV/TSV whose first line names none of
the model's fields has no header: its columns are ``columns`` (``--columns``) or the raw column
order the dataset recorded when it was prepared (spec.raw_columns; criteo and bars-csv sources).
The output is written to a temporary name beside the target and renamed once complete: a failed
or interrupted predict leaves no partial file under the target name.

Output columns: ``row`` (int64, the row's index in the split, or in the raw files), the label
(and for prepared data the ``_group`` key) or, for raw input, the label, group and ``keep``
columns as they were read, then ``score`` (float32 probability).

The input is planned as *shares* (`plan`): a prepared split as ranges of its batches, a raw
Parquet file as ranges of its rows, a raw text file whole. One process scores them in order
(`predict`); serving.parallel hands them to Ray workers and writes the same file. Either way a
share is cut into the same batches: the model sees exactly the batch a row would be in when one
process scores everything (prepared: the reader's batches of the whole split; raw: batch_size
rows counted from the start of the file). That is what makes the output of N workers equal the
output of one bit for bit: a row's score can differ in the last bit with the batch it is in (CPU
BLAS picks its GEMM blocking by the matrix sizes; a few rows in a thousand, seen here), so a
split that cut batches elsewhere (the reader's rank shares, a file's row groups) would not.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import uuid
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import GROUP_COLUMN, MANIFEST_NAME, load_manifest
from tf4ctr_dist.data.storage import resolve

RAW_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".csv.gz", ".tsv.gz")


def is_prepared(url: str, storage_options: Optional[dict] = None) -> bool:
    loc = resolve(url, storage_options)
    try:
        return bool(loc.fs.exists(loc.path(MANIFEST_NAME)))
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Share:
    """A piece of the input one worker scores on its own, in batches of the whole input.

    kind "prepared": batches [start, stop) of the split, as one reader (world size 1, no shuffle,
    no padding) batches it; rows are numbered as in the split.
    kind "parquet": rows [start, stop) of a raw Parquet file (start a multiple of the batch size).
    kind "text": a whole raw CSV/TSV file (it cannot be cut without reading it), start 0.
    Raw rows are numbered within their file (``file``: its index in the input list); the output
    numbers them on across the files. names: the columns of a text file without a header line
    (None: it has one); delimiter: a text file's."""

    kind: str
    url: str
    file: int = 0
    start: int = 0
    stop: Optional[int] = None
    split: str = "test"
    names: Optional[tuple[str, ...]] = None
    delimiter: str = ","

    def describe(self) -> str:
        if self.kind == "prepared":
            return f"{self.url} split {self.split!r} batches {self.start}..{self.stop}"
        if self.kind == "parquet":
            return f"{self.url} rows {self.start}..{self.stop}"
        return self.url


def plan(model: Any, data: Sequence[str], split: str, batch_size: int, keep: Sequence[str] = (),
         columns: Optional[Sequence[str]] = None, storage_options: Optional[dict] = None,
         pieces: int = 1) -> list[Share]:
    """The shares of ``data`` (one prepared dataset URL, or raw files), checked against
    ``model`` (a Scorer or export.ModelInfo: feature_names, label, group, raw_columns) before any
    scoring: fields, split, files, headers. pieces > 1: a prepared split and each Parquet file
    are cut, at batch boundaries, into up to ``pieces`` shares; text files stay whole."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    urls = list(data)
    if not urls:
        raise DataError("nothing to score: no input given")
    prepared = [u for u in urls if is_prepared(u, storage_options)]
    if prepared:
        if len(urls) > 1:
            raise DataError(f"{prepared[0]} is a prepared dataset: score it alone (one --data), not with other inputs")
        if keep:
            raise DataError(f"--keep applies to raw input; {urls[0]} is a prepared dataset (its columns are ids)")
        if columns:
            raise DataError(f"--columns applies to raw text files; {urls[0]} is a prepared dataset")
        return _plan_prepared(model, urls[0], split, batch_size, storage_options, pieces)
    shares: list[Share] = []
    for i, url in enumerate(urls):
        loc = resolve(url, storage_options)
        if not loc.fs.exists(loc.path()):
            raise DataError(f"{url}: no such file (and no {MANIFEST_NAME}: not a prepared dataset either)")
        if url.lower().endswith(".parquet"):
            shares += _plan_parquet(loc, url, i, batch_size, pieces)
        else:
            shares.append(_plan_text(model, loc, url, i, keep, columns))
    return shares


def _plan_prepared(model: Any, url: str, split: str, batch_size: int, storage_options: Optional[dict],
                   pieces: int) -> list[Share]:
    manifest = load_manifest(url, storage_options)
    if manifest.field_names != list(model.feature_names):
        raise DataError(f"{url}: fields {manifest.field_names} differ from the model's {list(model.feature_names)}")
    manifest.split(split)  # a DataError naming the splits it has
    with _reader(url, split, manifest, batch_size, storage_options) as reader:
        total = reader.num_batches(0)
    return [Share("prepared", url, start=a, stop=b, split=split) for a, b in _ranges(total, pieces)]


def _ranges(total: int, pieces: int) -> list[tuple[int, int]]:
    """[0, total) in up to ``pieces`` contiguous non-empty ranges of near-equal length."""
    pieces = max(1, min(pieces, total))
    return [(k * total // pieces, (k + 1) * total // pieces) for k in range(pieces)] if total else [(0, 0)]


def _plan_parquet(loc, url: str, file: int, batch_size: int, pieces: int) -> list[Share]:
    try:
        with loc.fs.open(loc.path(), "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{url}: not a readable Parquet file ({e})") from None
    batches = -(-rows // batch_size)
    return [Share("parquet", url, file, a * batch_size, min(rows, b * batch_size)) for a, b in _ranges(batches, pieces)]


def _plan_text(model: Any, loc, url: str, file: int, keep: Sequence[str], columns: Optional[Sequence[str]]) -> Share:
    """A text file's share: its delimiter, and its columns when the first line is no header."""
    compression = "gzip" if url.lower().endswith(".gz") else None
    with loc.fs.open(loc.path(), "rb", compression=compression) as f:
        head = f.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if not head.strip():
        raise DataError(f"{url}: empty first line (expected a header or a data line)")
    delimiter = "\t" if "\t" in head else ","
    cells = [c.strip() for c in next(csv.reader([head], delimiter=delimiter))]
    wanted = {*model.feature_names, *(c for c in (model.label, model.group, *keep) if c)}
    if any(c in wanted for c in cells):
        if columns:
            raise DataError(f"{url}: its first line is a header ({head[:80]!r}); --columns is for files without one")
        return Share("text", url, file, delimiter=delimiter)
    names = list(columns or getattr(model, "raw_columns", None) or [])
    if not names:
        raise DataError(f"{url}: the first line {head[:80]!r} names none of the model's fields, and the model's "
                        "dataset recorded no raw column order (prepared before it was recorded, or by a format that "
                        "does not): give the file's columns in order with --columns label,field1,... "
                        "(or add a header line)")
    source = "--columns" if columns else "the dataset's raw column order"
    missing = [n for n in model.feature_names if n not in names]
    if missing:
        raise DataError(f"{url}: {source} {names} lack(s) the model's field(s) {missing}")
    if len(cells) != len(names):
        raise DataError(f"{url}: line 1 has {len(cells)} columns; expected {len(names)} "
                        f"({source}: {names[0]}..{names[-1]})")
    return Share("text", url, file, names=tuple(names), delimiter=delimiter)


def predict(scorer: Any, data: str | Sequence[str], out: str, split: str = "test", batch_size: int = 65_536,
            keep: Sequence[str] = (), storage_options: Optional[dict] = None,
            columns: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Score ``data`` (a prepared dataset's ``split``, or raw files) in this process and write
    ``out``. scorer: a serving Scorer; columns: the columns of raw text files without a header."""
    urls = [data] if isinstance(data, str) else list(data)
    shares = plan(scorer, urls, split, batch_size, keep, columns, storage_options)
    tables = numbered((share, score_share(scorer, share, batch_size, keep, storage_options)) for share in shares)
    rows = write_atomic(out, tables, storage_options)
    return {"out": out, "rows": rows}


def numbered(shares: Iterable[tuple[Share, Iterable[pa.Table]]]) -> Iterator[pa.Table]:
    """The tables of every (share, its tables), in order, with raw rows numbered on across the
    files (a share's rows are numbered within its file); every table must have the first one's
    columns."""
    base, file, file_rows = 0, 0, 0
    schema: Optional[pa.Schema] = None
    for share, tables in shares:
        if share.kind != "prepared" and share.file != file:
            base, file, file_rows = base + file_rows, share.file, 0
        for table in tables:
            if schema is None:
                schema = table.schema
            elif not table.schema.equals(schema, check_metadata=False):
                raise DataError(f"{share.url}: its output columns {_columns(table.schema)} differ from the first "
                                f"input's {_columns(schema)}; score files of different layouts separately")
            if share.kind != "prepared":
                file_rows += table.num_rows
                if base:
                    table = table.set_column(0, "row", pc.add(table.column("row"), pa.scalar(base, pa.int64())))
            yield table


def _columns(schema: pa.Schema) -> list[str]:
    return [f"{f.name}: {f.type}" for f in schema]


def score_share(scorer: Any, share: Share, batch_size: int, keep: Sequence[str] = (),
                storage_options: Optional[dict] = None) -> Iterator[pa.Table]:
    """The scored rows of one share, a table per batch (rows numbered within the file for raw
    input, as in the split for prepared data)."""
    if share.kind == "prepared":
        return _prepared_batches(scorer, share, batch_size, storage_options)
    return _raw_batches(scorer, share, batch_size, keep, storage_options)


def _reader(url: str, split: str, manifest, batch_size: int, storage_options: Optional[dict]):
    from tf4ctr_dist.data.reader import ParquetSplitReader

    return ParquetSplitReader(url, split, manifest=manifest, rank=0, world_size=1, local_batch_size=batch_size,
                              shuffle=False, storage_options=storage_options, pad_tail=False)


def _prepared_batches(scorer: Any, share: Share, batch_size: int, storage_options: Optional[dict]) -> Iterator[pa.Table]:
    manifest = load_manifest(share.url, storage_options)
    if manifest.field_names != scorer.feature_names:
        raise DataError(f"{share.url}: fields {manifest.field_names} differ from the model's {scorer.feature_names}")
    manifest.split(share.split)  # a DataError naming the splits it has
    with _reader(share.url, share.split, manifest, batch_size, storage_options) as reader:
        stop = reader.num_batches(0) if share.stop is None else share.stop
        # start_batch: the batches of the uninterrupted epoch from there on (earlier windows unread)
        for batch in islice(reader.iter_epoch(0, start_batch=share.start), stop - share.start):
            keep = (batch.valid > 0).numpy()
            scores = scorer(batch.sparse_features).numpy()[keep]
            columns = {"row": batch.sample_ids.numpy()[keep], manifest.label: batch.labels.numpy()[keep]}
            if manifest.group:
                columns[GROUP_COLUMN] = batch.group_ids.numpy()[keep]
            columns["score"] = scores.astype(np.float32)
            yield pa.table(columns)


def _raw_batches(scorer: Any, share: Share, batch_size: int, keep: Sequence[str],
                 storage_options: Optional[dict]) -> Iterator[pa.Table]:
    url = share.url
    loc = resolve(url, storage_options)
    path = loc.path()
    if not loc.fs.exists(path):
        raise DataError(f"{url}: no such file (and no {MANIFEST_NAME}: not a prepared dataset either)")
    passthrough = [c for c in (scorer.label, scorer.group, *keep) if c]
    wanted = set(scorer.feature_names) | set(passthrough)
    first = share.start
    for table in _exact_batches(_read_raw(loc, path, share, batch_size, wanted), batch_size):
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


def _exact_batches(tables: Iterable[pa.Table], batch_size: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` cut into batches of exactly batch_size rows (the last may be
    smaller), however the reader happened to cut them (CSV blocks, Parquet row groups)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        while table.num_rows:
            take = min(batch_size - held, table.num_rows)
            pending.append(table.slice(0, take))
            held += take
            table = table.slice(take)
            if held == batch_size:
                yield pa.concat_tables(pending).combine_chunks()
                pending, held = [], 0
    if held:
        yield pa.concat_tables(pending).combine_chunks()


def _read_raw(loc, path: str, share: Share, batch_size: int, wanted: set[str]) -> Iterator[pa.Table]:
    """Record batches of a raw file's share; text columns are read as strings (as `prepare` does)."""
    import pyarrow.csv as pacsv

    url = share.url
    if share.kind == "parquet":
        with loc.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            columns = [c for c in pf.schema_arrow.names if c in wanted]
            stop = pf.metadata.num_rows if share.stop is None else share.stop
            groups, skip, first = [], 0, 0  # the row groups holding rows [start, stop)
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if first + n > share.start and first < stop:
                    if not groups:
                        skip = share.start - first
                    groups.append(g)
                first += n
            if not groups:
                return
            left = stop - share.start
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns, row_groups=groups):
                table = pa.Table.from_batches([batch])
                if skip:
                    cut = min(skip, table.num_rows)
                    table, skip = table.slice(cut), skip - cut
                table = table.slice(0, left)
                left -= table.num_rows
                if table.num_rows:
                    yield table
                if left <= 0:
                    return
        return
    compression = "gzip" if url.lower().endswith(".gz") else None
    delimiter = share.delimiter
    bad: list[Any] = []

    def invalid(row: Any) -> str:  # skip, then fail naming the line (pyarrow's rows carry no number here)
        bad.append(row)
        return "skip"

    with loc.fs.open(path, "rb", compression=compression) as f:
        if share.names is None:
            head = f.readline().decode("utf-8-sig", errors="replace")
            names = [c.strip() for c in next(csv.reader([head.rstrip("\r\n")], delimiter=delimiter))]
            f.seek(0)
        else:
            names = list(share.names)
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=1 << 22, column_names=names, skip_rows=0 if share.names else 1),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names},
                                                 include_columns=[c for c in names if c in wanted]),
        )
        kind = "TSV" if delimiter == "\t" else "CSV"
        try:
            for batch in reader:
                if bad:
                    break
                yield pa.Table.from_batches([batch])
        except pa.ArrowInvalid as e:
            raise DataError(f"{url}: malformed {kind} ({e})") from None
    if bad:
        where = _bad_line(loc, path, compression, delimiter, len(names), share.names is None)
        found = f"line {where[0]}: {where[1]} columns" if where else "a row with other than that many columns"
        raise DataError(f"{url}: {found}, expected {len(names)} ({names[0]}..{names[-1]}): {bad[0].text[:80]!r}")


def _bad_line(loc, path: str, compression: Optional[str], delimiter: str, expected: int,
              header: bool) -> Optional[tuple[int, int]]:
    """(line number, columns) of the first record of the file without ``expected`` columns;
    only on the error path: it reads the file again up to that line."""
    with loc.fs.open(path, "rb", compression=compression) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
        records = csv.reader(text, delimiter=delimiter)
        for record in records:
            if header and records.line_num == 1 or not record:
                continue
            if len(record) != expected:
                return records.line_num, len(record)
    return None


def write_atomic(out: str, batches: Iterable[pa.Table], storage_options: Optional[dict],
                 allow_empty: bool = False) -> int:
    """Write ``batches`` (a row group each) as the Parquet file ``out``, under a temporary name
    renamed once complete; returns the row count. No rows at all is a DataError (allow_empty:
    no file is written and 0 returned)."""
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
                if allow_empty:
                    return 0
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
