"""Training verifies checksums while it reads: a swapped or edited part fails with a DataError
naming the part (per row group from the manifest's spans; whole-part sha256 for older manifests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_tools.synthetic import generate_synthetic
from tests.data_helpers import read_split
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import load_manifest


@pytest.fixture()
def ds(tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    generate_synthetic(str(out), rows=600, fields=3, vocab_sizes=[7, 30, 100], seed=5, row_group_rows=40, row_groups_per_part=3)
    return out


def _read(out: Path) -> None:
    m = load_manifest(str(out))
    for split in m.splits:
        read_split(str(out), m, split, world_size=2, batch_size=32, shuffle=True)


def _drop_spans(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    for info in manifest["splits"].values():
        for part in info["parts"]:
            part.pop("spans", None)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_the_manifest_records_row_group_spans(ds: Path) -> None:
    part = load_manifest(str(ds)).splits["train"].parts[0]
    assert len(part.spans) == len(part.row_groups) + 1
    assert part.spans[-1][0] == (ds / part.path).stat().st_size
    _read(ds)  # a clean dataset reads


@pytest.mark.parametrize("legacy", [False, True])
def test_swapped_parts_fail_by_name(ds: Path, legacy: bool) -> None:
    if legacy:
        _drop_spans(ds)
    a, b = ds / "train" / "part-00000.parquet", ds / "train" / "part-00001.parquet"
    tmp = ds / "swap"
    shutil.move(a, tmp)
    shutil.move(b, a)
    shutil.move(tmp, b)
    with pytest.raises(DataError, match=r"train/part-0000[01]\.parquet.*(does not match its sha256|sha256 does not match)"):
        _read(ds)


@pytest.mark.parametrize("legacy", [False, True])
def test_an_edited_value_fails_by_name(ds: Path, legacy: bool) -> None:
    """One label flipped in place, the Parquet still valid: only a checksum can tell."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if legacy:
        _drop_spans(ds)
    part = ds / "valid" / "part-00000.parquet"
    table = pq.read_table(part)
    label = table.schema.names[0]
    flipped = pc.subtract(1.0, table.column(label).cast("float64")).cast(table.schema.field(label).type)
    table = table.set_column(0, table.schema.field(0), flipped)
    pq.write_table(table, part, row_group_size=40, compression="snappy")
    with pytest.raises(DataError, match=r"valid/part-00000\.parquet.*(does not match its sha256|sha256 does not match)"):
        _read(ds)
