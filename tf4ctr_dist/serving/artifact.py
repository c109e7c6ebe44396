"""The serving artifact's container: the safetensors layout, written and read without pickle.

    8 bytes       little-endian u64: N, the header's length
    N bytes       JSON: {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
                         "__metadata__": {key: string}}  (padded with spaces to 8-byte alignment)
    the rest      every tensor's raw little-endian bytes, at its offsets

This is the safetensors format (any safetensors reader opens the file). The header needs every
tensor's shape and offsets up front, and those come from the shapes alone (for a checkpoint's
tables: its metadata), so the data can then be written as it is produced: tensor by tensor, and
a large tensor in blocks of rows (consecutive ``(name, block)`` pairs of one name; a row is the
unit, so block k's bytes follow block k-1's in the tensor's row-major layout). An export thus
holds one block in memory, never a whole table. Reading maps the file and never runs code from it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch

from tf4ctr_dist.data.errors import DataError

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64"}
FROM_CODE = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for dt, code in DTYPES.items()}
_ALIGN = 8
# safetensors' own limit on the header: ours holds the tensor entries and the run's config and
# manifest (kilobytes); a larger length is refused before it is read into memory
MAX_HEADER_BYTES = 100_000_000


def write(path: str, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
          produce: Callable[[], Iterable[tuple[str, torch.Tensor]]], metadata: Mapping[str, str]) -> int:
    """Write ``path`` atomically (a temporary file renamed at the end); returns its size in bytes.

    specs: name -> (dtype, shape) of every tensor, in file order; produce(): yields (name, tensor)
    in that order, one at a time; a tensor may come as several consecutive (name, rows) blocks
    whose rows add up to shape[0] (each checked against its spec: dtype, shape[1:], row count)."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {dtype} not supported in the artifact")
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            order = iter(specs)
            current, rows = None, 0  # the tensor being written, rows of it written so far
            for name, tensor in produce():
                if name != current:
                    _check_complete(current, rows, specs)
                    expected = next(order, None)
                    if name != expected:
                        raise ValueError(f"artifact tensor {name}: expected {expected} next")
                    current, rows = name, 0
                dtype, shape = specs[name]
                whole = tuple(tensor.shape) == tuple(shape)
                fits = len(shape) > 0 and tensor.dim() == len(shape) and tuple(tensor.shape[1:]) == tuple(shape[1:]) \
                    and rows + tensor.shape[0] <= shape[0]
                if tensor.dtype != dtype or not (whole and rows == 0 or fits):
                    raise ValueError(f"artifact tensor {name}: got {tensor.dtype} {tuple(tensor.shape)} after {rows} "
                                     f"row(s), expected {dtype} {tuple(shape)}")
                rows += tensor.shape[0] if len(shape) else 1
                if tensor.numel():  # reshape(-1): a 0-d tensor cannot be viewed as bytes
                    # the buffer itself, not a bytes copy: a block is held once
                    f.write(memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
            _check_complete(current, rows, specs)
            if next(order, None) is not None:
                raise ValueError("artifact: fewer tensors produced than declared")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def _check_complete(name, rows: int, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    if name is not None:
        shape = specs[name][1]
        if rows != (shape[0] if len(shape) else 1):
            raise ValueError(f"artifact tensor {name}: {rows} row(s) written of {tuple(shape)}")


def read_header(path: str) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, data start) of an artifact, reading its header only.

    Every entry is checked against the file before anything is allocated from it: a known
    dtype, a shape of non-negative integers, data_offsets whose length is exactly the bytes that
    dtype and shape take, and the tensors laid end to end over the data, up to the file's end (as
    the writer lays them, and as safetensors requires). A file that fails any of this is a
    DataError naming it and the entry, not an error from numpy or torch when the bytes are
    viewed. The metadata is a JSON object of strings."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} bytes, expected at most {MAX_HEADER_BYTES}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except FileNotFoundError:
        raise
    except RecursionError:  # json's parser recurses once per level of nesting
        raise DataError(f"{path}: not a tf4ctr serving artifact (its header nests arrays or objects too deep; "
                        "expected {name: {dtype, shape, data_offsets}})") from None
    except (OSError, ValueError, struct.error) as e:
        raise DataError(f"{path}: not a tf4ctr serving artifact ({e})") from None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DataError(f"{path}: header __metadata__ should be an object of strings (key -> text)")
    _check_entries(path, header, size - 8 - n)
    return header, metadata, 8 + n


def _check_entries(path: str, header: dict, data_bytes: int) -> None:
    """Refuse any entry of ``header`` that does not fit the file (see read_header); after it,
    every entry is {dtype: a FROM_CODE key, shape: [int >= 0], data_offsets: [begin, end]} within
    the data. ``data_bytes``: the size of the data after the header."""
    spans = []
    for name, info in header.items():
        where = f"{path}: header entry {name!r}"
        if not isinstance(info, dict):
            raise DataError(f"{where}: expected an object {{dtype, shape, data_offsets}}, got {type(info).__name__}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in FROM_CODE:
            raise DataError(f"{where}: dtype {str(dtype)[:40]!r}, expected one of {sorted(FROM_CODE)}")
        # bool is an int to Python, not a dimension; a JSON int may be arbitrarily large (math.prod
        # below stays exact, where a numpy product would wrap around)
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise DataError(f"{where}: shape {str(shape)[:80]}, expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise DataError(f"{where}: data_offsets {str(offsets)[:80]}, expected [begin, end] with 0 <= begin <= end")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise DataError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, expected "
                            f"{nbytes} for {dtype} {shape}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise DataError(f"{path}: tensor {name!r} starts at data byte {begin}, expected {end} (tensors lie "
                            "end to end, without gaps or overlaps)")
        if stop > data_bytes:
            raise DataError(f"{path}: tensor {name!r} lies outside the file (it ends at data byte {stop}, "
                            f"{data_bytes} bytes follow the header; truncated?)")
        end = stop
    if end != data_bytes:
        raise DataError(f"{path}: {data_bytes - end} bytes after the last tensor, expected the file to end "
                        f"there (at data byte {end})")


def read(path: str, names: Optional[Iterable[str]] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an artifact: every tensor, or those ``names``, each whole."""
    header, metadata, start = read_header(path)  # every entry checked against the file
    with open(path, "rb") as f:
        tensors = {name: _read_rows(f, start, header[name]) for name in (header if names is None else names)}
    return tensors, metadata


def read_blocks(path: str, names: Iterable[str], block_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``names`` of an artifact, in that order, as consecutive (name, rows) blocks of
    at most ``block_bytes`` each (whole rows, at least one; a 0-d tensor comes whole): what
    ``write`` takes, and what fills a model in place while holding one block beside it. Plain
    reads, not a map of the file: mapped pages once touched would count as the process's memory
    until the map is closed."""
    header, _, start = read_header(path)
    with open(path, "rb") as f:
        for name in names:
            info = header[name]
            shape, (begin, end) = info["shape"], info["data_offsets"]
            if not shape or end == begin:
                yield name, _read_rows(f, start, info)
                continue
            step = max(1, block_bytes // ((end - begin) // shape[0]))
            for first in range(0, shape[0], step):
                yield name, _read_rows(f, start, info, first, min(step, shape[0] - first))


def _read_rows(f, start: int, info: dict, first: int = 0, rows: Optional[int] = None) -> torch.Tensor:
    """Rows [first, first + rows) of the tensor ``info`` (default: all of it) from the open file
    ``f`` whose data begins at byte ``start``; read_header has checked the entry against the file."""
    dtype, shape = FROM_CODE[info["dtype"]], info["shape"]
    begin, end = info["data_offsets"]
    count = shape[0] if shape else 1
    rows = count if rows is None else rows
    out = torch.empty([rows, *shape[1:]] if shape else [], dtype=dtype)
    if end > begin:
        row_bytes = (end - begin) // count
        f.seek(start + begin + first * row_bytes)
        buffer = out.reshape(-1).view(torch.uint8).numpy()
        if f.readinto(buffer) != len(buffer):  # the file changed under us since its header was checked
            raise DataError(f"{f.name}: tensor data ends early (the file was truncated while being read)")
    return out
