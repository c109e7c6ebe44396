"""Validate a prepared dataset against its manifest: files, checksums, schema, counts, id ranges."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from tf4ctr_dist.data.validate import check_part, validate_row_group
from tf4ctr_dist.data.storage import Location, describe, resolve

from .writer import STAGING_PREFIX, VOCAB_DIR

VOCAB_SCHEMA = pa.schema([("token", pa.string()), ("id", pa.int64()), ("count", pa.int64())])

_HASH_CHUNK = 8 << 20


@dataclass
class CheckReport:
    url: str
    manifest: Manifest | None = None
    problems: list[str] = field(default_factory=list)  # the dataset is unsound
    warnings: list[str] = field(default_factory=list)  # worth knowing, not fatal
    rows_checked: int = 0
    positives: dict[str, int] = field(default_factory=dict)  # label == 1 rows per split (read in the check)

    @property
    def ok(self) -> bool:
        return self.manifest is not None and not self.problems

    def table1(self) -> list[str]:
        """The dataset's row of the paper's Table 1: rows per split, fields, vocabulary per
        field (ids incl. PAD and OOV, as the manifest sizes the tables), positive rate."""
        m = self.manifest
        if m is None:
            return []
        rows = {s: info.rows for s, info in m.splits.items()}
        total, pos = sum(rows.values()), sum(self.positives.values())
        rate = lambda p, n: f"{p / n:.4f}" if n else "-"  # noqa: E731
        return [
            f"rows: {' / '.join(f'{s} {n:,}' for s, n in rows.items())} (total {total:,})",
            f"fields: {len(m.fields)}" + (f" (gAUC group: {m.group})" if m.group else ""),
            "vocabulary: " + ", ".join(f"{f.name} {f.vocab_size:,}" for f in m.fields)
            + f" (total {sum(f.vocab_size for f in m.fields):,})",
            "positive rate: " + ", ".join(f"{s} {rate(self.positives.get(s, 0), n)}" for s, n in rows.items())
            + f", all {rate(pos, total)}",
        ]


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
            report.rows_checked += _check_part(loc, manifest, part.path, part.row_groups, part.sha256, report, split)
    vocab = manifest.spec.get("vocab") if isinstance(manifest.spec.get("vocab"), dict) else {}
    # Generated ids stand for no raw values: a synthetic dataset has no vocabulary to check.
    generated = manifest.spec.get("format") == "synthetic"
    without: list[str] = []
    for f in manifest.fields:
        info = vocab.get(f.name, {}).get("file") if isinstance(vocab.get(f.name), dict) else None
        if f.vocab_mode != "counted" or generated:
            continue
        if info is None:
            without.append(f.name)
            continue
        if progress:
            progress(f"vocabulary {f.name}: {info.get('path')}")
        _check_vocab_file(loc, f.name, f.vocab_size, vocab[f.name].get("min_count", 1), info, report)
    if without:
        report.warnings.append(f"no vocabulary file in {MANIFEST_NAME} for field(s) {', '.join(without)} "
                               "(prepared before vocabularies were saved?): their ids cannot be mapped back to values")
    _check_leftovers(loc, manifest, report)
    return report


def _sha256(loc: Location, path: str) -> str:
    digest = hashlib.sha256()
    with loc.fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_vocab_file(
    loc: Location, name: str, vocab_size: int, min_count: Any, info: Any, report: CheckReport
) -> None:
    """vocab/<field>.parquet: listed checksum and rows, ids 1..n in order, tokens strictly
    increasing in UTF-8 byte order and never empty, counts >= min_count. Row group by row group."""
    if not isinstance(info, dict) or not isinstance(info.get("path"), str) or not isinstance(info.get("sha256"), str):
        report.problems.append(f"field {name!r}: malformed vocabulary file entry {info!r} in {MANIFEST_NAME}")
        return
    url, path = loc.url_of(info["path"]), loc.path(info["path"])
    problems = report.problems
    try:
        digest = _sha256(loc, path)
    except FileNotFoundError:
        problems.append(f"{url}: vocabulary file of field {name!r} missing (listed in the manifest)")
        return
    except Exception as exc:
        problems.append(f"{url}: cannot read ({describe(exc, loc.storage_options)})")
        return
    if digest != info["sha256"]:
        problems.append(f"{url}: sha256 {digest[:16]}... does not match the manifest ({info['sha256'][:16]}...)")
    expected = vocab_size - 2  # PAD and OOV have no token
    need = min_count if isinstance(min_count, int) else 1
    try:
        with loc.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if not pf.schema_arrow.equals(VOCAB_SCHEMA, check_metadata=False):
                problems.append(f"{url}: schema {pf.schema_arrow} differs from {VOCAB_SCHEMA}")
                return
            rows, last = 0, None
            for i in range(pf.metadata.num_row_groups):
                where = f"{url} row group {i}"
                t = pf.read_row_group(i)
                tokens, ids, counts = t.column("token").combine_chunks(), t.column("id").to_numpy(), t.column("count").to_numpy()
                if t.num_rows == 0:
                    continue
                if (ids != rows + 1 + np.arange(t.num_rows)).any():
                    problems.append(f"{where}: ids are not {rows + 1}..{rows + t.num_rows} in order")
                    return
                ordered = pc.all(pc.less(tokens.slice(0, len(tokens) - 1), tokens.slice(1))).as_py() is not False
                if not ordered or (last is not None and not last < tokens[0].as_py().encode()):
                    problems.append(f"{where}: tokens not strictly increasing (sorted, unique)")
                    return
                if tokens.null_count or pc.any(pc.equal(tokens, "")).as_py():
                    problems.append(f"{where}: an empty or null token (missing values are OOV, never tokens)")
                    return
                if counts.size and counts.min() < need:
                    problems.append(f"{where}: a count {int(counts.min())} below min_count {need}")
                    return
                last = tokens[-1].as_py().encode()
                rows += t.num_rows
    except Exception as exc:
        problems.append(f"{url}: not a readable Parquet file ({describe(exc, loc.storage_options)})")
        return
    if rows != expected or info.get("rows") != rows:
        problems.append(
            f"{url}: {rows} tokens; field {name!r} has vocab_size {vocab_size} (= {expected} tokens + PAD + OOV)"
            f" and the manifest lists {info.get('rows')}"
        )


def _check_part(
    loc: Location, manifest: Manifest, rel: str, row_groups: list[int], sha256: str, report: CheckReport, split: str = "",
) -> int:
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
                positives = int(pc.sum(pc.equal(table.column(manifest.label), 1.0)).as_py() or 0)
                report.positives[split] = report.positives.get(split, 0) + positives
    except DataError as exc:
        report.problems.append(str(exc))
    except Exception as exc:
        report.problems.append(f"{url}: not a readable Parquet file ({describe(exc, loc.storage_options)})")
    return rows


def _check_leftovers(loc: Location, manifest: Manifest, report: CheckReport) -> None:
    listed = {p.path for info in manifest.splits.values() for p in info.parts}
    vocab = manifest.spec.get("vocab") if isinstance(manifest.spec.get("vocab"), dict) else {}
    listed |= {v["file"].get("path") for v in vocab.values() if isinstance(v, dict) and isinstance(v.get("file"), dict)}
    try:
        entries = loc.fs.ls(loc.path(), detail=False)
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if name.startswith(STAGING_PREFIX):
                report.warnings.append(f"{loc.url_of(name)}: leftover staging folder of an interrupted write (safe to delete)")
        for split in [*manifest.splits, VOCAB_DIR]:
            if not loc.fs.isdir(loc.path(split)):
                continue
            for entry in loc.fs.ls(loc.path(split), detail=False):
                rel = posixpath.join(split, posixpath.basename(entry.rstrip("/")))
                if rel not in listed:
                    report.warnings.append(f"{loc.url_of(rel)}: not listed in {MANIFEST_NAME} (ignored by readers)")
    except Exception as exc:
        report.warnings.append(f"{loc.url}: could not list files ({describe(exc, loc.storage_options)})")
