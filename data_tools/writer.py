"""Atomic writer for a prepared dataset: Parquet parts under a staging prefix, manifest last."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import posixpath
import socket
import sys
import time
import uuid
from types import TracebackType
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import (
    GROUP_COLUMN,
    MANIFEST_NAME,
    FieldSpec,
    Manifest,
    PartInfo,
    SplitInfo,
    load_manifest,
)
from tf4ctr_dist.data.storage import Location, resolve

from .options import DEFAULT_ROW_GROUP_ROWS, DEFAULT_ROW_GROUPS_PER_PART

STAGING_PREFIX = ".staging-"
VOCAB_DIR = "vocab"  # vocab/<field>.parquet: the counted vocabularies (see DatasetWriter.write_file)
LOCK_NAME = ".prepare-lock"  # one writer at a time per output (created exclusively)
JOURNAL_NAME = ".commit-journal"  # present while a commit moves files into place


def library_version() -> str:
    """The installed tf4ctr_dist version, for the manifest's created_by.

    Read from the package metadata, not by importing the library: data_tools depends on
    tf4ctr_dist.data only. An uninstalled checkout (e.g. a Ray job's working_dir) falls back to
    the version of the already loaded package (the parent of tf4ctr_dist.data).
    """
    try:
        return importlib.metadata.version("tf4ctr_dist")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get("tf4ctr_dist"), "__version__", "unknown"))


class _HashingFile:
    """Write-only file wrapper that computes the sha256 of what passes through it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self._span = hashlib.sha256()
        self._pos = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        self._raw.write(data)
        self._hash.update(data)
        self._span.update(data)
        self._pos += len(data)
        return len(data)

    def mark(self) -> list:
        """[end offset, sha256] of the bytes since the previous mark (pyarrow writes a row
        group's column chunks when write_table returns, so a span is one row group)."""
        span = [self._pos, self._span.hexdigest()]
        self._span = hashlib.sha256()
        return span

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._raw.close()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class SplitWriter:
    """Writes one split as parts of `row_groups_per_part` row groups of `row_group_rows` rows."""

    def __init__(self, owner: "DatasetWriter", split: str) -> None:
        self._owner = owner
        self.split = split
        self.parts: list[PartInfo] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file: _HashingFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._part_path = ""
        self._part_groups: list[int] = []
        self._spans: list[list] = []
        self.closed = False

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts) + sum(self._part_groups) + self._pending_rows

    def write(self, table: pa.Table) -> None:
        """Append rows (columns in manifest order, any chunking)."""
        schema = self._owner.schema
        if table.schema != schema:
            table = table.select(schema.names).cast(schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        size = self._owner.row_group_rows
        if self._pending_rows >= size:
            buffered = pa.concat_tables(self._pending).combine_chunks()
            full = (buffered.num_rows // size) * size
            for start in range(0, full, size):
                self._write_group(buffered.slice(start, size))
            rest = buffered.slice(full)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.closed:
            return
        if self._pending_rows:
            self._write_group(pa.concat_tables(self._pending).combine_chunks())
            self._pending, self._pending_rows = [], 0
        self._close_part()
        self.closed = True

    def _write_group(self, table: pa.Table) -> None:
        owner = self._owner
        if self._writer is None:
            rel = posixpath.join(self.split, f"part-{len(self.parts):05d}.parquet")
            self._part_path = rel
            target = owner.staging_path(rel)
            try:
                owner.loc.makedirs(posixpath.dirname(target))
                self._file = _HashingFile(owner.loc.fs.open(target, "wb", **owner.open_options))
            except Exception as exc:
                raise owner.loc.error(f"cannot write {owner.loc.url_of(owner.staging, rel)}", exc) from None
            self._writer = pq.ParquetWriter(self._file, owner.schema, compression="snappy")
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._part_groups.append(table.num_rows)
        self._spans.append(self._file.mark())
        if len(self._part_groups) >= owner.row_groups_per_part:
            self._close_part()

    def _close_part(self) -> None:
        if self._writer is None or self._file is None:
            return
        try:
            self._writer.close()
            self._file.close()
        except Exception as exc:
            raise self._owner.loc.error(
                f"cannot write {self._owner.loc.url_of(self._owner.staging, self._part_path)}", exc
            ) from None
        self._spans.append(self._file.mark())  # the footer
        self.parts.append(PartInfo(self._part_path, sum(self._part_groups), list(self._part_groups),
                                   self._file.hexdigest(), self._spans))
        self._writer, self._file, self._part_groups, self._spans = None, None, [], []


class DatasetWriter:
    """Use as a context manager; call `commit()` at the end. Any exception removes the staging
    prefix and leaves the output URL exactly as it was.
    """

    def __init__(
        self,
        out_url: str,
        *,
        fields: list[FieldSpec],
        label: str,
        group: str | None,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        row_groups_per_part: int = DEFAULT_ROW_GROUPS_PER_PART,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if row_group_rows < 1 or row_groups_per_part < 1:
            raise DataError(
                f"row_group_rows and row_groups_per_part must be >= 1, got {row_group_rows}, {row_groups_per_part}"
            )
        self.loc: Location = resolve(out_url, storage_options)
        self.fields, self.label, self.group = list(fields), label, group
        self.row_group_rows, self.row_groups_per_part = row_group_rows, row_groups_per_part
        self.overwrite = overwrite
        # Validates field/label names early (duplicates, reserved _group).
        self.schema = Manifest(self.fields, label, group, {}).arrow_schema()
        names = [label, *(f.name for f in self.fields)]
        for name in names:
            if name == GROUP_COLUMN or name.startswith(STAGING_PREFIX):
                raise DataError(f"column name {name!r} is reserved")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DataError(f"duplicate column name(s) {duplicates} among the label and fields")
        self._locked = False
        try:
            self._created_root = not self.loc.fs.exists(self.loc.path())
        except Exception as exc:
            raise self.loc.error(f"cannot access output URL {self.loc.url}", exc) from None
        self._lock()
        try:
            _refuse_interrupted_commit(self.loc)
            self._old: Manifest | None = self._check_output()
            self._remove_stale_staging()
        except BaseException:
            self._unlock()
            raise
        self.staging = f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        self._splits: dict[str, SplitWriter] = {}
        self._files: list[str] = []  # other files (vocabularies), moved into place at commit
        # Object stores buffer one upload part per open file (s3fs: 50 MiB by default) and a
        # dataset keeps a part of every split open: 8 MiB parts cut ~120 MiB of peak RSS.
        self.open_options: dict[str, Any] = {} if self.loc.is_local else {"block_size": 8 << 20}
        self._committed = False
        # Probe: a bad bucket or read-only location fails now, not after an hour of converting.
        try:
            self.loc.makedirs(self.staging_path())
            self.loc.fs.pipe_file(self.staging_path("_WRITING"), b"staging area of an unfinished write\n")
        except Exception as exc:
            self._remove_staging()
            raise self.loc.error(f"cannot write to output URL {self.loc.url}", exc) from None

    # ---- one writer at a time -----------------------------------------------------------------

    def _lock(self) -> None:
        """Create LOCK_NAME exclusively (a conditional create on object stores): a second writer
        to the same output fails here instead of silently replacing the first one's dataset."""
        fs, path = self.loc.fs, self.loc.path(LOCK_NAME)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for attempt in range(2):
            try:
                if fs.isfile(self.loc.path()):
                    raise DataError(f"output URL {self.loc.url} is an existing file; expected a directory/prefix")
                self.loc.makedirs(self.loc.path())
                with fs.open(path, "xb") as f:
                    f.write(json.dumps(info).encode())
                self._locked = True
                return
            except FileExistsError:
                holder = _read_lock(self.loc)
                if attempt == 0 and _holder_is_dead(holder):
                    fs.rm(path)  # its writer died on this host: the lock is stale
                    continue
                raise DataError(
                    f"output URL {self.loc.url} is being written by another prepare ({LOCK_NAME}: {holder}). "
                    f"Wait for it, or, if that process is gone, delete {self.loc.url_of(LOCK_NAME)}"
                ) from None
            except DataError:
                raise
            except Exception as exc:
                raise self.loc.error(f"cannot write to output URL {self.loc.url}", exc) from None

    def _unlock(self) -> None:
        if self._locked:
            try:
                self.loc.fs.rm(self.loc.path(LOCK_NAME))
            except Exception:
                pass  # best effort; a lock left behind names its (dead) holder
            self._locked = False

    def _remove_stale_staging(self) -> None:
        """Staging folders of earlier writers that died (we hold the lock: none is running)."""
        try:
            entries = self.loc.fs.ls(self.loc.path(), detail=False) if self.loc.fs.exists(self.loc.path()) else []
        except Exception:
            return
        for entry in entries:
            if posixpath.basename(entry.rstrip("/")).startswith(STAGING_PREFIX):
                try:
                    self.loc.fs.rm(entry, recursive=True)
                except Exception:
                    pass
        self.loc.fs.invalidate_cache()

    def _check_output(self) -> Manifest | None:
        fs, loc = self.loc.fs, self.loc
        try:
            if fs.isfile(loc.path()):
                raise DataError(f"output URL {loc.url} is an existing file; expected a directory/prefix")
            has_manifest = fs.exists(loc.path(MANIFEST_NAME))
            leftovers = [s for s in ("train", "valid", "test", VOCAB_DIR) if fs.exists(loc.path(s))]
        except DataError:
            raise
        except Exception as exc:
            raise loc.error(f"cannot access output URL {loc.url}", exc) from None
        if has_manifest and not self.overwrite:
            raise DataError(f"output URL {loc.url} already holds a dataset ({MANIFEST_NAME}); pass overwrite=True (on the command line: --overwrite) to replace it")
        if leftovers and not has_manifest and not self.overwrite:
            raise DataError(
                f"output URL {loc.url} holds split folders {leftovers} but no {MANIFEST_NAME} "
                "(an incomplete earlier write?); pass overwrite=True (on the command line: --overwrite) to replace them"
            )
        if has_manifest:
            try:
                return load_manifest(loc.url, loc.storage_options)
            except DataError:
                return None  # a broken old manifest is replaced as a whole
        return None

    def staging_path(self, *rel: str) -> str:
        return self.loc.path(self.staging, *rel)

    def split(self, name: str) -> SplitWriter:
        if name not in self._splits:
            self._splits[name] = SplitWriter(self, name)
        return self._splits[name]

    def write_file(self, rel: str, table: pa.Table, row_group_rows: int = 1 << 20) -> dict[str, Any]:
        """Write `table` as the Parquet file `rel` (staged like the parts, moved at commit);
        returns {path, rows, sha256} for the manifest."""
        if rel in self._files or rel.split("/")[0] in ("train", "valid", "test", MANIFEST_NAME):
            raise ValueError(f"{rel!r} is already written or is reserved")
        target = self.staging_path(rel)
        try:
            self.loc.makedirs(posixpath.dirname(target))
            with self.loc.fs.open(target, "wb") as raw:
                out = _HashingFile(raw)
                pq.write_table(table, out, row_group_size=row_group_rows, compression="snappy")
        except Exception as exc:
            raise self.loc.error(f"cannot write {self.loc.url_of(self.staging, rel)}", exc) from None
        self._files.append(rel)
        return {"path": rel, "rows": table.num_rows, "sha256": out.hexdigest()}

    def commit(self, spec: Mapping[str, Any], created_by: str, fields: list[FieldSpec] | None = None) -> Manifest:
        """Close all splits, move parts into place, then write the manifest (last).

        `fields`: the final field specs when they were not known at construction (vocabulary
        sizes are fit while writing); names, kinds and order must match the written columns.
        """
        if fields is not None:
            fields = list(fields)
            if [(f.name, f.kind) for f in fields] != [(f.name, f.kind) for f in self.fields]:
                raise ValueError("commit(fields=...) must keep the field names, kinds and order")
            self.fields = fields
        for writer in self._splits.values():
            writer.close()
        splits = {name: SplitInfo(w.rows, w.parts) for name, w in self._splits.items()}
        manifest = Manifest(
            fields=self.fields,
            label=self.label,
            group=self.group,
            splits=splits,
            spec=dict(spec),
            created_by=f"{created_by} (tf4ctr_dist {library_version()})",
        )
        fs, loc = self.loc.fs, self.loc
        moves = [p.path for info in splits.values() for p in info.parts] + list(self._files)
        try:
            fs.pipe_file(self.staging_path(MANIFEST_NAME), manifest.to_json().encode())
            # The journal makes an interrupted commit recoverable (see `recover`) without overwrite.
            fs.pipe_file(loc.path(JOURNAL_NAME), json.dumps({"staging": self.staging, "files": moves}).encode())
            # Invalidate the old dataset first: without a manifest it reads as "not completely written".
            if fs.exists(loc.path(MANIFEST_NAME)):
                fs.rm(loc.path(MANIFEST_NAME))
            for name in sorted(set(splits) | set(self._old.splits if self._old else {}) | {"train", "valid", "test", VOCAB_DIR}):
                if self.overwrite and fs.exists(loc.path(name)):
                    fs.rm(loc.path(name), recursive=True)
            for info in splits.values():
                for part in info.parts:
                    loc.makedirs(posixpath.dirname(loc.path(part.path)))
                    fs.mv(self.staging_path(part.path), loc.path(part.path))
            for rel in self._files:
                loc.makedirs(posixpath.dirname(loc.path(rel)))
                fs.mv(self.staging_path(rel), loc.path(rel))
            fs.mv(self.staging_path(MANIFEST_NAME), loc.path(MANIFEST_NAME))
            fs.rm(loc.path(JOURNAL_NAME))
        except Exception as exc:
            self._unlock()
            raise loc.error(
                f"failed while moving the dataset into {loc.url}; it has no {MANIFEST_NAME} and is unusable "
                f"until data_tools.writer.recover({loc.url!r}, 'complete' or 'rollback')", exc
            ) from None
        self._committed = True
        self._remove_staging()
        fs.invalidate_cache()
        return manifest

    def abort(self) -> None:
        self._remove_staging()

    def _remove_staging(self) -> None:
        for writer in self._splits.values():
            try:
                if writer._writer is not None:
                    writer._writer.close()
                if writer._file is not None:
                    writer._file.close()
            except Exception:
                pass  # the files are about to be deleted
        try:
            if self.loc.fs.exists(self.staging_path()):
                self.loc.fs.rm(self.staging_path(), recursive=True)
            self._unlock()
            # Leave no trace: remove the output folder if this writer created it and it is empty.
            if not self._committed and self._created_root and self.loc.fs.exists(self.loc.path()):
                if not self.loc.fs.ls(self.loc.path()):
                    self.loc.fs.rmdir(self.loc.path())
        except Exception:
            pass  # best effort: a leftover .staging-* prefix is never mistaken for a dataset
        self._unlock()
        self.loc.fs.invalidate_cache()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self.abort()


def _read_lock(loc: Location) -> dict:
    try:
        return json.loads(loc.fs.cat_file(loc.path(LOCK_NAME)))
    except Exception:
        return {}


def _holder_is_dead(holder: dict) -> bool:
    """True only when the lock's writer ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _refuse_interrupted_commit(loc: Location) -> None:
    if loc.fs.exists(loc.path(JOURNAL_NAME)):
        raise DataError(
            f"output URL {loc.url} holds an interrupted commit ({JOURNAL_NAME}): finish it with "
            f"data_tools.writer.recover({loc.url!r}, 'complete') or undo it with recover(..., 'rollback')"
        )


def recover(out_url: str, action: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Finish (`action="complete"`) or undo (`"rollback"`) a commit that was interrupted while
    it moved files into `out_url`; returns what was done. Takes the writer lock."""
    if action not in ("complete", "rollback"):
        raise ValueError(f"action must be 'complete' or 'rollback', got {action!r}")
    loc = resolve(out_url, storage_options)
    fs = loc.fs
    holder = DatasetWriter.__new__(DatasetWriter)  # only for the lock
    holder.loc, holder._locked = loc, False
    holder._lock()
    try:
        try:
            journal = json.loads(fs.cat_file(loc.path(JOURNAL_NAME)))
            staging, files = journal["staging"], list(journal["files"])
        except FileNotFoundError:
            return f"{loc.url}: no interrupted commit"
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{loc.url_of(JOURNAL_NAME)}: unreadable journal ({exc})") from None
        staged = lambda rel: loc.path(staging, rel)  # noqa: E731
        if action == "complete":
            if not fs.exists(staged(MANIFEST_NAME)):
                raise DataError(f"{loc.url}: the staged {MANIFEST_NAME} is gone; only 'rollback' is possible")
            for rel in files:
                if fs.exists(staged(rel)):
                    loc.makedirs(posixpath.dirname(loc.path(rel)))
                    fs.mv(staged(rel), loc.path(rel))
                elif not fs.exists(loc.path(rel)):
                    raise DataError(f"{loc.url}: {rel} is neither staged nor in place; only 'rollback' is possible")
            fs.mv(staged(MANIFEST_NAME), loc.path(MANIFEST_NAME))
            done = f"{loc.url}: commit completed ({len(files)} files)"
        else:
            if fs.exists(loc.path(MANIFEST_NAME)):
                fs.rm(loc.path(MANIFEST_NAME))
            for rel in files:
                if fs.exists(loc.path(rel)):
                    fs.rm(loc.path(rel))
            for folder in sorted({posixpath.dirname(rel) for rel in files if "/" in rel}, key=len, reverse=True):
                try:
                    if loc.is_local and fs.isdir(loc.path(folder)) and not fs.ls(loc.path(folder)):
                        fs.rmdir(loc.path(folder))
                except Exception:
                    pass  # an empty folder left behind is harmless
            done = f"{loc.url}: commit rolled back ({len(files)} files removed)"
        if fs.exists(loc.path(staging)):
            fs.rm(loc.path(staging), recursive=True)
        fs.rm(loc.path(JOURNAL_NAME))
        fs.invalidate_cache()
        return done
    finally:
        holder._unlock()
