"""Export in row blocks: rows [a, b) of a DCP checkpoint's tensors read alone (and only their
bytes), and the artifact written block by block is the same file as written whole.

The sharded (table-wise / column-wise) checkpoints of a real run: tests/distributed/
test_serving_roundtrip.py."""

from __future__ import annotations

import pytest
import torch

from tf4ctr_dist.serving import artifact
from tf4ctr_dist.serving.dcp_rows import RowRangeReader, block_rows, iter_row_blocks, read_rows


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {
        "table": torch.randn(37, 5),
        "half": torch.randn(9, 3).to(torch.bfloat16),
        "bias": torch.arange(11, dtype=torch.int64) * 7 - 30,
        "count": torch.tensor(12345, dtype=torch.int64),  # 0-d, like BatchNorm's num_batches_tracked
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    dcp.save({k: v.clone() for k, v in state.items()}, checkpoint_id=str(path), no_dist=True)
    return state, str(path)


def _reader(path: str, reads: list) -> RowRangeReader:
    from torch.distributed.checkpoint import FileSystemReader

    return RowRangeReader(FileSystemReader(path), on_read=lambda key, n: reads.append((key, n)))


@pytest.mark.parametrize("block_bytes", [1, 24, 100, None])
def test_blocks_reassemble_each_tensor_reading_only_their_rows(saved, block_bytes, monkeypatch):
    state, path = saved
    loads = []
    real_load = torch.load

    def watched_load(*args, **kwargs):  # the layout probe is fine; a data load would hold a chunk
        loads.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", watched_load)
    reads: list = []
    reader = _reader(path, reads)
    for key, value in state.items():
        shape = tuple(value.shape)
        blocks = list(iter_row_blocks(reader, key, shape, value.dtype, block_bytes))
        got = torch.cat(blocks) if value.dim() else blocks[0]
        assert got.dtype == value.dtype and torch.equal(got, value), key
        if value.dim() and shape[0]:
            step = block_rows(shape, value.dtype, block_bytes)
            assert [len(b) for b in blocks] == [min(step, shape[0] - a) for a in range(0, shape[0], step)]
            row = value[0].numel() * value.element_size()
            mine = [n for k, n in reads if k == key]
            # every read holds at most one block (a block holds at least one row) ...
            assert max(mine) <= max(row, block_bytes or row * shape[0])
            # ... and each byte of the tensor is read once
            assert sum(mine) == value.numel() * value.element_size(), key
    assert loads and all(where == "meta" for where in loads)
    if block_bytes == 1:  # one row per block: many reads, none of them a whole table
        assert len([k for k, _ in reads if k == "table"]) == 37


def test_a_row_range_alone(saved):
    state, path = saved
    reads: list = []
    reader = _reader(path, reads)
    assert torch.equal(read_rows(reader, "table", 5, 9), state["table"][5:9])
    assert reads == [("table", 4 * 5 * 4)]
    assert torch.equal(read_rows(reader, "bias", 10, 11), state["bias"][10:])
    # the destination dtype may differ from the saved one (the model's dtype wins, as in DCP)
    assert torch.equal(read_rows(reader, "half", 0, 9, torch.float32), state["half"].float())
    with pytest.raises(ValueError, match="do not fit"):
        read_rows(reader, "table", 30, 40)
    with pytest.raises(KeyError, match="nope"):
        read_rows(reader, "nope", 0, 1)


def test_artifact_written_in_blocks_is_the_same_file(tmp_path, saved):
    state, _ = saved
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    whole = artifact.write(str(tmp_path / "whole"), specs, lambda: iter(state.items()), {"k": "v"})

    def in_blocks():
        for k, v in state.items():
            if v.dim() and len(v) > 2:
                for a in range(0, len(v), 2):
                    yield k, v[a : a + 2]
            else:
                yield k, v

    blocks = artifact.write(str(tmp_path / "blocks"), specs, in_blocks, {"k": "v"})
    assert whole == blocks
    assert (tmp_path / "whole").read_bytes() == (tmp_path / "blocks").read_bytes()
    tensors, _ = artifact.read(str(tmp_path / "blocks"))
    assert all(torch.equal(tensors[k], v) for k, v in state.items())

    def short():  # the table's last rows never come
        for k, v in state.items():
            yield k, v[:-1] if k == "table" else v

    def wide():  # a block of another width
        yield "table", torch.zeros(2, 6)

    for produce, message in [(short, r"36 row\(s\) written of \(37, 5\)"), (wide, "expected torch.float32 \\(37, 5\\)")]:
        with pytest.raises(ValueError, match=message):
            artifact.write(str(tmp_path / "bad"), specs, produce, {})
        assert not list(tmp_path.glob("bad*"))  # nothing left under the name or beside it


@pytest.mark.parametrize("block_bytes", [1, 24, 100, 1 << 20])
def test_artifact_read_in_blocks_gives_each_tensor_in_row_order(tmp_path, saved, block_bytes):
    """read_blocks (what load fills the model with): the blocks of a tensor are its rows in
    order, at most block_bytes each (whole rows, at least one), for the names asked, in that order."""
    state, _ = saved
    path = str(tmp_path / "a")
    artifact.write(path, {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}, lambda: iter(state.items()), {})
    names = ["count", "table", "empty", "half"]  # not file order, and "bias" left out
    got: dict = {}
    for name, rows in artifact.read_blocks(path, names, block_bytes):
        assert rows.dim() == 0 or len(rows) <= 1 or rows.numel() * rows.element_size() <= block_bytes
        got.setdefault(name, []).append(rows)
    assert list(got) == names
    for name in names:
        whole = got[name][0] if state[name].dim() == 0 else torch.cat(got[name])
        assert whole.dtype == state[name].dtype and torch.equal(whole, state[name]), name
    if block_bytes == 24:  # a 20-byte row of "table" per block: 37 blocks
        assert len(got["table"]) == 37
    if block_bytes == 1 << 20:
        assert len(got["table"]) == 1
    only, _ = artifact.read(path, ["bias"])
    assert list(only) == ["bias"] and torch.equal(only["bias"], state["bias"])


@pytest.mark.parametrize("cuts", [
    ((0, 0, 20, 5), (20, 0, 17, 5)),  # row-wise: two row blocks (needs GPUs to train; the layout is the point)
    ((0, 0, 37, 2), (0, 2, 37, 3)),  # column-wise: two column blocks
    ((0, 0, 11, 2), (0, 2, 11, 3), (11, 0, 26, 2), (11, 2, 26, 3)),  # table-row-wise: a grid
], ids=["row_wise", "column_wise", "grid"])
def test_sharded_layouts(tmp_path, cuts):
    """A table saved as several chunks (offsets, sizes): any row block gathers its rows from
    every chunk it overlaps, each read holding only that block's rows of the chunk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    torch.manual_seed(1)
    table = torch.randn(37, 5)
    pieces = {f"piece{i}": table[r : r + nr, c : c + nc].clone() for i, (r, c, nr, nc) in enumerate(cuts)}
    dcp.save(pieces, checkpoint_id=str(tmp_path), no_dist=True)

    class Sharded(FileSystemReader):
        """The pieces' records presented as the chunks of one tensor "table", as a sharded save
        writes them (DCP metadata maps each chunk's offsets to its record)."""

        def read_metadata(self, *args, **kwargs):
            md = super().read_metadata(*args, **kwargs)
            first = md.state_dict_metadata["piece0"]
            chunks, storage = [], dict(md.storage_data)
            for i, (r, c, nr, nc) in enumerate(cuts):
                chunks.append(ChunkStorageMetadata(offsets=torch.Size([r, c]), sizes=torch.Size([nr, nc])))
                storage[MetadataIndex("table", [r, c])] = md.storage_data[MetadataIndex(f"piece{i}", [0, 0])]
            md.state_dict_metadata["table"] = type(first)(first.properties, torch.Size([37, 5]), chunks)
            md.storage_data = storage
            return md

    reads: list = []
    reader = RowRangeReader(Sharded(str(tmp_path)), on_read=lambda key, n: reads.append(n))
    for block_bytes in (20, 60, 1 << 20):
        reads.clear()
        got = torch.cat(list(iter_row_blocks(reader, "table", (37, 5), torch.float32, block_bytes)))
        assert torch.equal(got, table), block_bytes
        assert sum(reads) == table.numel() * 4 and max(reads) <= max(20, block_bytes)
    assert torch.equal(read_rows(reader, "table", 9, 23), table[9:23])  # across the row cuts
