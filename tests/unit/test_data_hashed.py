"""vocab_mode: hashed in the Criteo and BARS CSV converters: ids 1 + hash mod N, stable across
splits, files and runs; no vocabulary pass (train read once)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data_tools import criteo
from data_tools.bars_csv import prepare_bars_csv
from benchmarks.prepare import write_criteo_tsv
from data_tools.check import check_dataset
from data_tools.cli import main
from data_tools.vocab import hash_ids
from tests.data_helpers import tiny_bars, write_csv


@pytest.fixture(scope="module")
def raw_criteo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("criteo") / "day.tsv"
    write_criteo_tsv(path, 2000, seed=3, chunk_rows=500)
    return path


def _rows(out: Path, m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / p.path) for p in m.splits[split].parts])


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = criteo.CriteoSource.read

    def counting(self, shard, names):
        calls.append(len(names))
        return original(self, shard, names)

    monkeypatch.setattr(criteo.CriteoSource, "read", counting)
    return calls


def test_criteo_all_hashed_reads_once(raw_criteo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_reads(monkeypatch)
    out = tmp_path / "hashed"
    m = criteo.prepare_criteo(str(raw_criteo), str(out), vocab_mode="hashed", buckets=1000, row_group_rows=256)
    assert calls == [39], "one read of the input (no vocabulary pass), producing all 39 fields"
    assert all(f.vocab_mode == "hashed" and f.vocab_size == 1001 for f in m.fields)
    assert m.spec["vocab"]["C3"]["buckets"] == 1000 and "siphash" in m.spec["vocab"]["C3"]["hash"]
    assert check_dataset(str(out)).ok

    # Same raw value -> same id, in every split; equal to 1 + hash mod N of the raw text.
    raw = pacsv.read_csv(raw_criteo, read_options=pacsv.ReadOptions(column_names=criteo.COLUMNS),
                         parse_options=pacsv.ParseOptions(delimiter="\t"),
                         convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in criteo.COLUMNS},
                                                              strings_can_be_null=False))
    which = criteo.split_of_rows(0, raw.num_rows, 2018, (0.8, 0.1, 0.1))
    for j, split in enumerate(("train", "valid", "test")):
        t = _rows(out, m, split)
        mine = raw.filter(pa.array(which == j))
        for name in ("C1", "C3", "C20"):
            ids = t.column(name).to_numpy()
            assert ids.min() >= 1 and ids.max() <= 1000
            assert (ids == hash_ids(mine.column(name), 1000)).all()
        # numeric fields hash their bucket's text
        assert (t.column("I5").to_numpy() == hash_ids(pa.array(criteo.bucketize(
            pa.compute.cast(pa.compute.if_else(pa.compute.equal(mine.column("I5"), ""), None, mine.column("I5")), pa.float64()).to_numpy(zero_copy_only=False)
        )).cast(pa.string()), 1000)).all()

    calls.clear()
    counted = criteo.prepare_criteo(str(raw_criteo), str(tmp_path / "counted"), min_count=2, row_group_rows=256)
    assert calls == [39, 39], "counted vocabularies: a counting pass, then the transform"
    assert all(f.vocab_mode == "counted" for f in counted.fields)


def test_criteo_mixed_modes(raw_criteo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_reads(monkeypatch)
    m = criteo.prepare_criteo(
        str(raw_criteo), str(tmp_path / "ds"), min_count=2, buckets=500,
        field_options={"C3": {"vocab_mode": "hashed"}, "C12": {"vocab_mode": "hashed", "buckets": 64}},
    )
    assert calls == [37, 39]  # the counting pass skips the hashed fields
    fields = {f.name: f for f in m.fields}
    assert (fields["C3"].vocab_mode, fields["C3"].vocab_size) == ("hashed", 501)
    assert (fields["C12"].vocab_mode, fields["C12"].vocab_size) == ("hashed", 65)
    assert fields["C1"].vocab_mode == "counted"
    # the counted fields are exactly what an all-counted run gives
    plain = criteo.prepare_criteo(str(raw_criteo), str(tmp_path / "plain"), min_count=2)
    assert [f for f in m.fields if f.name not in ("C3", "C12")] == [f for f in plain.fields if f.name not in ("C3", "C12")]
    a, b = _rows(tmp_path / "ds", m, "valid"), _rows(tmp_path / "plain", plain, "valid")
    assert a.drop_columns(["C3", "C12"]).equals(b.drop_columns(["C3", "C12"]))


def test_bars_hashed_same_id_across_files_and_datasets(tmp_path: Path) -> None:
    train, valid, test = tiny_bars(tmp_path / "in")
    m = prepare_bars_csv(train, valid, test, str(tmp_path / "a"), fields=["a", {"name": "u", "vocab_mode": "hashed", "buckets": 13}])
    u = {f.name: f for f in m.fields}["u"]
    assert (u.vocab_mode, u.vocab_size) == ("hashed", 14)
    expected = {f"u{i}": int(hash_ids(pa.array([f"u{i}"]), 13)[0]) for i in range(10)}
    for split, path in (("train", train), ("valid", valid), ("test", test)):
        raw = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"u": pa.string()}))
        ids = _rows(tmp_path / "a", m, split).column("u").to_pylist()
        assert ids == [expected[v] for v in raw.column("u").to_pylist()]
    # another dataset (other files, other process state) maps the same raw value to the same id
    other = write_csv(tmp_path / "o" / "train.csv", "label,u", ["1,u9", "0,u3"])
    m2 = prepare_bars_csv(other, other, other, str(tmp_path / "b"), vocab_mode="hashed", buckets=13)
    assert _rows(tmp_path / "b", m2, "test").column("u").to_pylist() == [expected["u9"], expected["u3"]]


def test_bars_hashed_from_the_cli(tmp_path: Path) -> None:
    tiny_bars(tmp_path / "in")
    out = tmp_path / "ds"
    assert main(["prepare", "bars-csv", "--input", str(tmp_path / "in"), "--out", str(out),
                 "--set", "vocab_mode=hashed", "--set", "buckets=7", "--set", "field_options={b: {vocab_mode: counted}}"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [(f["name"], f["vocab_mode"], f["vocab_size"]) for f in m["fields"]] == [
        ("a", "hashed", 8), ("b", "counted", 7), ("u", "hashed", 8)
    ]
    assert m["spec"]["row_group_rows"] == 1024  # adaptive, from the train-size estimate
    assert main(["check", str(out), "--quiet"]) == 0
    ids = np.concatenate([pq.read_table(out / p["path"]).column("a").to_numpy() for p in m["splits"]["valid"]["parts"]])
    assert ids.min() >= 1 and ids.max() <= 7
