"""bars-csv with sequence and numeric fields on tiny CSVs (hand-computed ids)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.bars_csv import prepare_bars_csv
from data_tools.check import check_dataset
from tests.data_helpers import no_manifest_no_staging, write_csv
from tf4ctr_dist.data.errors import DataError

HEADER = "label,u,tags,price"


def _files(tmp: Path, train: list[str], valid: list[str] | None = None, test: list[str] | None = None) -> tuple[str, str, str]:
    return (
        write_csv(tmp / "train.csv", HEADER, train),
        write_csv(tmp / "valid.csv", HEADER, valid or ["0,u1,a,1"]),
        write_csv(tmp / "test.csv", HEADER, test or ["1,u2,b|c,"]),
    )


def _rows(out: Path, m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / p.path) for p in m.splits[split].parts])


FIELDS = [
    "u",
    {"name": "tags", "kind": "sequence", "max_len": 3, "splitter": "|"},
    {"name": "price", "kind": "numeric", "bucketing": "criteo"},
]


def test_sequence_and_numeric_fields(tmp_path: Path) -> None:
    train = ["1,u1,a|b,0.5", "0,u1,b||c,3", "1,u2,a,20", "0,u2,,", "1,u1,c|a|b,100"]
    files = _files(tmp_path, train)
    out = tmp_path / "ds"
    m = prepare_bars_csv(*files, str(out), fields=FIELDS, min_count=1, group_col="u")
    assert check_dataset(str(out)).ok
    kinds = {f.name: (f.kind, f.max_len) for f in m.fields}
    assert kinds == {"u": ("categorical", None), "tags": ("sequence", 3), "price": ("categorical", None)}
    t = _rows(out, m, "train")
    # tags vocabulary a=1, b=2, c=3 (sorted train tokens; 0 PAD, 4 OOV); empty items dropped
    assert t.column("tags").to_pylist() == [[1, 2], [2, 3], [1], [], [3, 1, 2]]
    # criteo bucketing: 0.5 -> 0, 3 -> floor(ln(3)^2) = 1, 20 -> floor(ln(20)^2) = 8, missing -> 0,
    # 100 -> floor(ln(100)^2) = 21; tokens "0","1","21","8" sorted as text -> ids 1..4
    expected = [int(math.log(v) ** 2) if v > 2 else int(v) for v in (0.5, 3, 20, 0, 100)]
    assert expected == [0, 1, 8, 0, 21]
    vocab = sorted({str(v) for v in expected})
    assert t.column("price").to_pylist() == [vocab.index(str(v)) + 1 for v in expected]
    test = _rows(out, m, "test")
    assert test.column("tags").to_pylist() == [[2, 3]] and test.column("price").to_pylist() == [vocab.index("0") + 1]


def test_boundaries_bucketing_and_truncation(tmp_path: Path) -> None:
    train = ["1,u1,a|b|c|d,5", "0,u1,d,15", "1,u2,a,"]
    files = _files(tmp_path, train)
    out = tmp_path / "ds"
    fields = ["u", {"name": "tags", "kind": "sequence", "max_len": 2, "keep": "last"},
              {"name": "price", "kind": "numeric", "bucketing": {"boundaries": [10, 20]}}]
    m = prepare_bars_csv(*files, str(out), fields=fields, min_count=1)
    t = _rows(out, m, "train")
    # the last 2 of a|b|c|d; counted after truncation, so b is not in the vocabulary: a=1, c=2, d=3
    assert t.column("tags").to_pylist() == [[2, 3], [3], [1]]
    # 5 -> bucket 0, 15 -> bucket 1, missing -> "" (OOV); vocabulary {"0", "1"}: ids 1, 2, OOV 3
    assert t.column("price").to_pylist() == [1, 2, 3]


@pytest.mark.parametrize(
    "train, message",
    [
        (["1,u1,a|b,1", "0,u1,a|b|c|d,2"], r"train\.csv: line 3: column 'tags' has 4 items .* more than max_len 3"),
        (["1,u1,a,1", "0,u1,b,cheap"], r"train\.csv: line 3: column 'price' = 'cheap'; expected a number or empty"),
    ],
)
def test_bad_cells(tmp_path: Path, train: list[str], message: str) -> None:
    files = _files(tmp_path, train)
    with pytest.raises(DataError, match=message):
        prepare_bars_csv(*files, str(tmp_path / "ds"), fields=FIELDS, min_count=1)
    assert no_manifest_no_staging(tmp_path / "ds")


def test_wrong_separator(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", HEADER.replace(",", "\t"), ["1\tu1\ta\t1"])
    files = (train, *_files(tmp_path / "v", ["1,u1,a,1"])[1:])
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\).*separator '\\t' instead of ','"):
        prepare_bars_csv(*files, str(tmp_path / "ds"), fields=FIELDS)
    assert no_manifest_no_staging(tmp_path / "ds")
