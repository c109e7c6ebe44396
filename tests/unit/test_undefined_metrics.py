"""Undefined metrics are never silent: one-class or empty splits are refused before training,
NaN is never a monitor value, and the run files are strict JSON."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from data_tools.writer import DatasetWriter
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import FieldSpec, load_manifest
from tf4ctr_dist.data.validate import check_label_classes
from tf4ctr_dist.train.resume import EarlyStopping
from tf4ctr_dist.train.runfiles import RunDir


def _dataset(out, labels: dict[str, list[float]]) -> str:
    fields = [FieldSpec("a", "categorical", 10)]
    with DatasetWriter(str(out), fields=fields, label="y", group=None, row_group_rows=4) as w:
        for split, ys in labels.items():
            n = len(ys)
            w.split(split).write(pa.table({"y": pa.array(ys, pa.float32()), "a": pa.array([1 + i % 8 for i in range(n)], pa.int64()),
                                           "_group": pa.array([0] * n, pa.int64())}))
        w.commit({}, "test")
    return str(out)


MIXED = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # the first row group has one class only


@pytest.mark.parametrize("bad_split, ys, why", [
    ("valid", [1.0] * 8, "all 8 rows have label 1; AUC is undefined"),
    ("test", [0.0] * 8, "all 8 rows have label 0; AUC is undefined"),
    ("train", [0.0] * 12, "training learns nothing"),
    ("valid", [], "is empty"),
])
def test_one_class_or_empty_splits_are_refused_by_name(tmp_path, bad_split, ys, why):
    labels = {"train": MIXED, "valid": MIXED, "test": MIXED, bad_split: ys}
    url = _dataset(tmp_path / "ds", labels)
    manifest = load_manifest(url)
    with pytest.raises(DataError, match=f"split '{bad_split}'.*{why}"):
        check_label_classes(url, manifest, ["train", "valid", "test"])


def test_mixed_splits_pass(tmp_path):
    url = _dataset(tmp_path / "ds", {"train": MIXED, "valid": MIXED, "test": MIXED})
    check_label_classes(url, load_manifest(url), ["train", "valid", "test"])


def test_nan_is_never_a_monitor_value():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(0.7, 0)
    with pytest.raises(ValueError, match="score is nan after epoch 2"):
        stopper.update(math.nan, 1)
    assert stopper.bad_epochs == 0 and stopper.best == 0.7


def test_run_files_are_strict_json(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_json("result.json", {"valid": {"AUC": math.nan, "logloss": 0.5}, "test": [math.inf]})
    run.append_jsonl("metrics.jsonl", {"valid": {"AUC": math.nan}})

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    assert strict((tmp_path / "result.json").read_text()) == {"valid": {"AUC": None, "logloss": 0.5}, "test": [None]}
    assert strict((tmp_path / "metrics.jsonl").read_text()) == {"valid": {"AUC": None}}
