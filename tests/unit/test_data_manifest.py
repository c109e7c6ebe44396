"""Manifest JSON round trip, validation, and credential redaction in messages."""

from __future__ import annotations

import pytest

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import FieldSpec, Manifest, PartInfo, SplitInfo
from tf4ctr_dist.data.storage import display_url, redact, resolve


def _manifest() -> Manifest:
    return Manifest(
        fields=[FieldSpec("a", "categorical", 10), FieldSpec("s", "sequence", 20, max_len=3)],
        label="label",
        group="a",
        splits={"train": SplitInfo(5, [PartInfo("train/part-00000.parquet", 5, [3, 2], "ab" * 32)])},
        spec={"format": "x"},
        created_by="test",
    )


def test_json_round_trip() -> None:
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert list(m.to_dict())[0] == "format_version"
    assert m.column_names() == ["label", "a", "s", "_group"]
    assert str(m.arrow_schema().field("s").type) == "list<item: int64>"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("label"), "missing key 'label'"),
        (lambda d: d["fields"][0].update(kind="dense"), r"fields\[0\] \(a\): kind"),
        (lambda d: d["fields"][0].update(vocab_size=1), "vocab_size should be >= 2"),
        (lambda d: d["fields"][1].update(max_len=None), "needs max_len"),
        (lambda d: d["fields"][1].update(max_len=True), r"needs max_len >= 1, got True"),
        (lambda d: d["fields"][1].update(name="a"), "duplicate column names"),
        (lambda d: d["splits"]["train"].update(rows=6), r"splits.train: rows 6 != sum over parts 5"),
        (lambda d: d["splits"]["train"]["parts"][0].update(row_groups=[3, 0]), "positive row counts"),
        (lambda d: d.update(format_version=99), "format_version 99 not supported"),
    ],
)
def test_validation_errors(edit, message: str) -> None:
    data = _manifest().to_dict()
    edit(data)
    with pytest.raises(DataError, match=message):
        Manifest.from_dict(data, source="s3://b/ds/manifest.json")


def test_redaction() -> None:
    options = {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "client_kwargs": {"aws_session_token": "tok-123"}}
    text = "failed with AKIAEXAMPLE / s3cr3t-value / tok-123 at s3://user:pw@bucket/x"
    clean = redact(text, options)
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "tok-123", "user:pw"):
        assert secret not in clean
    assert display_url("s3://user:pw@bucket/x") == "s3://bucket/x"
    with pytest.raises(DataError, match="bad URL"):
        resolve("", options)
