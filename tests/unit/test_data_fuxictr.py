"""A FuxiCTR dataset_config YAML (Frappe_x1's, in FuxiCTR's own layout) prepares the same
dataset as the native bars-csv spec; keys this system does not support are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_tools.bars_csv import prepare_bars_csv
from data_tools.cli import main as data_main
from data_tools.fuxictr import prepare_fuxictr
from data_tools.options import OptionError
from tests.data_helpers import no_manifest_no_staging, write_csv
from tf4ctr_dist.data.manifest import load_manifest

FRAPPE = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]

# Frappe_x1 as FuxiCTR's config/dataset_config.yaml describes it (one flow-style column entry
# with a list of names), plus a second dataset id in the same file.
FUXICTR_YAML = """\
frappe_x1:
    data_format: csv
    data_root: ./data/
    feature_cols:
    - {active: true, dtype: float, name: [user, item, daytime, weekday, isweekend, homework, cost, weather, country, city], type: categorical}
    label_col: {dtype: float, name: label}
    min_categr_count: 2
    test_data: ./frappe/test.csv
    train_data: ./frappe/train.csv
    valid_data: ./frappe/valid.csv

other_x1:
    data_format: csv
    feature_cols:
    - {active: true, dtype: str, name: user, type: categorical}
    label_col: {dtype: float, name: label}
    test_data: ./frappe/test.csv
    train_data: ./frappe/train.csv
    valid_data: ./frappe/valid.csv
"""


def _frappe(tmp: Path) -> tuple[str, str, str]:
    rng = np.random.default_rng(5)

    def rows(n: int) -> list[str]:
        return [",".join([str(rng.integers(0, 2)), *(str(rng.integers(0, 6) + 10 * k) for k in range(len(FRAPPE)))])
                for _ in range(n)]

    header = ",".join(["label", *FRAPPE])
    return tuple(write_csv(tmp / "frappe" / f"{s}.csv", header, rows(n))  # type: ignore[return-value]
                 for s, n in (("train", 300), ("valid", 60), ("test", 60)))


def _vocab_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if "vocab" in p.as_posix() and p.is_file()}


def test_frappe_fuxictr_config_matches_native_spec(tmp_path: Path) -> None:
    files = _frappe(tmp_path)
    config = tmp_path / "dataset_config.yaml"
    config.write_text(FUXICTR_YAML)
    native = prepare_bars_csv(*files, str(tmp_path / "native"), min_count=2, group_col="user")
    fux = prepare_fuxictr(str(config), str(tmp_path / "fux"), dataset_id="frappe_x1", group_col="user")
    assert [(f.name, f.kind, f.vocab_size) for f in fux.fields] == [(f.name, f.kind, f.vocab_size) for f in native.fields]
    assert [f.name for f in fux.fields] == FRAPPE
    # min count 2 applied: some token of 6 per field could fall below; vocab < 6 + 2 somewhere would show it
    assert all(f.vocab_size <= 6 + 2 for f in fux.fields)
    assert {s: fux.splits[s].rows for s in fux.splits} == {"train": 300, "valid": 60, "test": 60}
    assert fux.label == native.label == "label" and fux.group == native.group
    assert _vocab_files(tmp_path / "fux") == _vocab_files(tmp_path / "native") and _vocab_files(tmp_path / "fux")
    for split in ("train", "valid", "test"):
        a = pq.read_table(tmp_path / "fux" / fux.splits[split].parts[0].path)
        b = pq.read_table(tmp_path / "native" / native.splits[split].parts[0].path)
        assert a.equals(b), split
    # through the CLI as well: tf4ctr prepare fuxictr --input dataset_config.yaml dataset_id=...
    assert data_main(["prepare", "fuxictr", "--input", str(config), "--out", str(tmp_path / "cli"), "dataset_id=frappe_x1"]) == 0
    cli = load_manifest(str(tmp_path / "cli"))
    assert [(f.name, f.vocab_size) for f in cli.fields] == [(f.name, f.vocab_size) for f in native.fields]


def test_several_datasets_need_an_id(tmp_path: Path) -> None:
    _frappe(tmp_path)
    (tmp_path / "c.yaml").write_text(FUXICTR_YAML)
    with pytest.raises(OptionError, match=r"holds datasets \['frappe_x1', 'other_x1'\]; choose one with dataset_id"):
        prepare_fuxictr(str(tmp_path / "c.yaml"), str(tmp_path / "ds"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (("type: categorical}", "type: categorical, embedding_dim: 16}"), r"frappe_x1\.feature_cols\[0\]\.embedding_dim: not supported"),
        (("    min_categr_count: 2\n", "    min_categr_count: 2\n    rebuild_dataset: true\n"), r"frappe_x1\.rebuild_dataset: not supported"),
        (("{dtype: float, name: label}", "{dtype: float, name: label, threshold: 3}"), r"frappe_x1\.label_col\.threshold: not supported"),
        (("type: categorical}", "type: numeric, normalizer: RobustScaler}"),
         r"feature_cols\[0\]\.normalizer: expected StandardScaler or MinMaxScaler \(or none\), got 'RobustScaler'"),
        (("type: categorical}", "type: categorical, normalizer: MinMaxScaler}"), r"feature_cols\[0\]\.normalizer: only for type numeric"),
        (("type: categorical}", "type: sequence, max_len: 3}"), r"feature_cols\[0\]: a sequence column needs splitter"),
        (("data_format: csv", "data_format: h5"), r"frappe_x1\.data_format: only csv"),
    ],
)
def test_unsupported_keys_refused_by_name(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    _frappe(tmp_path)
    text = FUXICTR_YAML.replace(*edit, 1)
    assert text != FUXICTR_YAML
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(OptionError, match=message):
        prepare_fuxictr(str(tmp_path / "c.yaml"), str(tmp_path / "ds"), dataset_id="frappe_x1")
    no_manifest_no_staging(tmp_path / "ds")
    assert data_main(["prepare", "fuxictr", "--input", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "ds"),
                      "dataset_id=frappe_x1"]) == 2


def test_sequence_preprocess_and_copy_from(tmp_path: Path) -> None:
    header = "label,user,hour,tags,isrc"
    rows = ["1,u1,14102100,a^b^c^d,TWA530887303", "0,u2,14102523,b,USX1", "1,u1,14102600,,GBAB"]
    files = [write_csv(tmp_path / f"{s}.csv", header, rows) for s in ("train", "valid", "test")]
    config = tmp_path / "d.yaml"
    config.write_text(json.dumps({"t": {
        "feature_cols": [
            {"name": "user", "type": "categorical", "dtype": "str"},
            {"name": "hour", "type": "categorical", "preprocess": "convert_hour"},
            {"name": "weekday", "type": "categorical", "preprocess": "convert_weekday"},
            {"name": "user2", "type": "categorical", "preprocess": "copy_from(user)"},
            {"name": "tags", "type": "sequence", "splitter": "^", "max_len": 2},
            {"name": "isrc", "type": "categorical", "preprocess": "extract_country_code"},
            {"name": "unused", "active": False, "type": "categorical"},
        ],
        "label_col": {"name": "label", "dtype": "float"},
        "train_data": "train.csv", "valid_data": "valid.csv", "test_data": "test.csv",
    }}))
    m = prepare_fuxictr(str(config), str(tmp_path / "ds"))
    assert [(f.name, f.kind) for f in m.fields] == [
        ("user", "categorical"), ("hour", "categorical"), ("weekday", "categorical"), ("user2", "categorical"),
        ("tags", "sequence"), ("isrc", "categorical")]
    t = pq.read_table(tmp_path / "ds" / m.splits["train"].parts[0].path)
    assert t.column("user2").to_pylist() == t.column("user").to_pylist()
    # tags truncated to the first 2 items (FuxiCTR keeps the head): a, b -> ids 1, 2
    assert t.column("tags").to_pylist() == [[1, 2], [2], []]
    # hours 00, 23, 00 -> two tokens; 2014-10-21 Tue, 10-25 Sat, 10-26 Sun -> three weekdays
    assert len(set(t.column("hour").to_pylist())) == 2 and len(set(t.column("weekday").to_pylist())) == 3
    # isrc -> country: TW, US, GB
    assert len(set(t.column("isrc").to_pylist())) == 3


def test_numeric_columns_embedded_as_value_x_vector(tmp_path: Path) -> None:
    """FuxiCTR's numeric type with its normalizer names -> this system's value x vector fields."""
    header = "label,user,price,age,n"
    rows = [f"{i % 2},u{i % 3},{i * 1.5},{'' if i == 4 else 20 + i},{i % 4}" for i in range(12)]
    files = [write_csv(tmp_path / f"{s}.csv", header, rows) for s in ("train", "valid", "test")]
    config = tmp_path / "d.yaml"
    config.write_text(json.dumps({"t": {
        "feature_cols": [
            {"name": "user", "type": "categorical"},
            {"name": "price", "type": "numeric", "dtype": "float", "normalizer": "MinMaxScaler"},
            {"name": ["age", "n"], "type": "numeric", "dtype": "float", "normalizer": "StandardScaler"},
        ],
        "label_col": {"name": "label", "dtype": "float"}, "min_categr_count": 1,
        "train_data": "train.csv", "valid_data": "valid.csv", "test_data": "test.csv",
    }}))
    m = prepare_fuxictr(str(config), str(tmp_path / "ds"))
    assert [(f.name, f.kind, f.vocab_size) for f in m.fields] == [
        ("user", "categorical", 5), ("price", "numeric", 1), ("age", "numeric", 1), ("n", "numeric", 1)]
    vocab = m.spec["vocab"]
    assert (vocab["price"]["normalizer"], vocab["price"]["shift"], vocab["price"]["divisor"]) == ("min_max", 0.0, 16.5)
    ages = np.array([20 + i for i in range(12) if i != 4], dtype=float)
    assert vocab["age"]["normalizer"] == "standard"
    assert (vocab["age"]["shift"], vocab["age"]["divisor"]) == pytest.approx((ages.mean(), ages.std()), rel=1e-12)
    t = pq.read_table(tmp_path / "ds" / m.splits["train"].parts[0].path)
    assert t.column("price").to_pylist()[:3] == pytest.approx([0.0, 1.5 / 16.5, 3 / 16.5])
    assert t.column("age").to_pylist()[4] is None
