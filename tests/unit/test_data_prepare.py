"""BARS CSV conversion: vocabularies, layout, atomic output and the bad-input catalogue."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.bars_csv import prepare_bars_csv
from data_tools.check import check_dataset
from tests.data_helpers import no_manifest_no_staging, tiny_bars, write_csv
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import GROUP_COLUMN, load_manifest


def _split_table(out: Path, manifest, split: str):
    tables = [pq.read_table(out / p.path) for p in manifest.splits[split].parts]
    import pyarrow as pa

    return pa.concat_tables(tables)


def test_vocab_min_count_sorted_oov_pad(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    out = tmp_path / "ds"
    m = prepare_bars_csv(train, valid, test, str(out), group_col="u", row_group_rows=16)
    sizes = {f.name: f.vocab_size for f in m.fields}
    # a: a0 a1 a2 kept (20 each); "rare" (1x) and "" (missing) are not tokens -> OOV = 4.
    assert sizes == {"a": 5, "b": 7, "u": 6}
    assert m.label == "label" and m.group == "u" and [f.name for f in m.fields] == ["a", "b", "u"]
    train_t = _split_table(out, m, "train")
    a = train_t.column("a").to_numpy()
    assert a[:6].tolist() == [1, 2, 3, 1, 2, 3]  # sorted: a0 -> 1, a1 -> 2, a2 -> 3
    assert a[-2:].tolist() == [4, 4]  # "rare" (below min_count) and "" (missing) -> OOV
    assert 0 not in a  # id 0 is PAD, never a real value
    # Vocabulary fit on train only: a value seen only in valid maps to OOV.
    valid_t = _split_table(out, m, "valid")
    assert valid_t.column("a").to_numpy()[-1] == 4
    # b5, b6 only appear in test -> OOV (6).
    test_b = _split_table(out, m, "test").column("b").to_numpy()
    assert set(test_b[[5, 6, 12, 13]].tolist()) == {6}
    assert train_t.schema.names == ["label", "a", "b", "u", GROUP_COLUMN]
    assert str(train_t.schema.field("label").type) == "float"
    # Group ids: stable per raw value, equal for equal users, never 0.
    g = train_t.column(GROUP_COLUMN).to_numpy()
    u = train_t.column("u").to_numpy()
    assert (g != 0).all() and len(set(g[u == 1].tolist())) == 1 and len(set(g.tolist())) == 4


def test_min_count_one_keeps_rare_tokens(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    m = prepare_bars_csv(train, valid, test, str(tmp_path / "ds"), min_count=1, fields=["a"])
    assert [(f.name, f.vocab_size) for f in m.fields] == [("a", 6)]  # a0 a1 a2 rare + PAD + OOV
    assert m.group is None
    t = _split_table(tmp_path / "ds", m, "train")
    assert t.column("a").to_numpy()[-2:].tolist() == [4, 5]  # "rare" sorts after a*; "" -> OOV
    assert (t.column(GROUP_COLUMN).to_numpy() == 0).all()


def test_manifest_layout_counts_and_checksums(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    out = tmp_path / "ds"
    m = prepare_bars_csv(train, valid, test, str(out), row_group_rows=10, row_groups_per_part=3)
    assert load_manifest(str(out)) == m
    assert {s: i.rows for s, i in m.splits.items()} == {"train": 62, "valid": 18, "test": 23}
    parts = m.splits["train"].parts
    assert [p.path for p in parts] == ["train/part-00000.parquet", "train/part-00001.parquet", "train/part-00002.parquet"]
    assert [p.row_groups for p in parts] == [[10, 10, 10], [10, 10, 10], [2]]
    for p in parts:
        data = (out / p.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == p.sha256
        assert [pq.ParquetFile(out / p.path).metadata.row_group(i).num_rows for i in range(len(p.row_groups))] == p.row_groups
    assert m.spec["format"] == "bars-csv" and m.spec["min_count"] == 2
    assert sorted(x.name for x in out.iterdir()) == ["manifest.json", "test", "train", "valid", "vocab"]


def test_vocabularies_saved_listed_and_checked(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    out = tmp_path / "ds"
    m = prepare_bars_csv(
        train, valid, test, str(out), group_col="u", field_options={"b": {"vocab_mode": "hashed", "buckets": 8}}
    )
    files = {name: v.get("file") for name, v in m.spec["vocab"].items()}
    assert files["b"] is None  # hashed: nothing to save
    assert files["a"]["path"] == "vocab/a.parquet" and files["u"]["path"] == "vocab/u.parquet"
    assert sorted(p.name for p in (out / "vocab").iterdir()) == ["a.parquet", "u.parquet"]
    a = pq.read_table(out / "vocab" / "a.parquet")
    # train only: a0..a2 20 times each; "rare" (1x < min_count 2) and "" are not tokens
    assert a.to_pydict() == {"token": ["a0", "a1", "a2"], "id": [1, 2, 3], "count": [20, 20, 20]}
    assert a.num_rows == files["a"]["rows"] == m.fields[0].vocab_size - 2
    assert hashlib.sha256((out / "vocab" / "a.parquet").read_bytes()).hexdigest() == files["a"]["sha256"]
    # the saved vocabulary is the mapping the parts use
    t = _split_table(out, m, "train")
    raw = [line.split(",")[1] for line in Path(train).read_text().splitlines()[1:]]
    lookup = dict(zip(a.column("token").to_pylist(), a.column("id").to_pylist()))
    assert t.column("a").to_pylist() == [lookup.get(v, 4) for v in raw]

    report = check_dataset(str(out))
    assert report.ok and not report.warnings, report.problems + report.warnings
    vocab_file = out / "vocab" / "u.parquet"
    good = vocab_file.read_bytes()
    pq.write_table(pa.table({"token": ["u0", "u2", "u1"], "id": [1, 2, 3], "count": [5, 5, 5]}), vocab_file)
    problems = check_dataset(str(out)).problems
    assert any("vocab/u.parquet: sha256" in p for p in problems), problems
    assert any("vocab/u.parquet row group 0: tokens not strictly increasing" in p for p in problems), problems
    vocab_file.unlink()
    problems = check_dataset(str(out)).problems
    assert any("vocab/u.parquet: vocabulary file of field 'u' missing" in p for p in problems), problems
    vocab_file.write_bytes(good)
    assert check_dataset(str(out)).ok
    # overwrite with all-hashed fields: the old vocabularies go with the old dataset
    prepare_bars_csv(train, valid, test, str(out), overwrite=True, vocab_mode="hashed", buckets=16)
    assert not (out / "vocab").exists() and check_dataset(str(out)).ok


def test_failed_run_leaves_no_vocabularies(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    Path(test).write_text(Path(test).read_text() + "7,a0,b0,u0\n")  # bad label after the vocab pass
    out = tmp_path / "ds"
    with pytest.raises(DataError, match="expected 0 or 1"):
        prepare_bars_csv(train, valid, test, str(out))
    assert not out.exists()


def test_refuses_existing_dataset_unless_overwrite(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    out = tmp_path / "ds"
    first = prepare_bars_csv(train, valid, test, str(out), row_group_rows=10)
    with pytest.raises(DataError, match="already holds a dataset"):
        prepare_bars_csv(train, valid, test, str(out))
    assert load_manifest(str(out)) == first
    second = prepare_bars_csv(train, valid, test, str(out), overwrite=True, row_group_rows=100)
    assert load_manifest(str(out)) == second
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet"]  # old parts gone


# ---- bad inputs: each names the file and the problem, and leaves no dataset or staging behind ----


def _expect_error(out: Path, match: str, *args, **kwargs) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        prepare_bars_csv(*args, str(out), **kwargs)
    assert no_manifest_no_staging(out), f"output left behind: {list(out.iterdir())}"
    return info.value


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    train, valid, _ = tiny_bars(tmp_path / "in")
    test = write_csv(tmp_path / "in" / "test_bad.csv", "label,a,u", ["0,a1,u1"])
    err = _expect_error(tmp_path / "ds", "missing column", train, valid, test)
    assert "test_bad.csv" in str(err) and "'b'" in str(err)


def test_missing_group_column(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    err = _expect_error(tmp_path / "ds", "missing column", train, valid, test, group_col="user_id")
    assert "train.csv" in str(err) and "user_id" in str(err)


@pytest.mark.parametrize("bad", ["2", "-1", "0.5", "yes", ""])
def test_label_outside_0_1_in_train(tmp_path: Path, bad: str) -> None:
    rows = ["0,a1,b1,u1"] * 5 + [f"{bad},a1,b1,u1"]
    train = write_csv(tmp_path / "in" / "train.csv", "label,a,b,u", rows)
    _, valid, test = tiny_bars(tmp_path / "other")
    err = _expect_error(tmp_path / "ds", "expected 0 or 1", train, valid, test)
    assert "train.csv" in str(err) and "line 7" in str(err) and "'label'" in str(err)


def test_bad_label_in_test_after_writing_started(tmp_path: Path) -> None:
    # The error comes while parts are being written: staging must be removed, output untouched.
    train, valid, _ = tiny_bars(tmp_path / "in")
    test = write_csv(tmp_path / "in" / "t.csv", "label,a,b,u", ["1,a1,b1,u1", "0,a1,b1,u1", "click,a1,b1,u1"])
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    err = _expect_error(out, "expected 0 or 1", train, valid, test, row_group_rows=4)
    assert "t.csv" in str(err) and "line 4" in str(err) and "'click'" in str(err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_output_dir_created_by_failed_run_is_removed(tmp_path: Path) -> None:
    train, valid, _ = tiny_bars(tmp_path / "in")
    test = write_csv(tmp_path / "in" / "t.csv", "label,a,b,u", ["7,a1,b1,u1"])
    _expect_error(tmp_path / "new" / "ds", "expected 0 or 1", train, valid, test)
    assert not (tmp_path / "new" / "ds").exists()


def test_empty_files(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    empty = tmp_path / "in" / "empty.csv"
    empty.write_text("")
    err = _expect_error(tmp_path / "ds", "empty file", train, str(empty), test)
    assert "empty.csv" in str(err)
    header_only = write_csv(tmp_path / "in" / "header_only.csv", "label,a,b,u", [])
    err = _expect_error(tmp_path / "ds", "empty file", header_only, valid, test)
    assert "header_only.csv" in str(err) and "no data rows" in str(err)


def test_missing_input_file(tmp_path: Path) -> None:
    train, valid, _ = tiny_bars(tmp_path / "in")
    err = _expect_error(tmp_path / "ds", "input file not found", train, valid, str(tmp_path / "nope.csv"))
    assert "nope.csv" in str(err)


@pytest.mark.parametrize("bad, message", [
    ("1,a1", "line 1502 has 2 columns, expected 4 (label, a, b, u)"),
    ("1,a1,b1,u1,extra", "line 1502 has 5 columns, expected 4"),
])
def test_malformed_csv_row_is_named_by_its_line(tmp_path: Path, bad: str, message: str) -> None:
    """Arrow reports the block; the message names the exact line (past the first block here)."""
    rows = ["0,a1,b1,u1"] * 1500 + [bad] + ["0,a1,b1,u1"] * 10
    train = write_csv(tmp_path / "in" / "ragged.csv", "label,a,b,u", rows)
    _, valid, test = tiny_bars(tmp_path / "other")
    import data_tools.csv_input as csv_input

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(csv_input, "BLOCK_SIZE", 4096)  # several blocks: the bad line is not in the first
        err = _expect_error(tmp_path / "ds", "malformed CSV", train, valid, test)
    assert f"ragged.csv: malformed CSV: {message}" in str(err)


def test_bad_output_urls(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    with pytest.raises(DataError, match="bad URL nosuchproto://x/y"):
        prepare_bars_csv(train, valid, test, "nosuchproto://x/y")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="is an existing file"):
        prepare_bars_csv(train, valid, test, str(a_file))


def test_label_cannot_be_a_field_and_min_count_positive(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    with pytest.raises(DataError, match="cannot also be a field"):
        prepare_bars_csv(train, valid, test, str(tmp_path / "ds"), fields=["label", "a"])
    with pytest.raises(DataError, match="min_count"):
        prepare_bars_csv(train, valid, test, str(tmp_path / "ds"), min_count=0)
    assert no_manifest_no_staging(tmp_path / "ds")


def test_gzip_input(tmp_path: Path) -> None:
    import gzip

    train, valid, test = tiny_bars(tmp_path / "in")
    gz = tmp_path / "in" / "train.csv.gz"
    gz.write_bytes(gzip.compress(Path(train).read_bytes()))
    m = prepare_bars_csv(str(gz), valid, test, str(tmp_path / "ds"))
    assert m.splits["train"].rows == 62
