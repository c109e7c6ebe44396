"""The serving artifact's container: the safetensors layout, written and read without pickle.

    8 bytes       little-endian u64: N, the header's length
    N bytes       JSON: {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
                         "__metadata__": {key: string}}  (padded with spaces to 8-byte alignment)
    the rest      every tensor's raw little-endian bytes, at its offsets

This is the safetensors format (any safetensors reader opens the file); it is written here
tensor by tensor, so an export holds one tensor in memory at a time: the header is fixed first
from the shapes, then each tensor is produced, written and dropped. Reading maps the file and
never runs code from it.
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
    in that order, one at a time (each checked against its spec)."""
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
            for name, tensor in produce():
                expected = next(order, None)
                dtype, shape = specs[name] if name in specs else (None, None)
                if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"artifact tensor {name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                                     f"expected {expected} {dtype} {shape}")
                if tensor.numel():  # reshape(-1): a 0-d tensor cannot be viewed as bytes
                    f.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            if next(order, None) is not None:
                raise ValueError("artifact: fewer tensors produced than declared")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an artifact; the tensors view a read-only map of the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, struct.error) as e:
        raise DataError(f"{path}: not a tf4ctr serving artifact ({e})") from None
    metadata = header.pop("__metadata__", {})
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
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
