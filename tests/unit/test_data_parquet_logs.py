"""parquet-logs: date-partitioned Parquet input, every field kind, both vocabulary modes, and the
bad-input catalogue (each error names the file, and the row group / column where it applies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.check import check_dataset
from data_tools.cli import main
from data_tools.parquet_logs import prepare_parquet_logs
from data_tools.vocab import hash_ids, stable_hash
from tests.data_helpers import no_manifest_no_staging
from tf4ctr_dist.data.errors import DataError

DATES = ["2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27"]


def log_table(rows: int, seed: int, *, label: Any = None) -> pa.Table:
    rng = np.random.default_rng(seed)
    price = rng.lognormal(2, 1, rows)
    return pa.table({
        "click": pa.array(rng.integers(0, 2, rows) if label is None else label, pa.int8()),
        "user_id": pa.array(rng.integers(1, 30, rows), pa.int64()),
        "item": pa.array([f"item{x}" for x in rng.integers(0, 12, rows)]).dictionary_encode(),
        "hist": pa.array([[f"i{x}" for x in rng.integers(0, 9, k)] for k in rng.integers(0, 6, rows)], pa.list_(pa.string())),
        "tags": pa.array(["|".join(f"t{x}" for x in rng.integers(0, 5, k)) for k in rng.integers(0, 4, rows)]),
        "price": pa.array(np.where(rng.random(rows) < 0.1, np.nan, price), from_pandas=True),
        "unused": pa.array(np.zeros(rows)),
    })


def write_logs(root: Path, files: dict[str, list[pa.Table]], row_group_rows: int = 16) -> Path:
    for date, tables in files.items():
        folder = root / f"dt={date}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, table in enumerate(tables):
            pq.write_table(table, folder / f"part-{k:05d}.parquet", row_group_size=row_group_rows)
        (folder / "_SUCCESS").write_text("")
    return root


def default_logs(root: Path) -> Path:
    return write_logs(root, {
        DATES[0]: [log_table(40, 1), log_table(25, 2)],
        DATES[1]: [log_table(50, 3)],
        DATES[2]: [log_table(30, 4)],
        DATES[3]: [log_table(20, 5)],
    })


FIELDS: list[Any] = [
    {"name": "user_id", "vocab_mode": "hashed", "buckets": 64},
    "item",
    {"name": "hist", "kind": "sequence", "max_len": 3, "keep": "last"},
    {"name": "tags", "kind": "sequence", "max_len": 2, "vocab_mode": "hashed", "buckets": 16},
    {"name": "price", "kind": "numeric", "bucketing": {"boundaries": [1, 5, 20]}},
]
SPEC: dict[str, Any] = dict(
    label="click", group="user_id", fields=FIELDS,
    train_dates=[f"{DATES[0]}..{DATES[1]}"], valid_dates=[DATES[2]], test_dates=DATES[3],
)


def _split(out: Path, m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / p.path) for p in m.splits[split].parts])


def test_prepare_logs(tmp_path: Path) -> None:
    logs = default_logs(tmp_path / "logs")
    out = tmp_path / "ds"
    m = prepare_parquet_logs(str(logs), str(out), min_count=2, **SPEC)
    assert {s: i.rows for s, i in m.splits.items()} == {"train": 115, "valid": 30, "test": 20}
    assert m.label == "click" and m.group == "user_id"
    kinds = {f.name: (f.kind, f.vocab_mode, f.vocab_size, f.max_len) for f in m.fields}
    assert kinds["user_id"] == ("categorical", "hashed", 65, None)
    assert kinds["tags"] == ("sequence", "hashed", 17, 2)
    assert kinds["item"] == ("categorical", "counted", 14, None)  # item0..item11 + PAD + OOV
    assert kinds["price"][:2] == ("categorical", "counted")
    assert m.spec["train_dates"] == DATES[:2] and m.spec["vocab"]["user_id"]["buckets"] == 64
    assert check_dataset(str(out)).ok

    raw = pa.concat_tables([log_table(40, 1), log_table(25, 2), log_table(50, 3)])  # train, in order
    train = _split(out, m, "train")
    assert train.column("click").to_pylist() == [float(x) for x in raw.column("click").to_pylist()]
    user_ids = train.column("user_id").to_numpy()
    assert (user_ids == hash_ids(raw.column("user_id"), 64)).all()
    assert (train.column("_group").to_numpy() == stable_hash(raw.column("user_id")).view(np.int64)).all()
    # sequences: at most max_len items, the last ones (keep: last), empty items dropped
    for got, want in zip(train.column("hist").to_pylist()[:30], raw.column("hist").to_pylist()[:30]):
        assert len(got) == min(3, len(want)) and 0 not in got
    tags = train.column("tags").to_pylist()
    for got, want in zip(tags, raw.column("tags").to_pylist()):
        items = [t for t in want.split("|") if t][:2]
        assert got == hash_ids(pa.array(items, pa.string()), 16).tolist()
    # numeric: 4 buckets (0..3) seen in train + missing -> OOV
    price = train.column("price").to_numpy()
    oov = kinds["price"][2] - 1
    assert kinds["price"][2] == 6 and ((price == oov) == np.isnan(raw.column("price").to_numpy(zero_copy_only=False))).all()


def test_cli_spec_file_with_yaml_dates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logs = default_logs(tmp_path / "logs")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "label: click\ngroup: user_id\nmin_count: 1\nvocab_mode: hashed\nbuckets: 1000\n"
        "fields: [user_id, item, {name: hist, kind: sequence, max_len: 4}]\n"
        "train_dates: [2026-11-24..2026-11-24, 2026-11-25]\nvalid_dates: [2026-11-26]\n"
    )
    out = tmp_path / "ds"
    argv = ["prepare", "parquet-logs", "--input", str(logs), "--out", str(out), "--spec", str(spec)]
    assert main(argv + ["--set", "field_options={item: {vocab_mode: counted}}"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["splits"]) == ["train", "valid"]  # no test_dates: no test split
    assert m["spec"]["train_dates"] == ["2026-11-24", "2026-11-25"] and m["splits"]["train"]["rows"] == 115
    assert [(f["name"], f["vocab_mode"]) for f in m["fields"]] == [("user_id", "hashed"), ("item", "counted"), ("hist", "hashed")]
    assert main(["check", str(out), "--quiet"]) == 0
    assert main(["prepare", "parquet-logs", "--input", str(logs), "--out", str(tmp_path / "x"), "--set", "label=click"]) == 2
    assert "needs fields, train_dates" in capsys.readouterr().err


# ---- bad inputs ---------------------------------------------------------------------------------


def _fails(tmp_path: Path, logs: Path, match: str, **overrides: Any) -> str:
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=match) as info:
        prepare_parquet_logs(str(logs), str(out), **{**SPEC, **overrides})
    assert no_manifest_no_staging(out)
    return str(info.value)


def test_missing_column_in_a_partition(tmp_path: Path) -> None:
    logs = default_logs(tmp_path / "logs")
    write_logs(logs, {DATES[2]: [log_table(30, 4).drop_columns(["item"])]})
    msg = _fails(tmp_path, logs, "missing column 'item'")
    assert f"dt={DATES[2]}/part-00000.parquet" in msg and f"partition dt={DATES[2]}" in msg


def test_schema_drift_between_partitions(tmp_path: Path) -> None:
    logs = default_logs(tmp_path / "logs")
    drifted = log_table(20, 5)
    drifted = drifted.set_column(drifted.schema.get_field_index("price"), "price", pa.array([str(x) for x in range(20)]))
    write_logs(logs, {DATES[3]: [drifted]})
    msg = _fails(tmp_path, logs, "schema drift")
    assert f"dt={DATES[3]}/part-00000.parquet" in msg and "'price' has type string" in msg and "double" in msg
    # integer widths are not drift: user_id as int32 in one partition is fine
    narrow = log_table(20, 5)
    narrow = narrow.set_column(narrow.schema.get_field_index("user_id"), "user_id", narrow.column("user_id").cast(pa.int32()))
    write_logs(logs, {DATES[3]: [narrow]})
    assert prepare_parquet_logs(str(logs), str(tmp_path / "ok"), **SPEC).splits["test"].rows == 20


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    logs = default_logs(tmp_path / "logs")
    victim = logs / f"dt={DATES[1]}" / "part-00000.parquet"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    msg = _fails(tmp_path, logs, "not a readable Parquet file")
    assert f"dt={DATES[1]}/part-00000.parquet" in msg and "truncated" in msg
    # footer intact, a data page garbled: found while streaming, named with its row group
    victim.write_bytes(data)
    meta = pq.ParquetFile(victim).metadata
    col = meta.row_group(1).column(meta.schema.names.index("click"))
    start = col.dictionary_page_offset or col.data_page_offset
    garbled = bytearray(data)
    garbled[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    victim.write_bytes(bytes(garbled))
    msg = _fails(tmp_path, logs, "row group 1: cannot read")
    assert f"dt={DATES[1]}/part-00000.parquet" in msg


def test_empty_partition(tmp_path: Path) -> None:
    logs = default_logs(tmp_path / "logs")
    (logs / f"dt={DATES[2]}" / "part-00000.parquet").unlink()  # only _SUCCESS left
    msg = _fails(tmp_path, logs, "is empty: no data files")
    assert f"partition dt={DATES[2]}" in msg
    write_logs(logs, {DATES[2]: [log_table(30, 4).slice(0, 0)]})  # a file with the schema and no rows
    _fails(tmp_path, logs, rf"partition dt={DATES[2]} .* is empty: its 1 file\(s\) hold no rows")


@pytest.mark.parametrize("bad", [2, -1])
def test_label_outside_0_1(tmp_path: Path, bad: int) -> None:
    logs = default_logs(tmp_path / "logs")
    labels = np.zeros(30, dtype=np.int64)
    labels[21] = bad
    write_logs(logs, {DATES[2]: [log_table(30, 4, label=labels)]})  # valid split: found while writing
    msg = _fails(tmp_path, logs, "expected 0 or 1")
    assert f"dt={DATES[2]}/part-00000.parquet row group 1" in msg and f"'click' = {bad}" in msg and "row 5" in msg


def test_null_label_and_bad_dates(tmp_path: Path) -> None:
    logs = default_logs(tmp_path / "logs")
    table = log_table(30, 4)
    table = table.set_column(0, "click", pa.array([None] + [1] * 29, pa.int8()))
    write_logs(logs, {DATES[2]: [table]})
    _fails(tmp_path, logs, r"row group 0: column 'click' = None .*expected 0 or 1")
    _fails(tmp_path, logs, "no partition dt=2026-12-01", valid_dates=["2026-12-01"])
    _fails(tmp_path, logs, "in both train_dates and valid_dates", valid_dates=[DATES[1]])
    _fails(tmp_path, logs, "matches no dt=", test_dates=["2027-01-01..2027-02-01"])
    _fails(tmp_path, logs, "needs bucketing", fields=[{"name": "price", "kind": "numeric"}])
    _fails(tmp_path, logs, r"'item' has type dictionary<values=string.*numeric column needs", fields=[{"name": "item", "kind": "numeric", "bucketing": "criteo"}])
    with pytest.raises(DataError, match="not found or not a folder"):
        prepare_parquet_logs(str(tmp_path / "nope"), str(tmp_path / "ds"), **SPEC)
