"""Hostile prepared datasets: a manifest nested too deep, null group ids, a vocabulary entry of
the wrong shape, files that reach outside the dataset root through symlinks. Each is refused
with a DataError (or a `check` problem) naming the file and what was expected, never a
traceback, a silently wrong read or a file opened outside the root."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.bars_csv import prepare_bars_csv
from data_tools.check import check_dataset
from tests.data_helpers import read_split, tiny_bars
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import GROUP_COLUMN, Manifest, load_manifest


@pytest.fixture()
def ds(tmp_path: Path) -> Path:
    """A small prepared dataset with vocabulary files (fields a, b; group u), 3 row groups per
    valid part."""
    out = tmp_path / "ds"
    prepare_bars_csv(*tiny_bars(tmp_path / "csv"), str(out), fields=["a", "b"], group_col="u", min_count=1,
                     row_group_rows=8)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _save(out: Path, manifest: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_valid(out: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    """Replace the valid part by change(table), with a manifest that matches it (checksum, row
    groups; no spans): only the content is hostile."""
    path = out / "valid" / "part-00000.parquet"
    manifest = _manifest(out)
    part = manifest["splits"]["valid"]["parts"][0]
    pq.write_table(change(pq.read_table(path)), path, row_group_size=part["row_groups"][0])
    part["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    part.pop("spans", None)
    _save(out, manifest)


def _set_groups(table: pa.Table, groups: list) -> pa.Table:
    return table.set_column(table.schema.get_field_index(GROUP_COLUMN), GROUP_COLUMN, pa.array(groups, pa.int64()))


def _problems(out: Path) -> str:
    report = check_dataset(str(out), progress=lambda line: None)  # as `tf4ctr check` calls it
    assert not report.ok
    return "\n".join(report.problems)


# ---- 1. nesting -------------------------------------------------------------------------------


def test_a_manifest_nested_beyond_the_json_parser_is_a_data_error(ds: Path) -> None:
    (ds / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON \(.*nested too deep"):
        load_manifest(str(ds))
    assert "manifest.json: not valid JSON" in _problems(ds)


def test_a_manifest_nested_deeper_than_any_manifest_is_refused(ds: Path) -> None:
    """Parsable, but deep enough that later recursive walks (asdict, json.dumps into
    checkpoints) could hit the recursion limit: refused up front."""
    manifest = _manifest(ds)
    manifest["spec"]["extra"] = json.loads("[" * 500 + "]" * 500)
    _save(ds, manifest)
    with pytest.raises(DataError, match="manifest.json: objects and arrays nested deeper than 64 levels"):
        load_manifest(str(ds))


# ---- 2. null group ids ------------------------------------------------------------------------


def test_null_group_ids_are_refused_by_check_and_reader(ds: Path) -> None:
    _rewrite_valid(ds, lambda t: _set_groups(t, [None, *t.column(GROUP_COLUMN).to_pylist()[1:]]))
    expected = r"valid/part-00000.parquet row group 0: column '_group' has 1 null\(s\); expected a 64-bit group id"
    assert "valid/part-00000.parquet row group 0: column '_group' has 1 null(s)" in _problems(ds)
    m = load_manifest(str(ds))
    with pytest.raises(DataError, match=expected):
        read_split(str(ds), m, "valid", world_size=1, batch_size=4)


def test_64_bit_group_ids_are_read_exactly(ds: Path) -> None:
    """Ids 1 apart above 2**53 would merge if they went through float64."""
    big = [2**62 + i for i in range(18)]
    _rewrite_valid(ds, lambda t: _set_groups(t, big))
    batches = read_split(str(ds), load_manifest(str(ds)), "valid", world_size=1, batch_size=4)[0]
    got = [g for b in batches for g, v in zip(b.group_ids.tolist(), b.valid.tolist()) if v]
    assert got == big


def _last_row_group_reader(ds: Path):
    from tf4ctr_dist.data.reader import ParquetSplitReader

    return ParquetSplitReader(str(ds), "valid", manifest=load_manifest(str(ds)), rank=0, world_size=1,
                              local_batch_size=4, shuffle=False)


def test_a_bad_last_row_group_is_refused_when_the_part_opens_not_when_reached(ds: Path) -> None:
    """The footer's statistics already show a null group id or an id past vocab_size in row
    group 2: refused before the first batch, not after the rows before it were trained on."""
    _rewrite_valid(ds, lambda t: _set_groups(t, [*t.column(GROUP_COLUMN).to_pylist()[:-1], None]))
    with _last_row_group_reader(ds) as reader, pytest.raises(
            DataError, match=r"valid/part-00000.parquet row group 2: column '_group' has 1 null\(s\); expected a "
                             r"64-bit group id in every row \(from the footer's statistics"):
        next(reader.iter_epoch(0))

    vocab_a = load_manifest(str(ds)).fields[0].vocab_size
    _rewrite_valid(ds, lambda t: _set_groups(t, [*t.column(GROUP_COLUMN).to_pylist()[:-1], 7]).set_column(
        1, "a", pa.array([*t.column("a").to_pylist()[:-1], vocab_a], pa.int64())))
    with _last_row_group_reader(ds) as reader, pytest.raises(
            DataError, match=rf"row group 2: column 'a' has ids in \[\d+, {vocab_a}\]; expected \[0, {vocab_a}\) "
                             r"\(vocab_size; from the footer's statistics"):
        next(reader.iter_epoch(0))


def test_without_footer_statistics_the_row_group_check_still_refuses(ds: Path) -> None:
    path = ds / "valid" / "part-00000.parquet"
    table = pq.read_table(path)
    table = _set_groups(table, [*table.column(GROUP_COLUMN).to_pylist()[:-1], None])
    manifest = _manifest(ds)
    part = manifest["splits"]["valid"]["parts"][0]
    pq.write_table(table, path, row_group_size=part["row_groups"][0], write_statistics=False)
    part["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    part.pop("spans", None)
    _save(ds, manifest)
    with _last_row_group_reader(ds) as reader:
        batches = reader.iter_epoch(0)
        next(batches)  # row group 0 is fine, and nothing in the footer says otherwise
        with pytest.raises(DataError, match=r"row group 2: column '_group' has 1 null\(s\); expected a 64-bit group id"):
            list(batches)


def test_a_bad_part_of_any_split_is_refused_at_launch_before_ray(ds: Path) -> None:
    """`tf4ctr train` reads every part's footer on the driver: a null group id in the last row
    group of the valid part (read only after the first epoch) stops the launch before Ray is
    imported, naming the part and row group; so do a missing and a non-Parquet part."""
    import subprocess
    import sys

    from tf4ctr_dist.data.validate import check_part_footers

    manifest = load_manifest(str(ds))
    assert check_part_footers(str(ds), manifest, ["train", "valid", "test"]) == \
        sum(len(manifest.split(s).parts) for s in ("train", "valid", "test"))
    _rewrite_valid(ds, lambda t: _set_groups(t, [*t.column(GROUP_COLUMN).to_pylist()[:-1], None]))
    probe = ("import sys; from tf4ctr_dist.cli import main; code = main(sys.argv[1:]); "
             "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, "train", "--data", str(ds), "--out", str(ds.parent / "run"),
                           "--workers", "1", "epochs=1", "batch_size=8"],
                          capture_output=True, text=True, timeout=120, cwd=ds.parent)
    assert proc.returncode == 1 and "NO_RAY" in proc.stdout, proc.stdout + proc.stderr
    assert re.search(r"valid/part-00000.parquet row group 2: column '_group' has 1 null\(s\)", proc.stderr), proc.stderr
    assert not (ds.parent / "run").exists()

    path = ds / "valid" / "part-00000.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"valid/part-00000.parquet: not a readable Parquet file .*corrupt or truncated"):
        check_part_footers(str(ds), load_manifest(str(ds)), ["train", "valid"])
    path.unlink()
    with pytest.raises(DataError, match=r"valid/part-00000.parquet: part file missing"):
        check_part_footers(str(ds), load_manifest(str(ds)), ["train", "valid"])
    path.mkdir()  # fails to open at all: not called a corrupt Parquet file
    with pytest.raises(DataError, match=r"valid/part-00000.parquet: cannot open \(.*Is a directory"):
        check_part_footers(str(ds), load_manifest(str(ds)), ["train", "valid"])
    check_part_footers(str(ds), load_manifest(str(ds)), ["train"])  # only the splits asked for


# ---- 3. vocabulary entries of the wrong shape -------------------------------------------------


@pytest.mark.parametrize("entry, message", [
    ({"kind": "categorical", "file": "vocab/a.parquet"},
     r"spec.vocab.a.file: expected an object \{path, sha256, rows\} naming the vocabulary file of field 'a', got str"),
    ("vocab/a.parquet", r"spec.vocab.a: expected an object describing field 'a'.*got str"),
    ({"file": {"path": "vocab/a.parquet", "sha256": 5}}, r"spec.vocab.a.file: key 'sha256' should be str"),
])
def test_a_malformed_vocabulary_entry_is_a_reported_problem(ds: Path, entry, message: str) -> None:
    manifest = _manifest(ds)
    manifest["spec"]["vocab"]["a"] = entry
    _save(ds, manifest)
    assert re.search(message, _problems(ds))  # a problem, not an AttributeError or a warning
    with pytest.raises(DataError, match=message):
        load_manifest(str(ds))  # what training, export and predict call first


# ---- 4. symlinks out of the dataset root ------------------------------------------------------


def _link_part_outside(ds: Path) -> Path:
    """valid/part-00000.parquet -> a Parquet file outside the root (a copy, so the checksums in
    the manifest still match: only the link gives it away)."""
    part = ds / "valid" / "part-00000.parquet"
    outside = ds.parent / "elsewhere" / "part.parquet"
    outside.parent.mkdir()
    shutil.move(part, outside)
    part.symlink_to(outside)
    return outside


def _link_vocab_outside(ds: Path) -> Path:
    outside = ds.parent / "secret.txt"
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
    vocab = ds / "vocab" / "a.parquet"
    vocab.unlink()
    vocab.symlink_to(outside)
    manifest = _manifest(ds)
    manifest["spec"]["vocab"]["a"]["file"]["sha256"] = hashlib.sha256(outside.read_bytes()).hexdigest()
    _save(ds, manifest)
    return outside


def _link_folder_outside(ds: Path) -> Path:
    outside = ds.parent / "valid-elsewhere"
    shutil.move(ds / "valid", outside)
    (ds / "valid").symlink_to(outside, target_is_directory=True)
    return outside / "part-00000.parquet"


@pytest.mark.parametrize("link, listed", [
    (_link_part_outside, r"valid/part-00000.parquet \(splits.valid.parts\[0\] in manifest.json\)"),
    (_link_vocab_outside, r"vocab/a.parquet \(spec.vocab.a.file in manifest.json\)"),
    (_link_folder_outside, r"valid/part-00000.parquet \(splits.valid.parts\[0\] in manifest.json\)"),
])
def test_a_listed_file_linked_outside_the_root_is_refused(ds: Path, link, listed: str) -> None:
    target = link(ds)
    message = f"{listed}: resolves through a symlink to {re.escape(os.path.realpath(target))}, outside the dataset root"
    assert re.search(message, _problems(ds))
    with pytest.raises(DataError, match=message):
        load_manifest(str(ds))


def test_a_manifest_linked_outside_the_root_is_refused(ds: Path) -> None:
    outside = ds.parent / "manifest-elsewhere.json"
    shutil.move(ds / "manifest.json", outside)
    (ds / "manifest.json").symlink_to(outside)
    with pytest.raises(DataError, match="manifest.json: resolves through a symlink to .*outside the dataset root"):
        load_manifest(str(ds))


def test_the_reader_refuses_a_link_outside_even_with_a_manifest_from_elsewhere(ds: Path) -> None:
    """A manifest handed to the reader directly (not through load_manifest) is checked as each
    part is opened."""
    manifest = Manifest.from_json((ds / "manifest.json").read_text(), source="manifest.json")
    _link_part_outside(ds)
    with pytest.raises(DataError, match=r"valid/part-00000.parquet \(splits.valid.parts\[0\]\): resolves through a symlink"):
        read_split(str(ds), manifest, "valid", world_size=1, batch_size=4)


def test_links_that_stay_inside_the_root_and_a_linked_root_are_fine(ds: Path, tmp_path: Path) -> None:
    part = ds / "valid" / "part-00000.parquet"
    moved = ds / "valid" / "real.parquet"
    shutil.move(part, moved)
    part.symlink_to(moved)
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(ds, target_is_directory=True)
    for url in (ds, linked_root):
        m = load_manifest(str(url))
        assert sum(b.valid.sum().item() for b in read_split(str(url), m, "valid", world_size=1, batch_size=4)[0]) == 18
    assert check_dataset(str(linked_root)).problems == []


# ---- 5. keys the format does not define -------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(labels="y"), r"manifest.json: unknown key 'labels' \(did you mean 'label'\?\); "
                                     r"format_version 1 defines format_version, created_by, label"),
    (lambda m: m["fields"][0].update(vocab_mod="hashed"),
     r"manifest.json: fields\[0\] \(a\): unknown key 'vocab_mod' \(did you mean 'vocab_mode'\?\)"),
    (lambda m: m["splits"]["valid"].update(row_count=18), r"splits.valid: unknown key 'row_count'"),
    (lambda m: m["splits"]["train"]["parts"][0].update(sha265="0" * 64),
     r"splits.train.parts\[0\]: unknown key 'sha265' \(did you mean 'sha256'\?\)"),
    (lambda m: m["spec"]["vocab"]["a"]["file"].update(size=3), r"spec.vocab.a.file: unknown key 'size'"),
])
def test_a_key_the_format_does_not_define_is_refused(ds: Path, edit, message: str) -> None:
    """A misspelt optional key would otherwise be ignored and its default used (a hashed field
    read as counted ids), with no error anywhere."""
    manifest = _manifest(ds)
    edit(manifest)
    _save(ds, manifest)
    with pytest.raises(DataError, match=message):
        load_manifest(str(ds))
    assert re.search(message, _problems(ds))


def test_spec_stays_free_form(ds: Path) -> None:
    """spec holds prepare's provenance and options; new entries there are not format keys."""
    manifest = _manifest(ds)
    manifest["spec"]["notes"] = {"source": "hand-written", "rows_dropped": 3}
    _save(ds, manifest)
    assert load_manifest(str(ds)).spec["notes"]["rows_dropped"] == 3
