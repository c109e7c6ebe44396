"""Every path a manifest names stays inside the dataset root: `check`, the manifest loader used
by training and the reader all refuse a dataset that points elsewhere, before opening it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_tools.check import check_dataset
from data_tools.synthetic import generate_synthetic
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import Manifest, PartInfo, SplitInfo, load_manifest
from tf4ctr_dist.data.reader import ParquetSplitReader


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset and, next to it, a foreign Parquet file with a known checksum."""
    out = tmp_path / "ds"
    generate_synthetic(str(out), rows=300, fields=3, vocab_sizes=[7, 30, 100], seed=1, row_group_rows=50, row_groups_per_part=2)
    foreign = tmp_path / "secret" / "part.parquet"
    foreign.parent.mkdir()
    shutil.copy(out / "train" / "part-00000.parquet", foreign)
    return out, foreign


def _point_first_part_at(out: Path, path: str) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["parts"][0]["path"] = path  # sha256 still matches: a copy
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "url", "other-bucket", "dot"])
def test_a_part_outside_the_root_is_refused(dataset, kind: str) -> None:
    out, foreign = dataset
    path = {
        "absolute": str(foreign),
        "dotdot": "../secret/part.parquet",
        "url": f"file://{foreign}",
        "other-bucket": "s3://other-bucket/secret/part.parquet",
        "dot": "train/./../../secret/part.parquet",
    }[kind]
    _point_first_part_at(out, path)
    report = check_dataset(str(out))
    assert not report.ok and "leaves the dataset root" in " ".join(report.problems)
    assert "splits.train.parts[0]" in " ".join(report.problems)
    with pytest.raises(DataError, match=r"splits.train.parts\[0\].*leaves the dataset root"):
        load_manifest(str(out))  # what training calls first


def test_a_vocabulary_file_outside_the_root_is_refused(dataset) -> None:
    out, foreign = dataset
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["spec"]["vocab"] = {"f0": {"file": {"path": "../secret/part.parquet", "sha256": "0" * 64, "rows": 1}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"spec.vocab.f0.file.*leaves the dataset root"):
        load_manifest(str(out))


def test_the_reader_refuses_even_a_hand_built_manifest(dataset) -> None:
    out, foreign = dataset
    good = load_manifest(str(out))
    train = good.splits["train"]
    part = train.parts[0]
    evil = Manifest(good.fields, good.label, good.group,
                    {**good.splits, "train": SplitInfo(train.rows, [PartInfo(str(foreign), part.rows, part.row_groups, part.sha256), *train.parts[1:]])})
    with ParquetSplitReader(str(out), "train", manifest=evil, rank=0, world_size=1, local_batch_size=64, shuffle=False) as reader:
        with pytest.raises(DataError, match="refusing path"):
            next(iter(reader.iter_epoch(0)))
