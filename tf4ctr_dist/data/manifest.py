"""The prepared-dataset manifest (`manifest.json` at the dataset root) and its Parquet layout.

Parquet layout of every part, columns in this order:
  <label>    float32, 0.0 or 1.0                     (name = Manifest.label)
  <field>    int64 per categorical field             (mapped id in [0, vocab_size); 0 = PAD)
  <field>    list<int64> per sequence field          (ids in [1, vocab_size); PAD removed, so
                                                      the list length is 0..max_len)
  <field>    float32 per numeric field, nullable     (the value after the field's normaliser,
                                                      spec.vocab.<field>; null = missing; the
                                                      model embeds it as value x the field's
                                                      one vector, vocab_size 1, vocab_mode none)
  _group     int64, stable 64-bit id of the raw group value (0 when the dataset has no group)
Ids, vocab_mode "counted": 0 = PAD, 1..n = tokens, n+1 = vocab_size-1 = OOV.
Ids, vocab_mode "hashed": 0 = PAD, 1..vocab_size-1 = hash buckets (1 + hash(value) mod
(vocab_size-1), see data_tools.vocab); no OOV row.
The manifest is written last: a dataset without one is missing or not completely written.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

import pyarrow as pa

from .errors import DataError
from .storage import Location, StorageUnavailable, relative_problem, resolve

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
GROUP_COLUMN = "_group"
SPLITS = ("train", "valid", "test")
# Deepest nesting of objects and arrays a manifest may have. Ours nest about 7 deep (spans in
# parts in splits); deeper input is refused before anything walks it recursively (json itself,
# dataclasses.asdict, json.dumps into checkpoints), which would end in a bare RecursionError.
MAX_JSON_DEPTH = 64

FieldKind = Literal["categorical", "sequence", "numeric"]
VocabMode = Literal["counted", "hashed", "none"]  # none: numeric fields (no ids to map)


@dataclass(frozen=True)
class FieldSpec:
    """One feature: its Parquet column and embedding-table size."""

    name: str
    kind: FieldKind
    vocab_size: int  # rows incl. PAD (0) and, when counted, OOV (vocab_size - 1); numeric: 1
    max_len: int | None = None  # sequence fields only
    vocab_mode: VocabMode = "counted"

    def arrow_type(self) -> pa.DataType:
        if self.kind == "numeric":
            return pa.float32()
        return pa.int64() if self.kind == "categorical" else pa.list_(pa.int64())


@dataclass(frozen=True)
class PartInfo:
    """One Parquet file of a split."""

    path: str  # relative to the dataset root, e.g. "train/part-00000.parquet"
    rows: int
    row_groups: list[int]  # rows per row group, in file order
    sha256: str
    # [end byte, sha256] of each row group's bytes and then of the footer; a span starts where
    # the previous one ends (the first at 0). The reader verifies each span as it reads it.
    spans: list[list] | None = None


@dataclass(frozen=True)
class SplitInfo:
    rows: int
    parts: list[PartInfo]


@dataclass(frozen=True)
class Manifest:
    """Everything a reader or trainer needs to know about a prepared dataset."""

    fields: list[FieldSpec]
    label: str
    group: str | None
    splits: dict[str, SplitInfo]
    spec: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def numeric_fields(self) -> list[str]:
        """Fields embedded as value x vector. When there are any, every lookup carries a
        weight (the KJT's weights) and the model's tables are weighted, see
        tf4ctr_dist.modules.embedding.field_tables."""
        return [f.name for f in self.fields if f.kind == "numeric"]

    @property
    def sequence_fields(self) -> list[str]:
        return [f.name for f in self.fields if f.kind == "sequence"]

    def column_names(self) -> list[str]:
        """Parquet columns of every part, in order."""
        return [self.label, *self.field_names, GROUP_COLUMN]

    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(self.label, pa.float32(), nullable=False)]
            + [pa.field(f.name, f.arrow_type(), nullable=f.kind == "numeric") for f in self.fields]
            + [pa.field(GROUP_COLUMN, pa.int64(), nullable=False)]
        )

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"split {name!r} not in manifest (has: {sorted(self.splits)})")
        return self.splits[name]

    def listed_files(self) -> list[tuple[str, str]]:
        """(path relative to the dataset root, where the manifest names it) of every file it
        lists: the parts of every split and the vocabulary files."""
        files = [(p.path, f"splits.{split}.parts[{j}]")
                 for split, info in self.splits.items() for j, p in enumerate(info.parts)]
        vocab = self.spec.get("vocab") or {}
        files += [(info["file"]["path"], f"spec.vocab.{name}.file")
                  for name, info in vocab.items() if "file" in info]
        return files

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        order = ["format_version", "created_by", "label", "group", "fields", "splits", "spec"]
        return {key: data[key] for key in order}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest") -> "Manifest":
        """Parse and validate; a DataError naming `source` and the bad entry otherwise."""
        return _parse(data, source)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{source}: not valid JSON ({exc})") from None
        except RecursionError:  # json's parser recurses once per level of nesting
            raise DataError(f"{source}: not valid JSON (objects and arrays nested too deep; "
                            f"a manifest nests at most {MAX_JSON_DEPTH} levels)") from None
        return _parse(data, source)


def load_manifest(url: str, storage_options: Mapping[str, Any] | None = None,
                  retry_seconds: float | None = None) -> Manifest:
    """Read `{url}/manifest.json`. DataError if absent, unreadable or malformed;
    StorageUnavailable if the storage stays unreachable for retry_seconds (see storage.resolve)."""
    loc = resolve(url, storage_options, retry_seconds)
    path = confined_path(loc, MANIFEST_NAME)
    try:
        text = loc.retry(lambda: loc.fs.cat_file(path), loc.url_of(MANIFEST_NAME))
    except StorageUnavailable:
        raise
    except FileNotFoundError:
        raise loc.error(
            f"no {MANIFEST_NAME} at {loc.url}: dataset missing or not completely written"
        ) from None
    except Exception as exc:  # network, permissions, bad bucket
        raise loc.error(f"cannot read {loc.url_of(MANIFEST_NAME)}", exc) from None
    manifest = Manifest.from_json(text, source=loc.url_of(MANIFEST_NAME))
    # Before anything opens them (check, training, export, predict all load the manifest first).
    for rel, listed_as in manifest.listed_files():
        confined_path(loc, rel, f"{listed_as} in {MANIFEST_NAME}")
    return manifest


def confined_path(loc: Location, rel: str, listed_as: str | None = None) -> str:
    """loc.path(rel) for a file of the dataset, refused when it leaves the dataset root. The
    text of `rel` is checked by loc.path (no '..', no absolute path); on a local filesystem the
    file must also resolve, through symlinks of its own or of its folders, to a real path inside
    the root's real path: a symlink shipped with the data (valid/part-00000.parquet -> a file
    elsewhere, vocab/user.parquet -> /etc/passwd) would otherwise be followed. Object stores have
    no symlinks, so remote paths are only checked by their text. A missing file passes (opening
    it then reports it missing). `listed_as`: where the manifest names the file, for the message."""
    path = loc.path(rel)
    if loc.is_local:
        root, real = os.path.realpath(loc.root), os.path.realpath(path)
        if real == root or os.path.commonpath([root, real]) != root:
            named = f" ({listed_as})" if listed_as else ""
            raise DataError(f"{loc.url_of(rel)}{named}: resolves through a symlink to {real}, outside the "
                            f"dataset root {root}; refusing to open it (a dataset's files must be inside its folder)")
    return path


# ---- validation -------------------------------------------------------------------------------

# The keys each object of a format_version 1 manifest may have (spec is free-form: prepare's
# provenance and options, read by name where used; spec.vocab is checked by _vocab_spec).
_MANIFEST_KEYS = ("format_version", "created_by", "label", "group", "fields", "splits", "spec")
_FIELD_KEYS = ("name", "kind", "vocab_size", "max_len", "vocab_mode")
_SPLIT_KEYS = ("rows", "parts")
_PART_KEYS = ("path", "rows", "row_groups", "sha256", "spans")


def _need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, Mapping) or key not in data:
        raise DataError(f"{where}: missing key {key!r}")
    value = data[key]
    # bool is an int subclass; a JSON true where a count is expected is still an error.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        raise DataError(f"{where}: key {key!r} should be {_kind_name(kind)}, got {value!r}")
    return value


def _known_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse keys this format does not define. A misspelt optional key (``"vocab_mod":
    "hashed"``) would otherwise be ignored and its default used: ids read with the wrong
    meaning, with no error anywhere."""
    unknown = [str(k) for k in data if k not in allowed]
    if unknown:
        key = unknown[0]
        guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise DataError(f"{where}: unknown key {_short(key)}{hint}; format_version {FORMAT_VERSION} defines "
                        f"{', '.join(allowed)}")


def _inside(rel: Any, where: str) -> str:
    """`rel` if it names a file below the dataset root; a DataError otherwise."""
    why = relative_problem(rel)
    if why is not None:
        raise DataError(f"{where}: path {rel!r} leaves the dataset root: {why}")
    return rel


def _spans(raw: Any, groups: int, where: str) -> list[list] | None:
    if raw is None:
        return None
    ok = isinstance(raw, list) and len(raw) == groups + 1 and all(
        isinstance(s, list) and len(s) == 2 and isinstance(s[0], int) and not isinstance(s[0], bool)
        and isinstance(s[1], str) and len(s[1]) == 64 for s in raw)
    ends = [s[0] for s in raw] if ok else []
    if not ok or any(b <= a for a, b in zip([0, *ends], ends)):
        raise DataError(f"{where}: spans should be {groups + 1} [end byte, sha256] pairs with increasing ends")
    return [list(s) for s in raw]


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _tuple(kind))


def _too_deep(data: Any) -> bool:
    """Whether objects and arrays in `data` nest deeper than MAX_JSON_DEPTH (iterative: the
    point is not to recurse on untrusted nesting)."""
    todo = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (Mapping, list)):
            if depth > MAX_JSON_DEPTH:
                return True
            todo += [(v, depth + 1) for v in (value.values() if isinstance(value, Mapping) else value)]
    return False


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: an error message quotes the bad entry, not a
    whole hostile document."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _vocab_spec(vocab: Any, source: str) -> None:
    """spec.vocab: {field: {kind, ..., file: {path, sha256, rows}}}. Checked here so that every
    reader (check, export, serving) can rely on its shape instead of each guarding against a
    string where an object belongs."""
    if vocab is None:
        return
    if not isinstance(vocab, Mapping):
        raise DataError(f"{source}: spec.vocab should be an object mapping field names to their "
                        f"descriptions, got {_short(vocab)}")
    for name, info in vocab.items():
        where = f"{source}: spec.vocab.{name}"
        if not isinstance(info, Mapping):
            raise DataError(f"{where}: expected an object describing field {name!r} (kind, vocab_mode, "
                            f"file, ...), got {type(info).__name__} {_short(info)}")
        if "file" not in info:
            continue
        file = info["file"]
        if not isinstance(file, Mapping):
            raise DataError(f"{where}.file: expected an object {{path, sha256, rows}} "
                            f"naming the vocabulary file of field {name!r}, got {type(file).__name__} {_short(file)}")
        _inside(_need(file, "path", str, f"{where}.file"), f"{where}.file")
        _known_keys(file, ("path", "sha256", "rows"), f"{where}.file")
        _need(file, "sha256", str, f"{where}.file")
        if "rows" in file:
            _need(file, "rows", int, f"{where}.file")


def _parse(data: Any, source: str) -> Manifest:
    if not isinstance(data, Mapping):
        raise DataError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if _too_deep(data):
        raise DataError(f"{source}: objects and arrays nested deeper than {MAX_JSON_DEPTH} levels; "
                        "not a manifest")
    version = _need(data, "format_version", int, source)
    if version != FORMAT_VERSION:
        raise DataError(f"{source}: format_version {version} not supported (expected {FORMAT_VERSION})")
    _known_keys(data, _MANIFEST_KEYS, source)

    fields: list[FieldSpec] = []
    for i, f in enumerate(_need(data, "fields", list, source)):
        where = f"{source}: fields[{i}]"
        name = _need(f, "name", str, where)
        _known_keys(f, _FIELD_KEYS, f"{where} ({name})")
        kind = _need(f, "kind", str, where)
        if kind not in ("categorical", "sequence", "numeric"):
            raise DataError(f"{where} ({name}): kind should be 'categorical', 'sequence' or 'numeric', got {kind!r}")
        vocab_size = _need(f, "vocab_size", int, where)
        if kind == "numeric" and vocab_size != 1:
            raise DataError(f"{where} ({name}): a numeric field has one table row (its vector), so vocab_size "
                            f"should be 1, got {vocab_size}")
        if kind != "numeric" and vocab_size < 2:
            raise DataError(f"{where} ({name}): vocab_size should be >= 2 (PAD + OOV), got {vocab_size}")
        max_len = f.get("max_len")
        if kind == "sequence" and (type(max_len) is not int or max_len < 1):  # a JSON true is no length
            raise DataError(f"{where} ({name}): sequence field needs max_len >= 1, got {max_len!r}")
        mode = f.get("vocab_mode", "none" if kind == "numeric" else "counted")
        if (mode != "none") if kind == "numeric" else mode not in ("counted", "hashed"):
            expected = "'none'" if kind == "numeric" else "'counted' or 'hashed'"
            raise DataError(f"{where} ({name}): vocab_mode of a {kind} field should be {expected}, got {mode!r}")
        fields.append(FieldSpec(name, kind, vocab_size, max_len if kind == "sequence" else None, mode))
    if not fields:
        raise DataError(f"{source}: 'fields' is empty")

    label = _need(data, "label", str, source)
    group = data.get("group")
    if group is not None and not isinstance(group, str):
        raise DataError(f"{source}: key 'group' should be a column name or null, got {group!r}")
    columns = [label, *(f.name for f in fields), GROUP_COLUMN]
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise DataError(f"{source}: duplicate column names {duplicates} (label, fields and {GROUP_COLUMN})")

    splits: dict[str, SplitInfo] = {}
    for split, info in _need(data, "splits", Mapping, source).items():
        where = f"{source}: splits.{split}"
        _inside(str(split), where)  # split names double as folder names (check, leftovers)
        parts = []
        for j, p in enumerate(_need(info, "parts", list, where)):
            pw = f"{where}.parts[{j}]"
            if isinstance(p, Mapping):
                _known_keys(p, _PART_KEYS, pw)
            row_groups = _need(p, "row_groups", list, pw)
            if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in row_groups):
                raise DataError(f"{pw}: row_groups should be a list of positive row counts")
            rows = _need(p, "rows", int, pw)
            if rows != sum(row_groups):
                raise DataError(f"{pw}: rows {rows} != sum of row_groups {sum(row_groups)}")
            parts.append(PartInfo(_inside(_need(p, "path", str, pw), pw), rows, list(row_groups), _need(p, "sha256", str, pw),
                                  _spans(p.get("spans"), len(row_groups), pw)))
        rows = _need(info, "rows", int, where)
        _known_keys(info, _SPLIT_KEYS, where)
        if rows != sum(p.rows for p in parts):
            raise DataError(f"{where}: rows {rows} != sum over parts {sum(p.rows for p in parts)}")
        splits[str(split)] = SplitInfo(rows, parts)

    spec = data.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise DataError(f"{source}: key 'spec' should be an object")
    _vocab_spec(spec.get("vocab"), source)
    created_by = data.get("created_by") or ""
    return Manifest(fields, label, group, splits, dict(spec), str(created_by), version)
