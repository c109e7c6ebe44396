"""Criteo conversion: numeric bucketing, deterministic 8:1:1 split, both input layouts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.criteo import COLUMNS, bucketize, prepare_criteo, split_of_rows
from tests.data_helpers import CRITEO_SAMPLE, no_manifest_no_staging
from tf4ctr_dist.data.errors import DataError


@pytest.mark.parametrize(
    "value, bucket",
    [
        (float("nan"), 0),  # missing -> 0
        (0.0, 0),
        (1.0, 1),
        (2.0, 2),  # not > 2: int(v)
        (2.5, 0),  # floor(ln(2.5)^2) = floor(0.8396) = 0
        (3.0, 1),  # floor(ln(3)^2) = floor(1.2069) = 1
        (10.0, 5),  # floor(5.3019) = 5
        (100.0, 21),  # floor(21.2076) = 21
        (1000.0, 47),  # floor(47.7171) = 47
        (1.9, 1),
        (-1.0, -1),  # negatives: int(v)
        (-0.5, 0),  # int() truncates toward zero
        (-3.7, -3),
    ],
)
def test_bucketize_hand_computed(value: float, bucket: int) -> None:
    assert bucketize(np.array([value]))[0] == bucket
    if value > 2:
        assert bucket == math.floor(math.log(value) ** 2)


def test_split_is_deterministic_and_chunk_independent() -> None:
    whole = split_of_rows(0, 100_000, seed=1, fractions=(0.8, 0.1, 0.1))
    pieces = np.concatenate([split_of_rows(s, 7_000, 1, (0.8, 0.1, 0.1)) for s in range(0, 100_000, 7_000)])[:100_000]
    assert (whole == pieces).all()
    shares = np.bincount(whole, minlength=3) / len(whole)
    assert np.allclose(shares, [0.8, 0.1, 0.1], atol=0.01)
    assert (split_of_rows(0, 1000, seed=2, fractions=(0.8, 0.1, 0.1)) != whole[:1000]).any()


def _all(out: Path, m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / p.path) for p in m.splits[split].parts])


def _sample() -> Path:
    if not CRITEO_SAMPLE.is_file():
        pytest.skip(f"Criteo sample not found at {CRITEO_SAMPLE} (read-only shared data, not in the repo)")
    return CRITEO_SAMPLE


def test_header_csv_and_release_tsv_give_the_same_dataset(tmp_path: Path) -> None:
    sample = _sample()
    lines = sample.read_text().splitlines()
    tsv = tmp_path / "day_0.tsv"
    tsv.write_text("\n".join(line.replace(",", "\t") for line in lines[1:]) + "\n")
    a = prepare_criteo(str(sample), str(tmp_path / "a"), min_count=2, row_group_rows=64)
    b = prepare_criteo(str(tsv), str(tmp_path / "b"), min_count=2, row_group_rows=64)
    assert a.spec["header"] is True and b.spec["header"] is False and b.spec["delimiter"] == "\t"
    assert a.fields == b.fields and [f.name for f in a.fields] == COLUMNS[1:]
    assert sum(i.rows for i in a.splits.values()) == 200
    for split in ("train", "valid", "test"):
        assert _all(tmp_path / "a", a, split).equals(_all(tmp_path / "b", b, split))


def test_vocab_fit_on_train_rows_only(tmp_path: Path) -> None:
    # 40 rows; C1 = "only<row>" is unique per row, C2 = "x" everywhere; min_count 1.
    rows = []
    for r in range(40):
        rows.append("\t".join([str(r % 2), *[str(r)] * 13, f"only{r}", "x", *[""] * 24]))
    path = tmp_path / "t.tsv"
    path.write_text("\n".join(rows) + "\n")
    m = prepare_criteo(str(path), str(tmp_path / "ds"), min_count=1, seed=5)
    n_train = m.splits["train"].rows
    c1 = {f.name: f for f in m.fields}["C1"]
    assert c1.vocab_size == n_train + 2  # only train tokens get ids
    valid_c1 = _all(tmp_path / "ds", m, "valid").column("C1").to_numpy()
    assert (valid_c1 == c1.vocab_size - 1).all()  # unseen in train -> OOV
    c3 = _all(tmp_path / "ds", m, "train").column("C3").to_numpy()
    assert (c3 == 1).all() and {f.name: f for f in m.fields}["C3"].vocab_size == 2  # all missing -> OOV = 1


def test_bad_numeric_value_names_file_line_column(tmp_path: Path) -> None:
    good = "\t".join(["0", *["1"] * 13, *["a"] * 26])
    bad = "\t".join(["1", "2", "oops", *["1"] * 11, *["a"] * 26])
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join([good, good, bad]) + "\n")
    with pytest.raises(DataError, match=r"bad\.tsv: line 3: column 'I2' = 'oops'; expected a number"):
        prepare_criteo(str(path), str(tmp_path / "ds"))
    assert no_manifest_no_staging(tmp_path / "ds")


def test_wrong_column_count(tmp_path: Path) -> None:
    path = tmp_path / "short.tsv"
    path.write_text("0\t1\t2\n")
    with pytest.raises(DataError, match=r"short\.tsv: line 1 has 3 columns; expected 40"):
        prepare_criteo(str(path), str(tmp_path / "ds"))


def test_folder_and_glob_of_day_files(tmp_path: Path) -> None:
    from benchmarks.prepare import write_criteo_tsv
    from data_tools.criteo import FILE_ROWS, split_of_row_numbers

    days = tmp_path / "days"
    days.mkdir()
    sizes = {"day_0": 700, "day_2": 300, "day_10": 500}  # natural order: 0, 2, 10 (not 0, 10, 2)
    for seed, (name, rows) in enumerate(sizes.items()):
        write_criteo_tsv(days / name, rows, seed=seed, chunk_rows=250)
    (days / "_SUCCESS").write_text("")  # marker files are skipped
    single = prepare_criteo(str(days / "day_0"), str(tmp_path / "one"), min_count=2, row_group_rows=128)
    many = prepare_criteo(str(days), str(tmp_path / "many"), min_count=2, row_group_rows=128)
    glob = prepare_criteo(str(days / "day_*"), str(tmp_path / "glob"), min_count=2, row_group_rows=128)
    assert many.spec["files"] == [str(days / n) for n in ("day_0", "day_2", "day_10")]
    assert [p.sha256 for i in glob.splits.values() for p in i.parts] == [p.sha256 for i in many.splits.values() for p in i.parts]
    assert sum(i.rows for i in many.splits.values()) == 1500
    # row r of file k is row k * 2^40 + r for the split hash: file 0 splits as on its own
    expected = np.concatenate([
        split_of_row_numbers(np.arange(n, dtype=np.uint64) + np.uint64(k * FILE_ROWS), 2018, (0.8, 0.1, 0.1))
        for k, n in enumerate([700, 300, 500])
    ])
    assert {s: i.rows for s, i in many.splits.items()} == {s: int((expected == k).sum()) for k, s in enumerate(("train", "valid", "test"))}
    assert {s: i.rows for s, i in single.splits.items()} == {s: int((expected[:700] == k).sum()) for k, s in enumerate(("train", "valid", "test"))}
    # the folder's train rows are day_0's train rows, then day_2's, then day_10's
    one_train = _all(tmp_path / "one", single, "train")
    many_train = _all(tmp_path / "many", many, "train")
    assert many_train.column("label").to_pylist()[: one_train.num_rows] == one_train.column("label").to_pylist()
    # a bad file among them is named
    (days / "day_3").write_text("0\t1\t2\n")
    with pytest.raises(DataError, match=r"day_3: line 1 has 3 columns; expected 40"):
        prepare_criteo(str(days), str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"no files"):
        prepare_criteo(str(tmp_path / "days" / "nothing_*"), str(tmp_path / "none"))
