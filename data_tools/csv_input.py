"""Streaming text-table inputs (CSV / TSV, optionally compressed) read as strings, with
error messages that name the file, column and line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from fsspec.compression import compr
from fsspec.utils import infer_compression

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.storage import Location, resolve

BLOCK_SIZE = 4 << 20  # bytes per parsed CSV block. Arrow's streaming reader keeps ~40 blocks in
# flight (~40 x BLOCK_SIZE of RSS, measured with pyarrow 26): 4 MiB costs ~5% CPU against 8 MiB
# and saves ~150 MiB.


@dataclass
class TextInput:
    """One input file: where it is, its column names and whether the first line is a header."""

    loc: Location
    columns: list[str]
    header: bool
    delimiter: str

    @property
    def url(self) -> str:
        return self.loc.url

    def require(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.columns]
        if missing:
            hint = ""
            if len(self.columns) == 1:
                other = next((sep for sep in ("\t", ",", ";", "|", "::") if sep != self.delimiter and sep in self.columns[0]), None)
                if other:
                    hint = f" (line 1 has one column: is the separator {other!r} instead of {self.delimiter!r}?)"
            raise DataError(f"{self.url}: missing column(s) {missing}; the header has {self.columns}{hint}")

    def batches(
        self, columns: list[str], *, start: int = 0, end: int | None = None, first_row: int = 0
    ) -> Iterator[tuple[int, pa.RecordBatch, int | None]]:
        """Yield (row offset of the batch's first data row, batch of string columns, bytes of
        the file from `start` behind the rows yielded so far (estimated, see _behind; None when
        the file cannot tell), for progress lines).

        start/end: read only the bytes [start, end) of an uncompressed file (both on line
        boundaries, see plan_text_shards); first_row: the row number of its first data row.
        """
        ranged = start > 0 or end is not None
        read = pacsv.ReadOptions(
            block_size=BLOCK_SIZE,
            column_names=self.columns,
            skip_rows=1 if self.header and start == 0 else 0,
        )
        parse = pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=False)
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in self.columns},
            include_columns=columns,
            strings_can_be_null=False,  # an empty cell is "" (missing -> OOV), never null
            quoted_strings_can_be_null=False,
        )
        offset = first_row
        try:
            with self.loc.fs.open(self.loc.path(), "rb") as raw:
                stream: Any = raw
                if ranged:
                    raw.seek(start)
                    stream = _RangeReader(raw, (end if end is not None else self.size()) - start)
                elif self.compressed:
                    # Decompressed here rather than by fs.open(compression=...), so that `raw`
                    # still tells how much of the stored file has been read.
                    stream = compr[infer_compression(self.loc.path())](raw, mode="r")
                reader = pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
                try:
                    for blocks, batch in enumerate(reader, 1):
                        yield offset, batch, _behind(raw, start, stream if self.compressed else None, blocks)
                        offset += batch.num_rows
                finally:
                    # Stop pyarrow's read-ahead before the file closes: a reader left running on
                    # a closed Python file aborts the interpreter at exit.
                    reader.close()
        except DataError:
            raise
        except (pa.ArrowInvalid, csv.Error) as exc:
            line = offset + (2 if self.header else 1)
            found = None if ranged else self._first_bad_line(line)
            if found:
                raise DataError(f"{self.url}: malformed {self._kind()}: {found}") from None
            raise DataError(f"{self.url}: malformed {self._kind()} at or after line {line}: {exc}") from None
        except Exception as exc:
            raise self.loc.error(f"cannot read {self.url}", exc) from None

    def _first_bad_line(self, from_line: int, max_lines: int = 2_000_000) -> str | None:
        """Arrow names only the block a parse error is in; this re-reads the file from that
        block's first line (1-based ``from_line``) and names the first line that has the wrong
        number of columns, is not UTF-8, or is longer than a parse block. None: not found within
        ``max_lines`` lines (the caller keeps Arrow's message)."""
        expected = len(self.columns)
        try:
            with self.loc.fs.open(self.loc.path(), "rb") as raw:
                stream: Any = compr[infer_compression(self.loc.path())](raw, mode="r") if self.compressed else raw
                for number, data in enumerate(stream, 1):
                    if number < from_line:
                        continue
                    if number >= from_line + max_lines:
                        return None
                    if len(data) > BLOCK_SIZE:
                        return (f"line {number} is {len(data):,} bytes long, more than one parse block "
                                f"({BLOCK_SIZE:,} bytes); is a quote or the line end missing?")
                    try:
                        text = data.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError as e:
                        return f"line {number} is not valid UTF-8 (byte {e.start + 1}: {data[e.start:e.start + 1]!r})"
                    got = len(next(csv.reader([text], delimiter=self.delimiter), []))
                    if got != expected and text:
                        return f"line {number} has {got} columns, expected {expected} ({', '.join(self.columns)})"
        except Exception:  # the first error is the one to report
            return None
        return None

    def size(self) -> int:
        return int(self.loc.fs.size(self.loc.path()))

    @property
    def compressed(self) -> bool:
        return infer_compression(self.loc.path()) is not None

    def line_of(self, row: int) -> int:
        """1-based line number of data row `row` (0-based), assuming one line per record."""
        return row + (2 if self.header else 1)

    def _kind(self) -> str:
        return "TSV" if self.delimiter == "\t" else "CSV"


def _behind(raw: Any, start: int, decompressed: Any, blocks: int) -> int | None:
    """Bytes of the stored file (from `start`) behind the first `blocks` batches. Arrow reads
    ahead by up to ~40 blocks (BLOCK_SIZE), so the file position alone would say 100% while a
    file of a few hundred MB is still being parsed; but it parses one block per batch, so the
    text behind the batches is about blocks * BLOCK_SIZE (a block ends at a line end: slightly
    less), scaled to stored bytes for a compressed file."""
    try:
        read = int(raw.tell()) - start
        text = int(decompressed.tell()) if decompressed is not None else read
    except (OSError, AttributeError, ValueError):  # no position: progress without bytes, not an error
        return None
    parsed = blocks * BLOCK_SIZE
    return read if text <= parsed else read * parsed // text


def open_text_input(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    delimiter: str | None = None,
    header: bool | None = True,
    columns: list[str] | None = None,
) -> TextInput:
    """Check that the input exists and is not empty; read its header (or use `columns`).

    delimiter None: sniffed from the first line (tab if it has one, else comma).
    header None: the first line is a header unless its first cell is a number.
    """
    loc = resolve(url, storage_options)
    try:
        if not loc.fs.exists(loc.path()):
            raise DataError(f"input file not found: {loc.url}")
        if loc.fs.isdir(loc.path()):
            raise DataError(f"input {loc.url} is a directory; expected a CSV/TSV file")
        first, has_data = _peek(loc)
    except DataError:
        raise
    except Exception as exc:
        raise loc.error(f"cannot read input {loc.url}", exc) from None
    if first.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in first:
        # UTF-8 allows NUL, so a UTF-16 file (what some spreadsheet tools save as "Unicode
        # text") would otherwise parse into column names and tokens with a NUL between letters.
        raise DataError(f"{loc.url}: line 1 has NUL bytes or a UTF-16 byte-order mark; expected UTF-8 text "
                        "(a UTF-16 or binary file? convert it, e.g. iconv -f UTF-16 -t UTF-8)")
    text = first.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if not text.strip():
        raise DataError(f"{loc.url}: empty file (expected a {'header line' if header else 'data line'})")
    if delimiter is None:
        delimiter = "\t" if "\t" in text else ","
    if header is None:
        header = not _is_number(next(csv.reader(io.StringIO(text), delimiter=delimiter))[0].strip())
    if header:
        names = next(csv.reader(io.StringIO(text), delimiter=delimiter))
        names = [n.strip() for n in names]
        if any(not n for n in names):
            raise DataError(f"{loc.url}: header line 1 has an empty column name: {names}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{loc.url}: header line 1 repeats column name(s) {dupes}")
    else:
        if columns is None:
            raise DataError(f"{loc.url}: no header and no column names given")
        names = list(columns)
        found = len(next(csv.reader(io.StringIO(text), delimiter=delimiter)))
        if found != len(names):
            raise DataError(f"{loc.url}: line 1 has {found} columns; expected {len(names)} ({names[0]}..{names[-1]})")
    result = TextInput(loc=loc, columns=names, header=header, delimiter=delimiter)
    if not has_data and (header or not first.strip()):
        raise DataError(f"{loc.url}: empty file (a header but no data rows)")
    return result


def _peek(loc: Location, limit: int = 1 << 20) -> tuple[bytes, bool]:
    """The first line, and whether anything but whitespace follows it (reads at most ~`limit`)."""
    data = b""
    with loc.fs.open(loc.path(), "rb", compression="infer") as raw:
        while len(data) < limit:
            chunk = raw.read(64 << 10)
            if not chunk:
                break
            data += chunk
            newline = data.find(b"\n")
            if newline >= 0 and data[newline + 1 :].strip():
                break
    first, _, rest = data.partition(b"\n")
    return first, bool(rest.strip())


def parse_labels(inp: TextInput, column: pa.Array, offset: int, name: str) -> np.ndarray:
    """Labels as float32 in {0, 1}; DataError naming file, line and value otherwise."""
    text = pc.utf8_trim_whitespace(column)
    try:
        values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero((values != 0.0) & (values != 1.0))
    except pa.ArrowInvalid:
        strings = text.to_pylist()
        bad = np.array([i for i, s in enumerate(strings) if not _is_number(s)] or [0])
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{inp.url}: line {inp.line_of(offset + row)}: column {name!r} = {column[row].as_py()!r}; "
            "expected 0 or 1"
        )
    return values.astype(np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def group_ids(column: pa.Array) -> np.ndarray:
    """Stable 64-bit ids of raw group values (siphash of the UTF-8 text; 0 is reserved)."""
    values = column.to_numpy(zero_copy_only=False)
    hashed = pd.util.hash_array(np.asarray(values, dtype=object), categorize=True).view(np.int64)
    hashed[hashed == 0] = 1
    return hashed


# ---- byte-range shards of one text file (the Ray engine's unit of work) -----------------------


class _RangeReader(io.RawIOBase):
    """Read-only view of the next `length` bytes of a file object."""

    def __init__(self, raw: Any, length: int) -> None:
        self._raw, self._left = raw, max(0, length)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._left)
        if n <= 0:
            return 0
        data = self._raw.read(n)
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)


@dataclass(frozen=True)
class TextShard:
    """Bytes [start, end) of input `source` (end None: to the end), whose first data row is row
    `first_row` of the file; `rows` is the row count found by the counting pass (None: unknown)."""

    source: int
    start: int
    end: int | None
    first_row: int
    rows: int | None
    splits: tuple[int, ...]


def _line_starts(inp: TextInput, target_bytes: int) -> list[int]:
    """Byte offsets just after a newline, about every target_bytes (0 and the size included)."""
    size = inp.size()
    cuts = [0]
    with inp.loc.fs.open(inp.loc.path(), "rb") as f:
        for k in range(1, -(-size // target_bytes)):
            pos = max(k * target_bytes, cuts[-1])
            f.seek(pos)
            while True:
                block = f.read(64 << 10)
                if not block:
                    pos = size
                    break
                newline = block.find(b"\n")
                if newline >= 0:
                    pos += newline + 1
                    break
                pos += len(block)
            if cuts[-1] < pos < size:
                cuts.append(pos)
    return cuts + [size]


def count_rows(inp: TextInput, span: tuple[int, int]) -> int:
    """Rows pyarrow's CSV reader yields for bytes [start, end) (excluding the header line when
    start is 0): lines with any character but a trailing carriage return. Vectorised, ~GB/s."""
    start, end = span
    rows, open_line = 0, False  # open_line: the unterminated line so far has content
    with inp.loc.fs.open(inp.loc.path(), "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(8 << 20, left))
            if not block:
                break
            left -= len(block)
            a = np.frombuffer(block, dtype=np.uint8)
            newlines = np.flatnonzero(a == 10)
            content = (a != 10) & (a != 13)
            if newlines.size == 0:
                open_line = open_line or bool(content.any())
                continue
            # content per line: a cumulative count of content bytes between newlines
            cum = np.concatenate([[0], np.cumsum(content)])
            ends = newlines
            starts = np.concatenate([[0], newlines[:-1] + 1])
            has = (cum[ends] - cum[starts]) > 0
            has[0] |= open_line
            rows += int(np.count_nonzero(has))
            open_line = bool(content[newlines[-1] + 1 :].any())
    rows += int(open_line)
    if start == 0 and inp.header:
        rows -= 1
    return rows


def shard_bytes(inp: TextInput, shard: TextShard) -> int:
    """Bytes of the file (as stored) that the shard covers: the total of its progress."""
    return (shard.end if shard.end is not None else inp.size()) - shard.start


def plan_text_shards(inp: TextInput, source: int, splits: tuple[int, ...], engine: Any) -> list[TextShard]:
    """One shard for the whole file (local engine, compressed or small files), else ranges of
    about engine.shard_bytes cut at line ends, with row offsets from a parallel row count."""
    target = getattr(engine, "shard_bytes", None)
    if not target or inp.compressed or inp.size() <= target:
        return [TextShard(source, 0, None, 0, None, splits)]
    cuts = _line_starts(inp, target)
    spans = list(zip(cuts[:-1], cuts[1:]))
    counts = list(engine.map(count_rows, spans, inp))
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    return [TextShard(source, a, b, int(r0), int(n), splits) for (a, b), r0, n in zip(spans, firsts, counts)]


def check_shard_rows(inp: TextInput, shard: TextShard, rows: int) -> None:
    """A ranged shard must yield exactly the rows the counting pass found (else row numbers, and
    with them the row-hash splits, would be wrong)."""
    if shard.rows is not None and rows != shard.rows:
        raise DataError(
            f"{inp.url}: bytes [{shard.start}, {shard.end}) parsed as {rows} rows but hold {shard.rows} "
            "non-empty lines (bare carriage-return line endings or blank lines with spaces?); "
            "prepare this file with --engine local"
        )
