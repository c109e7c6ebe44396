"""Criteo as BARS Criteo_x4 has it: the 10-fold stratified split of one raw file, and the already
split x4 CSVs (header Label,I1..I13,C1..C26) bucketised on the way in."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.check import check_dataset
from data_tools.cli import main as data_main
from data_tools.criteo import CATEGORICAL, NUMERIC, prepare_criteo
from tests.data_helpers import no_manifest_no_staging, write_csv
from tf4ctr_dist.data.errors import DataError

X4_HEADER = ",".join(["Label", *NUMERIC, *CATEGORICAL])


def _rows(out: Path, m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / p.path) for p in m.splits[split].parts])


def _raw_tsv(path: Path, labels: np.ndarray) -> str:
    rng = np.random.default_rng(3)
    lines = [
        "\t".join([str(int(y)), *(str(rng.integers(0, 50)) for _ in NUMERIC), *(f"c{rng.integers(0, 4)}" for _ in CATEGORICAL)])
        for y in labels
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_stratified_x4_split_fold_sizes_and_label_balance(tmp_path: Path) -> None:
    labels = (np.random.default_rng(0).random(1003) < 0.26).astype(int)  # 1003 rows: folds of 100 or 101
    positives = int(labels.sum())
    out = tmp_path / "ds"
    m = prepare_criteo(_raw_tsv(tmp_path / "train.txt", labels), str(out), split_rule="stratified", min_count=1)
    assert check_dataset(str(out)).ok
    rows = {s: m.splits[s].rows for s in ("train", "valid", "test")}
    # 10 folds dealt round-robin over the rows of each class: fold sizes 100 or 101; train = 8 folds
    assert sum(rows.values()) == 1003
    assert rows["valid"] in (100, 101) and rows["test"] in (100, 101) and 800 <= rows["train"] <= 808
    # label balance: every fold holds floor or ceil of positives / 10
    for split, folds in (("valid", 1), ("test", 1), ("train", 8)):
        pos = int(np.sum(_rows(out, m, split).column("label").to_numpy()))
        assert folds * (positives // 10) <= pos <= folds * -(-positives // 10), (split, pos)
    assert m.spec["split_rule"] == "stratified" and m.spec["seed"] == 2018
    # the same seed gives the same split, another seed another one
    again = prepare_criteo(str(tmp_path / "train.txt"), str(tmp_path / "ds2"), split_rule="stratified", min_count=1)
    other = prepare_criteo(str(tmp_path / "train.txt"), str(tmp_path / "ds3"), split_rule="stratified", min_count=1, seed=7)
    valid = lambda mm, root: _rows(root, mm, "valid").column("I1").to_pylist()  # noqa: E731
    assert valid(again, tmp_path / "ds2") == valid(m, out)
    assert valid(other, tmp_path / "ds3") != valid(m, out)


def test_stratified_split_needs_tenths(tmp_path: Path) -> None:
    path = _raw_tsv(tmp_path / "t.txt", np.array([0, 1] * 20))
    with pytest.raises(DataError, match="tenths"):
        prepare_criteo(path, str(tmp_path / "ds"), split_rule="stratified", split=(0.75, 0.15, 0.1))
    no_manifest_no_staging(tmp_path / "ds")


def _x4_line(label: int, i1: str, c1: str) -> str:
    return ",".join([str(label), i1, *("1" for _ in NUMERIC[1:]), c1, *("x" for _ in CATEGORICAL[1:])])


def test_x4_csvs_bucketised_on_the_way_in(tmp_path: Path) -> None:
    # I1 raw values and their hand-computed buckets (missing -> 0; v > 2 -> floor(ln(v)^2); else int(v))
    raw = ["", "0", "1", "2", "2.5", "3", "10", "100", "1000", "-1"]
    buckets = [0, 0, 1, 2, 0, 1, 5, 21, 47, -1]
    assert buckets[4:9] == [math.floor(math.log(v) ** 2) for v in (2.5, 3, 10, 100, 1000)]
    train = [_x4_line(i % 2, v, f"c{i % 3}") for i, v in enumerate(raw)]
    files = [write_csv(tmp_path / "x4" / f"{s}.csv", X4_HEADER, rows) for s, rows in
             (("train", train), ("valid", [_x4_line(1, "10", "c0")]), ("test", [_x4_line(0, "", "zz")]))]
    out = tmp_path / "ds"
    m = prepare_criteo(files, str(out), min_count=1)
    assert check_dataset(str(out)).ok
    assert [f.name for f in m.fields] == NUMERIC + CATEGORICAL
    assert {s: m.splits[s].rows for s in ("train", "valid", "test")} == {"train": 10, "valid": 1, "test": 1}
    vocab = sorted({str(b) for b in buckets})  # tokens sorted as text -> ids 1..N (0 PAD, N+1 OOV)
    assert _rows(out, m, "train").column("I1").to_pylist() == [vocab.index(str(b)) + 1 for b in buckets]
    assert _rows(out, m, "valid").column("I1").to_pylist() == [vocab.index("5") + 1]
    assert _rows(out, m, "test").column("I1").to_pylist() == [vocab.index("0") + 1]
    assert _rows(out, m, "test").column("C1").to_pylist() == [4]  # "zz" unseen -> OOV (c0, c1, c2 are 1..3)
    assert _rows(out, m, "train").column(m.label).to_pylist() == [float(i % 2) for i in range(10)]
    # the CLI takes the x4 folder (train.csv inside -> the three CSVs, not day files)
    assert data_main(["prepare", "criteo", "--input", str(tmp_path / "x4"), "--out", str(tmp_path / "cli"), "min_count=1"]) == 0
    assert check_dataset(str(tmp_path / "cli")).ok


def test_x4_csv_missing_column_names_the_file(tmp_path: Path) -> None:
    bad = X4_HEADER.replace(",I7,", ",I7x,")
    files = [write_csv(tmp_path / f"{s}.csv", X4_HEADER if s != "valid" else bad, [_x4_line(1, "1", "a")])
             for s in ("train", "valid", "test")]
    with pytest.raises(DataError, match=r"valid\.csv: missing column\(s\) \['I7'\]"):
        prepare_criteo(files, str(tmp_path / "ds"))
    no_manifest_no_staging(tmp_path / "ds")
