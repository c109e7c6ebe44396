"""ParquetSplitReader batch tails: training mode (pad_tail=False) and eval mode (pad_tail=True).

Training: every rank runs exactly num_batches(epoch) steps (collectives stay in lock-step), no
padding rows (they would enter BatchNorm's statistics), no batch under 2 rows (BatchNorm cannot
train on one sample), every row of the split exactly once across ranks, and resuming at any
batch reproduces the uninterrupted epoch. Eval: every batch has exactly local_batch_size rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.synthetic import generate_synthetic
from tf4ctr_dist.data.reader import ParquetSplitReader

ROWS = (41, 61, 100)  # train rows of the three datasets
WORLD_SIZES = (1, 2, 3)
BATCH_SIZES = (4, 5, 10, 16)
EPOCH = 1


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    """{rows: (url, manifest, table)}: the whole split in train, row groups of 7 rows over parts
    of 3 row groups (batches cross row-group and file boundaries)."""
    out = {}
    for rows in ROWS:
        url = str(tmp_path_factory.mktemp("tail") / f"ds{rows}")
        manifest = generate_synthetic(url, rows=rows, fields=3, scale_vocab=0.002, seed=rows,
                                      split=(1.0, 0.0, 0.0), row_group_rows=7, row_groups_per_part=3)
        assert manifest.splits["train"].rows == rows
        table = pa.concat_tables([pq.read_table(f"{url}/{p.path}") for p in manifest.splits["train"].parts])
        out[rows] = (url, manifest, table)
    return out


def _reader(ds, rank: int, world: int, batch: int, *, shuffle: bool, pad_tail: bool) -> ParquetSplitReader:
    url, manifest, _ = ds
    return ParquetSplitReader(url, "train", manifest=manifest, rank=rank, world_size=world,
                              local_batch_size=batch, shuffle=shuffle, seed=11, pad_tail=pad_tail,
                              shuffle_buffer_row_groups=2)


def _share(rows: int, world: int, rank: int) -> int:
    return (rank + 1) * rows // world - rank * rows // world


def _fingerprint(batch) -> tuple:
    kjt = batch.sparse_features
    return (batch.sample_ids.tolist(), batch.labels.tolist(), batch.valid.tolist(),
            kjt.keys(), kjt.values().tolist(), kjt.lengths().tolist())


def _check_contents(batch, manifest, table: pa.Table) -> None:
    """Labels and ids are those of the rows named by sample_ids (no misaligned slicing)."""
    keep = batch.valid.numpy() == 1
    sid = batch.sample_ids.numpy()[keep]
    assert np.array_equal(batch.labels.numpy()[keep], table.column(manifest.label).to_numpy()[sid])
    names = [f.name for f in manifest.fields]
    want = np.concatenate([table.column(n).to_numpy()[sid] for n in names])  # KJT: field-major
    assert batch.sparse_features.values().numpy().tolist() == want.tolist()


def test_grid_covers_the_tail_edge_cases() -> None:
    """The parameter grid below contains both edge cases of pad_tail=False: a rank one row short
    of the largest share whose full batches leave it one step short (it must split its last
    batch), and a share whose tail would be a single row (it must borrow a row)."""
    extra_step = one_row_tail = 0
    for n in ROWS:
        for w in WORLD_SIZES:
            for b in BATCH_SIZES:
                total = -(-(-(-n // w)) // b)
                for r in range(w):
                    share = _share(n, w, r)
                    extra_step += -(-share // b) < total
                    one_row_tail += share % b == 1 and share > b
    assert extra_step >= 5 and one_row_tail >= 5


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("rows", ROWS)
def test_training_tail(datasets, rows: int, world: int, batch: int, shuffle: bool) -> None:
    ds = datasets[rows]
    _, manifest, table = ds
    seen = []
    steps = set()
    for rank in range(world):
        with _reader(ds, rank, world, batch, shuffle=shuffle, pad_tail=False) as reader:
            total = reader.num_batches(EPOCH)
            assert total == -(-(-(-rows // world)) // batch)  # the largest share decides
            batches = list(reader.iter_epoch(EPOCH))
            steps.add(len(batches))
            sizes = [b.size for b in batches]
            assert sizes == reader.batch_sizes(EPOCH)
            assert all(2 <= s <= batch for s in sizes), sizes
            assert sum(sizes) == _share(rows, world, rank)
            for b in batches:
                assert b.valid.tolist() == [1.0] * b.size, "no padding rows in training"
                assert (b.sample_ids >= 0).all()
                assert b.sparse_features.stride() == b.size
                _check_contents(b, manifest, table)
            ids = np.concatenate([b.sample_ids.numpy() for b in batches])
            if not shuffle:  # the rank's contiguous slice, in file order
                lo = rank * rows // world
                assert ids.tolist() == list(range(lo, lo + len(ids)))
            seen.append(ids)
            # Resume at the second, the middle, the last and past the last batch.
            full = [_fingerprint(b) for b in batches]
            for start in sorted({1, total // 2, total - 1, total}):
                assert [_fingerprint(b) for b in reader.iter_epoch(EPOCH, start_batch=start)] == full[start:], start
    assert steps == {total}, "every rank runs the same number of steps"
    all_ids = np.concatenate(seen)
    assert sorted(all_ids.tolist()) == list(range(rows)), "every row exactly once across ranks"


@pytest.mark.parametrize(
    "rows, world, batch, expected",
    [
        # 20 / 21 rows: rank 0 is one full batch short of rank 1's step count -> splits 5 = 3+2;
        # rank 1's 1-row tail borrows a row from the batch before.
        (41, 2, 5, [[5, 5, 5, 3, 2], [5, 5, 5, 4, 2]]),
        # 20 / 20 / 21 rows.
        (61, 3, 10, [[10, 8, 2], [10, 8, 2], [10, 9, 2]]),
        # 33 / 33 / 34 rows: tails of 1 and 2 rows.
        (100, 3, 16, [[16, 15, 2], [16, 15, 2], [16, 16, 2]]),
        # 41 rows on one rank: a 1-row tail borrows a row.
        (41, 1, 10, [[10, 10, 10, 9, 2]]),
    ],
)
def test_training_tail_sizes_by_hand(datasets, rows, world, batch, expected) -> None:
    got = []
    for rank in range(world):
        with _reader(datasets[rows], rank, world, batch, shuffle=True, pad_tail=False) as reader:
            got.append([b.size for b in reader.iter_epoch(EPOCH)])
    assert got == expected


@pytest.mark.parametrize(
    "world, batch, expected",
    [
        # 13/14/14 rows, 7 steps: rank 0 would end on a 1-row batch with nothing to borrow from.
        (3, 2, None),
        # 20/21 rows, 11 steps: rank 0 (10 full batches of 2) cannot split a 2-row batch.
        (2, 2, None),
        (2, 1, None),  # a batch of 1 can never hold 2 rows
        # 13/14/14 rows, 5 steps: rank 0's 1-row tail borrows from a 3-row batch.
        (3, 3, [[3, 3, 3, 2, 2], [3, 3, 3, 3, 2], [3, 3, 3, 3, 2]]),
    ],
)
def test_too_small_for_training_all_ranks_agree(datasets, world: int, batch: int, expected) -> None:
    """Where some rank cannot keep every batch at >= 2 rows, EVERY rank raises (a rank failing
    alone would leave the others blocked in a collective); otherwise every rank succeeds."""
    outcomes = []
    for rank in range(world):
        with _reader(datasets[41], rank, world, batch, shuffle=False, pad_tail=False) as reader:
            try:
                outcomes.append([b.size for b in reader.iter_epoch(EPOCH)])
            except ValueError as e:
                assert "41 rows: too few for" in str(e) and f"local batch {batch}" in str(e)
                outcomes.append(None)
    assert outcomes == (expected or [None] * world)


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("world, batch", [(1, 16), (2, 5), (3, 10), (3, 16), (2, 4)])
@pytest.mark.parametrize("rows", ROWS)
def test_eval_tail_is_padded_to_full_batches(datasets, rows: int, world: int, batch: int, shuffle: bool) -> None:
    ds = datasets[rows]
    seen = []
    for rank in range(world):
        with _reader(ds, rank, world, batch, shuffle=shuffle, pad_tail=True) as reader:
            batches = list(reader.iter_epoch(EPOCH))
            assert len(batches) == reader.num_batches(EPOCH)
            assert [b.size for b in batches] == [batch] * len(batches)
            assert sum(int(b.valid.sum()) for b in batches) == _share(rows, world, rank)
            for b in batches:
                pad = b.valid.numpy() == 0
                assert (b.sample_ids.numpy()[pad] == -1).all() and (b.labels.numpy()[pad] == 0).all()
                assert (b.sparse_features.lengths().view(len(ds[1].fields), -1)[:, pad] == 0).all()
                seen.append(b.sample_ids.numpy()[~pad])
    assert sorted(np.concatenate(seen).tolist()) == list(range(rows))
