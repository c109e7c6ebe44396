"""Small helpers shared by the data tests (no fixtures here: see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tf4ctr_dist.data.batch import Batch
from tf4ctr_dist.data.manifest import Manifest
from tf4ctr_dist.data.reader import ParquetSplitReader

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FRAPPE = SHARED_DATA / "frappe"
CRITEO_SAMPLE = SHARED_DATA / "samples" / "criteo_sample.txt"


def frappe_files() -> tuple[str, str, str]:
    """The real Frappe CSVs, or skip (they are not part of the repository)."""
    files = tuple(str(FRAPPE / f"{split}.csv") for split in ("train", "valid", "test"))
    if not all(Path(f).is_file() for f in files):
        pytest.skip(f"real Frappe data not found at {FRAPPE} (read-only shared data, not in the repo)")
    return files  # type: ignore[return-value]


def write_csv(path: Path, header: str, rows: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def tiny_bars(tmp: Path) -> tuple[str, str, str]:
    """Three small BARS-style CSVs: a, b categorical; u a user id; labels 0/1."""
    header = "label,a,b,u"
    train = [f"{i % 2},a{i % 3},b{i % 5},u{i % 4}" for i in range(60)] + ["1,rare,b0,u0", "0,,b1,u1"]
    valid = [f"{i % 2},a{i % 3},b{i % 5},u{i % 4}" for i in range(17)] + ["1,only_in_valid,b0,u9"]
    test = [f"{(i + 1) % 2},a{i % 3},b{i % 7},u{i % 4}" for i in range(23)]
    return (
        write_csv(tmp / "train.csv", header, train),
        write_csv(tmp / "valid.csv", header, valid),
        write_csv(tmp / "test.csv", header, test),
    )


def read_split(
    url: str,
    manifest: Manifest,
    split: str,
    *,
    world_size: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    storage_options: dict | None = None,
    shuffle_buffer_row_groups: int = 2,
) -> list[list[Batch]]:
    """All batches of one epoch, per simulated rank."""
    out = []
    for rank in range(world_size):
        with ParquetSplitReader(
            url,
            split,
            manifest=manifest,
            rank=rank,
            world_size=world_size,
            local_batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            storage_options=storage_options,
            shuffle_buffer_row_groups=shuffle_buffer_row_groups,
        ) as reader:
            out.append(list(reader.iter_epoch(epoch)))
    return out


def valid_sample_ids(batches: list[Batch]) -> np.ndarray:
    ids = [b.sample_ids.numpy()[b.valid.numpy() == 1] for b in batches]
    return np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)


def no_manifest_no_staging(out: Path) -> bool:
    """True when `out` holds no dataset and no leftover staging folder."""
    if not out.exists():
        return True
    names = [p.name for p in out.iterdir()]
    return "manifest.json" not in names and not any(n.startswith(".staging-") for n in names)
