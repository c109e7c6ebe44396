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
import os
import struct
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from tf4ctr_dist.data.errors import DataError

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64"}
FROM_CODE = {v: k for k, v in DTYPES.items()}
_ALIGN = 8


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
    """(tensor entries, metadata, data start) of an artifact, reading its header only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, struct.error) as e:
        raise DataError(f"{path}: not a tf4ctr serving artifact ({e})") from None
    metadata = header.pop("__metadata__", {})
    return header, metadata, 8 + n


def read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an artifact; the tensors view a read-only map of the file."""
    header, metadata, start = read_header(path)
    size = os.path.getsize(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        try:
            dtype = FROM_CODE[info["dtype"]]
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(s) for s in info["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: bad header entry for {name!r} ({e})") from None
        if not 0 <= begin <= end <= len(data):
            raise DataError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        raw = np.asarray(data[begin:end])
        t = torch.from_numpy(raw.copy()).view(dtype) if end > begin else torch.empty(0, dtype=dtype)
        if t.numel() != int(np.prod(shape, dtype=np.int64)):
            raise DataError(f"{path}: tensor {name!r} has {t.numel()} values for shape {shape}")
        tensors[name] = t.reshape(shape)
    return tensors, metadata
