"""`prepare` of numeric fields embedded as value x vector: normalised float columns with exact
train statistics, the same bytes however the input is cut, clear errors; and serving's mapping
of raw values to the stored weights."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_tools.bars_csv import prepare_bars_csv
from data_tools.engine import LocalEngine
from data_tools.numeric import EXP_BIAS, NumericStats, exact_sum
from tests.data_helpers import write_csv
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import load_manifest
from tf4ctr_dist.serving.export import read_vocabularies
from tf4ctr_dist.serving.features import build_mappers


# ---- prepare -----------------------------------------------------------------------------------


def _csvs(tmp: Path, train: list[str], other: list[str] | None = None) -> tuple[str, str, str]:
    header = "label,c,x,m,r"
    other = other or train
    return tuple(write_csv(tmp / f"{s}.csv", header, rows) for s, rows in (("train", train), ("valid", other), ("test", other)))


def _rows(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = "" if i % 5 == 0 else f"{rng.normal(30, 7):.6f}"
        out.append(f"{i % 2},c{i % 3},{x},{rng.uniform(-50, 250):.4f},{rng.integers(-9, 9)}")
    return out


NUMERIC_FIELDS = ["c", {"name": "x", "kind": "numeric", "normalizer": "standard"},
                  {"name": "m", "kind": "numeric", "normalizer": "min_max"},
                  {"name": "r", "kind": "numeric", "normalizer": "none"}]


def _raw_values(path: str, column: str) -> np.ndarray:
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={column: pa.string()}))
    return np.array([float(v) if v else np.nan for v in table.column(column).to_pylist()])


def test_prepare_writes_normalised_float_columns_with_train_statistics(tmp_path: Path):
    files = _csvs(tmp_path, _rows(200, 0), _rows(60, 1))
    url = str(tmp_path / "ds")
    m = prepare_bars_csv(*files, url, fields=NUMERIC_FIELDS, row_group_rows=64)
    assert [(f.name, f.kind, f.vocab_size, f.vocab_mode) for f in m.fields] == [
        ("c", "categorical", 5, "counted"), ("x", "numeric", 1, "none"), ("m", "numeric", 1, "none"),
        ("r", "numeric", 1, "none")]
    assert load_manifest(url).numeric_fields == ["x", "m", "r"]
    train_x, train_m = _raw_values(files[0], "x"), _raw_values(files[0], "m")
    present = train_x[~np.isnan(train_x)]
    spec = m.spec["vocab"]
    assert spec["x"]["normalizer"] == "standard" and spec["x"]["train_stats"]["count"] == present.size == 160
    np.testing.assert_allclose([spec["x"]["shift"], spec["x"]["divisor"]], [present.mean(), present.std()], rtol=1e-12)
    np.testing.assert_allclose([spec["m"]["shift"], spec["m"]["divisor"]],
                               [train_m.min(), train_m.max() - train_m.min()], rtol=1e-12)
    assert (spec["r"]["shift"], spec["r"]["divisor"]) == (0.0, 1.0)
    for split, path in zip(("train", "test"), (files[0], files[2])):
        table = pa.concat_tables([pq.read_table(f"{url}/{p.path}") for p in m.splits[split].parts])
        assert table.schema.field("x").type == pa.float32()
        x = table.column("x").to_numpy(zero_copy_only=False)  # null -> NaN
        raw_x = _raw_values(path, "x")
        np.testing.assert_array_equal(np.isnan(x), np.isnan(raw_x))  # missing stays missing
        # the test split is scaled with the train statistics, not its own
        np.testing.assert_allclose(x, (raw_x - present.mean()) / present.std(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(table.column("m").to_numpy(), (_raw_values(path, "m") - train_m.min())
                                   / (train_m.max() - train_m.min()), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(table.column("r").to_numpy(), _raw_values(path, "r").astype(np.float32))



@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity"])
def test_prepare_refuses_a_non_finite_value_naming_file_line_and_column(tmp_path: Path, bad: str):
    rows = _rows(20, 2)
    rows[7] = f"1,c1,{bad},1.0,2"
    files = _csvs(tmp_path, rows, _rows(5, 3))
    with pytest.raises(DataError, match=rf"train\.csv: line 9: column 'x' = .*; a numeric field embedded as value x vector needs finite"):
        prepare_bars_csv(*files, str(tmp_path / "ds"), fields=NUMERIC_FIELDS)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "kind": "numeric", "normalizer": "log"}, r"normalizer should be one of \['none', 'min_max', 'standard'\]"),
    ({"name": "x", "kind": "numeric", "normalizer": "standard", "bucketing": "criteo"}, r"not both"),
    ({"name": "x", "kind": "numeric", "normalizer": "standard", "min_count": 2}, r"min_count does not apply"),
    ({"name": "x", "kind": "numeric"}, r"needs bucketing: criteo .* or normalizer: none \| min_max \| standard"),
    ({"name": "c", "normalizer": "standard"}, r"normalizer applies to numeric fields only"),
])
def test_field_settings_of_numeric_fields_are_checked(tmp_path: Path, entry, message):
    files = _csvs(tmp_path, _rows(10, 4))
    with pytest.raises(DataError, match=message):
        prepare_bars_csv(*files, str(tmp_path / "ds"), fields=["c", entry, "m", "r"])


# ---- exact statistics -----------------------------------------------------------------------


def test_exact_sum_is_exact_and_statistics_do_not_depend_on_the_chunking():
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.normal(0, 1, 500) * 10.0 ** rng.integers(-30, 30, 500), [5e-324, -1e-310, 0.0, 1e140]])
    assert Fraction(exact_sum(values), 1 << EXP_BIAS) == sum(Fraction(v) for v in values)
    whole = NumericStats.of(values)
    for seed in range(3):  # any cut and merge order gives the identical statistics
        order = np.random.default_rng(seed).permutation(values.size)
        cuts = np.sort(np.random.default_rng(seed).choice(values.size, 6, replace=False))
        parts = [NumericStats.of(values[order][a:b]) for a, b in zip([0, *cuts], [*cuts, values.size])]
        merged = NumericStats()
        for part in reversed(parts):
            merged = merged + part
        assert merged == whole
    assert NumericStats.from_json(whole.to_json()) == whole
    normal = rng.normal(30, 7, 1000)
    stats = NumericStats.of(normal)
    assert stats.mean == pytest.approx(normal.mean(), rel=1e-14)
    assert stats.std == pytest.approx(normal.std(), rel=1e-12)
    assert math.isclose(stats.std, float(np.std(normal.astype(np.longdouble))), rel_tol=1e-14)


class _ShardedTables(LocalEngine):
    """The Ray engine's way through the pipeline (whole-shard tables, input cut into ~300-byte
    shards) without Ray: per-shard statistics travel as count_shard's STATS_FIELD rows."""

    streams = False
    shard_bytes = 300


def test_dataset_does_not_depend_on_how_the_input_is_cut(tmp_path: Path):
    files = _csvs(tmp_path, _rows(300, 5), _rows(40, 6))
    prepare_bars_csv(*files, str(tmp_path / "stream"), fields=NUMERIC_FIELDS, row_group_rows=50)
    prepare_bars_csv(*files, str(tmp_path / "shards"), fields=NUMERIC_FIELDS, row_group_rows=50, engine=_ShardedTables())
    a, b = tmp_path / "stream", tmp_path / "shards"
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
    parts = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert parts and parts == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    for rel in parts:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_parquet_logs_numeric_value_fields(tmp_path: Path):
    from data_tools.parquet_logs import prepare_parquet_logs
    from tests.unit.test_data_parquet_logs import DATES, SPEC, default_logs, log_table, write_logs

    logs = default_logs(tmp_path / "logs")
    fields = ["item", {"name": "price", "kind": "numeric", "normalizer": "min_max"}]
    m = prepare_parquet_logs(str(logs), str(tmp_path / "ds"), **{**SPEC, "fields": fields})
    assert [(f.name, f.kind) for f in m.fields] == [("item", "categorical"), ("price", "numeric")]
    raw = pa.concat_tables([log_table(40, 1), log_table(25, 2), log_table(50, 3)]).column("price")  # train, nulls
    values = raw.to_numpy(zero_copy_only=False)
    lo, hi = np.nanmin(values), np.nanmax(values)
    assert (m.spec["vocab"]["price"]["shift"], m.spec["vocab"]["price"]["divisor"]) == (lo, hi - lo)
    train = pa.concat_tables([pq.read_table(tmp_path / "ds" / p.path) for p in m.splits["train"].parts])
    np.testing.assert_allclose(train.column("price").to_numpy(zero_copy_only=False), (values - lo) / (hi - lo), rtol=1e-6)
    # a NaN value (not a null) is refused by file, row group and row
    bad = log_table(30, 4)
    price = bad.column("price").to_numpy(zero_copy_only=False).copy()
    missing = bad.column("price").is_null().to_numpy(zero_copy_only=False)
    price[20], missing[20] = np.nan, False
    write_logs(logs, {DATES[2]: [bad.set_column(5, "price", pa.array(price, mask=missing))]})
    with pytest.raises(DataError, match=rf"dt={DATES[2]}/part-00000\.parquet row group 1 \(row 4 of the row group\): column 'price' = nan"):
        prepare_parquet_logs(str(logs), str(tmp_path / "ds2"), **{**SPEC, "fields": fields})


def test_serving_maps_raw_values_to_the_stored_weights(tmp_path: Path):
    files = _csvs(tmp_path, _rows(100, 8), _rows(50, 9))
    url = str(tmp_path / "ds")
    m = prepare_bars_csv(*files, url, fields=NUMERIC_FIELDS)
    mappers = {mp.name: mp for mp in build_mappers([vars(f) for f in m.fields], m.spec, read_vocabularies(url, m))}
    test_table = pa.concat_tables([pq.read_table(f"{url}/{p.path}") for p in m.splits["test"].parts])
    raw = pacsv.read_csv(files[2], convert_options=pacsv.ConvertOptions(column_types={k: pa.string() for k in "cxmr"}))
    for name in ("x", "m", "r"):
        ids, lengths, weights = mappers[name].lookups(raw.column(name), weighted=True)
        stored = test_table.column(name).to_numpy(zero_copy_only=False)  # null -> NaN
        np.testing.assert_array_equal(lengths, ~np.isnan(stored))
        np.testing.assert_array_equal(weights, stored[~np.isnan(stored)])  # the same float32 bits
        assert (ids == 0).all()
    assert mappers["x"].lookups(pa.array([None, " ", "2"]), weighted=True)[1].tolist() == [0, 0, 1]
    # with value x vector fields in the model, id fields carry weight 1
    _, lengths, c_weights = mappers["c"].lookups(raw.column("c"), weighted=True)
    assert c_weights.tolist() == [1.0] * int(lengths.sum())
    assert mappers["c"].lookups(raw.column("c"), weighted=False)[2] is None
    with pytest.raises(DataError, match=r"field 'x': row 1 has the value nan"):
        mappers["x"].lookups(pa.array(["1.5", "nan"]), weighted=True)


def test_serving_batches_keep_the_weights():
    from tf4ctr_dist.serving.deploy import _concat

    a = KeyedJaggedTensor(keys=["c", "x"], values=torch.tensor([1, 0]), lengths=torch.tensor([1, 1], dtype=torch.int32),
                          weights=torch.tensor([1.0, 0.5]))
    b = KeyedJaggedTensor(keys=["c", "x"], values=torch.tensor([2, 3]), lengths=torch.tensor([2, 0], dtype=torch.int32),
                          weights=torch.tensor([1.0, 1.0]))
    joined = _concat([a, b]).to_dict()
    assert joined["x"].weights().tolist() == [0.5] and joined["x"].lengths().tolist() == [1, 0]
    assert joined["c"].values().tolist() == [1, 2, 3] and joined["c"].weights().tolist() == [1.0, 1.0, 1.0]
