"""Rows [a, b) of one tensor of a DCP checkpoint, reading only those rows' bytes.

A table of a training checkpoint is saved as one or more chunks (table-wise: one chunk with all
rows; column-wise: a chunk per column block; row-wise: a chunk per row block), each chunk a
``torch.save`` record at a byte range of a ``.distcp`` file. Exporting a table larger than one
host's memory needs its rows in blocks, and two pieces of DCP get us there:

* ``RowRangePlanner`` (a DefaultLoadPlanner): the destination is a block of rows (b - a,
  *shape[1:]); it describes it as the chunk at offsets (a, 0, ...) of the saved tensor, and DCP's
  own resharding helper (``create_read_items_for_chunk_list``) maps each saved chunk's overlap
  with that block to a read item (offsets in the saved chunk, offsets in the block, lengths).
* ``RowRangeReader`` (wraps the run's checkpoint reader): DCP's FileSystemReader serves a read
  item by ``torch.load``-ing the whole saved chunk and then narrowing it, which would hold the
  whole table. This reader reads the chunk's record layout only (``torch.load(...,
  map_location="meta")``: shape, strides, dtype and the byte offset of its storage in the record,
  no data) and then reads just the rows the item needs (a row-major chunk keeps rows a..b in one
  byte range), narrowing the other dimensions in memory.

So one block costs one destination tensor plus, per saved chunk overlapping it, a buffer of at
most the block's rows of that chunk: about twice the block, whatever the table's size. A chunk
that is not a plain row-major record (DCP transforms, unusual strides: never written by
training) falls back to DCP's whole-chunk read, reported through ``on_read`` like any read.
The checkpoint's files were verified against their digests before (CheckpointStore), and
``weights_only`` loading never runs code from them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

DEFAULT_BLOCK_BYTES = 256 << 20

OnRead = Callable[[str, int], None]  # (key, bytes read from storage for one read item)


class RowRangePlanner(DefaultLoadPlanner):
    """Loads rows [start, start + len(dest)) of ``key`` into ``dest`` (the state dict's one tensor)."""

    def __init__(self, key: str, start: int) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.start = key, start

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        md = self.metadata.state_dict_metadata.get(self.key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"checkpoint has no tensor {self.key!r}")
        dest = self.state_dict[self.key]
        if tuple(dest.shape[1:]) != tuple(md.size[1:]) or (dest.dim() and self.start + dest.shape[0] > md.size[0]):
            raise ValueError(f"{self.key}: rows {self.start}..{self.start + dest.shape[0]} of shape "
                             f"{tuple(dest.shape[1:])} do not fit the saved {tuple(md.size)}")
        offsets = (self.start, *([0] * (dest.dim() - 1))) if dest.dim() else ()
        wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.size())
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [wanted]))

    def lookup_tensor(self, index: Any) -> torch.Tensor:
        # The read items name the block by its offset in the saved tensor; the block is the one
        # destination (their dest_offsets are relative to it).
        return self.state_dict[index.fqn]


class RowRangeReader(StorageReader):
    """A DCP StorageReader around a FileSystemReader / FsspecReader (e.g. the run's verifying
    reader) that reads only the bytes each read item needs; see the module docstring.

    on_read(key, nbytes) is called once per read item with the bytes it took from storage."""

    def __init__(self, inner: Any, on_read: Optional[OnRead] = None) -> None:
        self.inner = inner
        self.on_read = on_read
        self._metadata: Optional[Metadata] = None
        self._layouts: dict[tuple[str, int], Optional[torch.Tensor]] = {}

    # Everything but read_data is the wrapped reader's; its metadata is read (and verified) once.
    def reset(self, checkpoint_id: Any = None) -> None:
        self.inner.reset(checkpoint_id)

    def read_metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = self.inner.read_metadata()
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool) -> None:
        self.inner.set_up_storage_reader(metadata, is_coordinator)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return self.inner.prepare_global_plan(plans)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        inner = self.inner
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(inner.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in per_file.items():
            with inner.fs.create_stream(inner.fs.concat_path(inner.path, relative_path), "rb") as stream:
                for item in items:
                    if item.type != LoadItemType.TENSOR:
                        raise ValueError(f"{item.storage_index.fqn}: not a tensor; only tensors are read by rows")
                    rows = self._read_item(stream, inner.storage_data[item.storage_index], item)
                    target = planner.resolve_tensor(item).detach()
                    if target.shape != rows.shape:
                        raise AssertionError(f"{item.storage_index.fqn}: read {tuple(rows.shape)}, "
                                             f"expected {tuple(target.shape)}")
                    target.copy_(rows)
                    planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _layout(self, stream: Any, info: Any) -> Optional[torch.Tensor]:
        """The saved chunk as a meta tensor (shape, strides, dtype, storage offset) whose storage
        knows where its bytes start in the record; None when they cannot be read by rows."""
        key = (info.relative_path, info.offset)
        if key not in self._layouts:
            layout = None
            if not getattr(info, "transform_descriptors", None):
                # _slice_file: the record's byte range as a file of its own (DCP's own view)
                meta = torch.load(self.inner._slice_file(stream, info), map_location="meta", weights_only=True)
                if isinstance(meta, torch.Tensor) and meta.is_contiguous() and \
                        getattr(meta.untyped_storage(), "_checkpoint_offset", None) is not None:
                    layout = meta
            self._layouts[key] = layout
        return self._layouts[key]

    def _read_item(self, stream: Any, info: Any, item: ReadItem) -> torch.Tensor:
        """The part of the saved chunk ``item`` asks for: (lengths...) of its dtype."""
        layout = self._layout(stream, info)
        fqn = item.storage_index.fqn
        if layout is None:  # DCP's way: the whole chunk, then narrowed
            whole = torch.load(self.inner._slice_file(stream, info), map_location="cpu", weights_only=True)
            self._report(fqn, whole.numel() * whole.element_size())
            return _narrow(whole, item.storage_offsets, item.lengths)
        if layout.dim() == 0:
            first, count, row = 0, 1, 1
        else:
            first, count = int(item.storage_offsets[0]), int(item.lengths[0])
            row = math.prod(layout.shape[1:])
        size = layout.element_size()
        begin = info.offset + layout.untyped_storage()._checkpoint_offset + (layout.storage_offset() + first * row) * size
        buffer = bytearray(count * row * size)
        stream.seek(begin)
        _read_into(stream, buffer, f"{fqn} (rows {first}..{first + count})")
        self._report(fqn, len(buffer))
        if not buffer:
            return torch.empty(tuple(item.lengths), dtype=layout.dtype)
        rows = torch.frombuffer(buffer, dtype=layout.dtype).view(count, *layout.shape[1:]) if layout.dim() else \
            torch.frombuffer(buffer, dtype=layout.dtype).view(())
        return _narrow(rows, [0, *item.storage_offsets[1:]], item.lengths) if layout.dim() else rows

    def _report(self, key: str, nbytes: int) -> None:
        if self.on_read is not None:
            self.on_read(key, nbytes)


def _narrow(tensor: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        if offset != 0 or length != tensor.shape[dim]:
            tensor = tensor.narrow(dim, int(offset), int(length))
    return tensor


def _read_into(stream: Any, buffer: bytearray, what: str) -> None:
    view, filled = memoryview(buffer), 0
    while filled < len(buffer):
        if hasattr(stream, "readinto"):
            n = stream.readinto(view[filled:])
        else:
            data = stream.read(len(buffer) - filled)
            n = len(data)
            view[filled : filled + n] = data
        if not n:
            raise EOFError(f"checkpoint record of {what} ends early ({filled} of {len(buffer)} bytes)")
        filled += n


def read_rows(reader: RowRangeReader, key: str, start: int, stop: int,
              dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rows [start, stop) of the checkpoint tensor ``key``: (stop - start, *shape[1:]), of
    ``dtype`` (default: the saved one). A 0-d tensor: start=0, stop=1 gives it as ()."""
    import torch.distributed.checkpoint as dcp

    md = reader.read_metadata().state_dict_metadata.get(key)
    if not isinstance(md, TensorStorageMetadata):
        raise KeyError(f"checkpoint has no tensor {key!r}")
    shape = tuple(md.size)
    if not (0 <= start <= stop <= (shape[0] if shape else 1)):
        raise ValueError(f"{key}: rows {start}..{stop} do not fit the saved {shape}")
    dest = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype or md.properties.dtype)
    with warnings.catch_warnings():
        # no_dist: one process reads, nothing is collective (export runs outside any process
        # group); DCP warns about that on every call
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({key: dest}, storage_reader=reader, planner=RowRangePlanner(key, start if shape else 0), no_dist=True)
    return dest


def block_rows(shape: tuple[int, ...], dtype: torch.dtype, block_bytes: Optional[int]) -> int:
    """Rows per block: as many whole rows as fit in block_bytes (at least one); None: all."""
    if not shape:
        return 1
    if block_bytes is None:
        return max(1, shape[0])
    row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
    return max(1, block_bytes // max(1, row))


def iter_row_blocks(reader: RowRangeReader, key: str, shape: tuple[int, ...], dtype: torch.dtype,
                    block_bytes: Optional[int] = DEFAULT_BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """The tensor ``key`` (global ``shape``) as consecutive row blocks of at most block_bytes
    each (a row is never cut; None: one block); a 0-d or empty tensor is one block."""
    if not shape:
        yield read_rows(reader, key, 0, 1, dtype)
        return
    step = block_rows(shape, dtype, block_bytes)
    if shape[0] == 0:
        yield torch.empty(shape, dtype=dtype)
        return
    for start in range(0, shape[0], step):
        yield read_rows(reader, key, start, min(shape[0], start + step), dtype)
