"""Checks shared by the reader and `python -m data_tools check` (no torch import here)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import DataError
from .manifest import GROUP_COLUMN, Manifest


def validate_row_group(table: pa.Table, manifest: Manifest, where: str) -> None:
    """Cheap vectorised checks so a bad dataset fails loudly instead of training on garbage."""
    label = table.column(manifest.label)
    if label.null_count:
        raise DataError(f"{where}: column {manifest.label!r} has nulls; expected 0 or 1")
    if pc.any(pc.and_(pc.not_equal(label, 0), pc.not_equal(label, 1))).as_py():
        raise DataError(f"{where}: column {manifest.label!r} has values other than 0 and 1")
    groups = table.column(GROUP_COLUMN)
    if groups.null_count:  # a null would become one made-up id, merging its rows into one gAUC group
        raise DataError(f"{where}: column {GROUP_COLUMN!r} has {groups.null_count} null(s); expected a 64-bit "
                        "group id in every row (0 when the dataset has no group column)")
    for spec in manifest.fields:
        column = table.column(spec.name)
        if spec.kind == "numeric":
            _check_values(column, spec.name, where)
            continue
        if column.null_count:
            raise DataError(f"{where}: column {spec.name!r} has nulls; expected ids")
        ids = pc.list_flatten(column) if spec.kind == "sequence" else column
        if len(ids):
            bounds = pc.min_max(ids).as_py()
            if bounds["min"] < 0 or bounds["max"] >= spec.vocab_size:
                raise DataError(
                    f"{where}: column {spec.name!r} has ids in [{bounds['min']}, {bounds['max']}]; "
                    f"expected [0, {spec.vocab_size}) (vocab_size)"
                )
        if spec.kind == "sequence" and len(column):
            longest = pc.max(pc.list_value_length(column)).as_py() or 0
            if spec.max_len is not None and longest > spec.max_len:
                raise DataError(f"{where}: column {spec.name!r} has a list of {longest} ids; max_len is {spec.max_len}")


def _check_values(column: pa.ChunkedArray, name: str, where: str) -> None:
    """A numeric field's values: null is a missing value, NaN and infinities are refused (a NaN
    weight would turn the field's vector, and through it the loss, into NaN)."""
    if pa.types.is_integer(column.type) or len(column) == column.null_count:
        return
    finite = pc.is_finite(column)  # null where the value is null
    if pc.all(finite).as_py() is False:
        row = pc.index(finite, False).as_py()
        raise DataError(f"{where}: column {name!r} has the non-finite value {column[row].as_py()} at row {row} "
                        "of the row group; expected finite numbers, or null for a missing value")


def check_part(pf: pq.ParquetFile, manifest: Manifest, url: str, row_groups: list[int]) -> None:
    """The part's columns, types and row groups agree with the manifest."""
    schema = pf.schema_arrow
    expected = manifest.arrow_schema()
    for want in expected:
        if want.name not in schema.names:
            raise DataError(f"{url}: missing column {want.name!r} (expected columns {expected.names})")
        got = schema.field(want.name).type
        if not _compatible(got, want.type):
            raise DataError(f"{url}: column {want.name!r} has type {got}; expected {want.type}")
    actual = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    if actual != row_groups:
        raise DataError(
            f"{url}: row groups {actual[:8]}{'...' if len(actual) > 8 else ''} do not match the manifest "
            f"({row_groups[:8]}{'...' if len(row_groups) > 8 else ''}); file replaced or truncated?"
        )
    _check_footer_statistics(pf, manifest, url)


def _check_footer_statistics(pf: pq.ParquetFile, manifest: Manifest, url: str) -> None:
    """What the footer's column statistics already prove wrong, before any row group is read:
    nulls in the label, group or id columns, ids outside [0, vocab_size). The same checks run
    on every row group as it is read (validate_row_group); this finds a bad row group when the
    part is opened rather than when training reaches it. Columns without statistics (a writer
    may omit them) are left to the read-time check."""
    vocab = {f.name: f.vocab_size for f in manifest.fields if f.kind == "categorical"}
    flat = [manifest.label, GROUP_COLUMN, *vocab]
    paths = {pf.metadata.schema.column(j).path: j for j in range(pf.metadata.num_columns)}
    for g in range(pf.metadata.num_row_groups):
        row_group = pf.metadata.row_group(g)
        for name in flat:
            if name not in paths:
                continue
            stats = row_group.column(paths[name]).statistics
            if stats is None:
                continue
            where = f"{url} row group {g}"
            if stats.has_null_count and stats.null_count:
                expected = ("0 or 1" if name == manifest.label else
                            "a 64-bit group id in every row" if name == GROUP_COLUMN else "ids")
                raise DataError(f"{where}: column {name!r} has {stats.null_count} null(s); expected {expected} "
                                "(from the footer's statistics, before reading the rows)")
            if name in vocab and stats.has_min_max and isinstance(stats.min, int) and isinstance(stats.max, int) \
                    and (stats.min < 0 or stats.max >= vocab[name]):
                raise DataError(f"{where}: column {name!r} has ids in [{stats.min}, {stats.max}]; expected "
                                f"[0, {vocab[name]}) (vocab_size; from the footer's statistics, before reading the rows)")


def check_part_footers(url: str, manifest: Manifest, splits: list[str], storage_options=None,
                       retry_seconds: float | None = None, threads: int = 16) -> int:
    """Every part of ``splits`` checked from its footer alone (check_part: columns, types, row
    groups, footer statistics), ``threads`` parts at a time: a bad part is refused when a run is
    launched, before any worker starts, rather than when training (or the first evaluation)
    reaches it. The first bad part in manifest order is the error. Returns the parts checked.
    Readers check every part again when they open it (and its rows as they read them): the
    files may change in between, and not every run is launched from a driver that checks."""
    from .storage import StorageUnavailable, describe, resolve

    loc = resolve(url, storage_options, retry_seconds)
    parts = [part for name in splits for part in manifest.split(name).parts]

    def check(part) -> None:
        where = loc.url_of(part.path)
        opened = [False]  # whether the failing attempt got as far as parsing (as the reader tells them apart)

        def read_footer() -> None:
            opened[0] = False
            with loc.fs.open(loc.path(part.path), "rb") as f:
                opened[0] = True
                check_part(pq.ParquetFile(f), manifest, where, part.row_groups)

        try:
            loc.retry(read_footer, where)
        except (DataError, StorageUnavailable):
            raise
        except FileNotFoundError:
            raise DataError(f"{where}: part file missing (listed in the manifest)") from None
        except Exception as exc:
            if not opened[0]:
                raise loc.error(f"{where}: cannot open", exc) from None
            raise DataError(f"{where}: not a readable Parquet file ({describe(exc, loc.storage_options)}); "
                            "corrupt or truncated?") from None

    with ThreadPoolExecutor(max(1, min(threads, len(parts)))) as pool:
        for _ in pool.map(check, parts):  # in order: the first failure in manifest order is raised
            pass
    return len(parts)


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_list(want) or pa.types.is_large_list(want):
        return (pa.types.is_list(got) or pa.types.is_large_list(got)) and pa.types.is_integer(got.value_type)
    if pa.types.is_floating(want):
        return pa.types.is_floating(got) or pa.types.is_integer(got)
    return pa.types.is_integer(got)


def check_label_classes(url: str, manifest: Manifest, splits: list[str], storage_options=None,
                        retry_seconds: float | None = None) -> None:
    """Refuse splits whose metrics (or training) are undefined: an empty split, or one whose
    labels are all 0 or all 1 (AUC needs both classes). Reads only the label column, row group
    by row group, until both classes have been seen (usually the first row group)."""
    from .storage import StorageUnavailable, describe, resolve

    loc = resolve(url, storage_options, retry_seconds)
    for name in splits:
        info = manifest.split(name)
        if info.rows == 0:
            raise DataError(f"split {name!r} of {loc.url} is empty: its AUC/logloss are undefined; "
                            "prepare the dataset with rows in every split")
        seen: set[float] = set()
        for part in info.parts:
            path = loc.path(part.path)

            def labels_of_part(path: str = path) -> set[float]:
                found: set[float] = set()
                with loc.fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    for g in range(pf.num_row_groups):
                        labels = pf.read_row_group(g, columns=[manifest.label]).column(0)
                        found.update(v for v in pc.unique(labels).to_pylist() if v is not None)
                        if len(seen | found) >= 2:
                            break
                return found

            try:
                seen |= loc.retry(labels_of_part, loc.url_of(part.path))
            except (DataError, StorageUnavailable):
                raise
            except Exception as exc:
                raise DataError(f"{loc.url_of(part.path)}: cannot read column {manifest.label!r} "
                                f"({describe(exc, loc.storage_options)})") from None
            if len(seen) >= 2:
                break
        if len(seen) < 2:
            only = ", ".join(f"{v:g}" for v in sorted(seen)) or "none"
            raise DataError(
                f"split {name!r} of {loc.url}: all {info.rows} rows have label {only}; "
                f"{'training learns nothing from' if name == 'train' else 'AUC is undefined on'} a split with one class. "
                "Prepare the dataset with both classes in every split (or another split: data.train_split/valid_split/test_split)"
            )
