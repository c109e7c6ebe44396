"""Validate a prepared dataset against its manifest: files, checksums, schema, counts, id ranges."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pyarrow.parquet as pq

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from tf4ctr_dist.data.validate import check_part, validate_row_group
from tf4ctr_dist.data.storage import Location, describe, resolve

from .writer import STAGING_PREFIX

_HASH_CHUNK = 8 << 20


@dataclass
class CheckReport:
    url: str
    manifest: Manifest | None = None
    problems: list[str] = field(default_factory=list)  # the dataset is unsound
    warnings: list[str] = field(default_factory=list)  # worth knowing, not fatal
    rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return self.manifest is not None and not self.problems


def check_dataset(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Read every part once for its checksum and once row group by row group (bounded memory)."""
    report = CheckReport(url=url)
    try:
        loc = resolve(url, storage_options)
        report.url = loc.url
        report.manifest = load_manifest(url, storage_options)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    manifest = report.manifest
    for split, info in manifest.splits.items():
        for part in info.parts:
            if progress:
                progress(f"{split}: {part.path} ({part.rows:,} rows)")
            report.rows_checked += _check_part(loc, manifest, part.path, part.row_groups, part.sha256, report)
    _check_leftovers(loc, manifest, report)
    return report


def _check_part(loc: Location, manifest: Manifest, rel: str, row_groups: list[int], sha256: str, report: CheckReport) -> int:
    url, path = loc.url_of(rel), loc.path(rel)
    try:
        digest = hashlib.sha256()
        with loc.fs.open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        report.problems.append(f"{url}: part file missing (listed in the manifest)")
        return 0
    except Exception as exc:
        report.problems.append(f"{url}: cannot read ({describe(exc, loc.storage_options)})")
        return 0
    if digest.hexdigest() != sha256:
        report.problems.append(f"{url}: sha256 {digest.hexdigest()[:16]}... does not match the manifest ({sha256[:16]}...)")
    rows = 0
    try:
        with loc.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            check_part(pf, manifest, url, row_groups)
            for i in range(pf.metadata.num_row_groups):
                where = f"{url} row group {i}"
                try:
                    table = pf.read_row_group(i, columns=manifest.column_names())
                except Exception as exc:
                    raise DataError(f"{where}: cannot read ({describe(exc, loc.storage_options)})") from None
                validate_row_group(table, manifest, where)
                rows += table.num_rows
    except DataError as exc:
        report.problems.append(str(exc))
    except Exception as exc:
        report.problems.append(f"{url}: not a readable Parquet file ({describe(exc, loc.storage_options)})")
    return rows


def _check_leftovers(loc: Location, manifest: Manifest, report: CheckReport) -> None:
    listed = {p.path for info in manifest.splits.values() for p in info.parts}
    try:
        entries = loc.fs.ls(loc.path(), detail=False)
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if name.startswith(STAGING_PREFIX):
                report.warnings.append(f"{loc.url_of(name)}: leftover staging folder of an interrupted write (safe to delete)")
        for split in manifest.splits:
            if not loc.fs.isdir(loc.path(split)):
                continue
            for entry in loc.fs.ls(loc.path(split), detail=False):
                rel = posixpath.join(split, posixpath.basename(entry.rstrip("/")))
                if rel not in listed:
                    report.warnings.append(f"{loc.url_of(rel)}: not listed in {MANIFEST_NAME} (ignored by readers)")
    except Exception as exc:
        report.warnings.append(f"{loc.url}: could not list files ({describe(exc, loc.storage_options)})")
