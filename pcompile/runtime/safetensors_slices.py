"""This rank's piece of a tensor in a safetensors file, read with positioned reads.

Why not the `safetensors` library's `get_slice`: it reads through a memory map, and a piece
that is not a run of whole rows (a row-parallel weight's column block, [:, a:b]) touches every
page of the tensor, so each rank's resident memory grows by the whole tensor - for a model
larger than one device that is the failure sharded loading exists to avoid. Here a piece is
read a bounded slab of rows at a time (at most CHUNK_BYTES beyond the piece) and cut from it.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length
N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?},
then the data, each tensor contiguous and row-major.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from pcompile.errors import PcompileError

CHUNK_BYTES = 16 << 20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    """An open safetensors file: `keys()`, `shape(key)`, `read(key, ranges)`."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        self._header = json.loads(os.pread(self._fd, length, 8))
        self._header.pop("__metadata__", None)
        self._data = 8 + length

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self):
        return self._header.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def _rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (the whole tensor when 0-d)."""
        entry = self._header[key]
        dtype, shape = DTYPES.get(entry["dtype"]), entry["shape"]
        if dtype is None:
            raise PcompileError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, which pcompile cannot read",
                                f"convert the checkpoint to one of {sorted(DTYPES)}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        row = itemsize * (int(torch.Size(shape[1:]).numel()) if shape else 1)
        begin = self._data + entry["data_offsets"][0]
        count = (stop - start) if shape else 1
        raw = bytearray(os.pread(self._fd, row * count, begin + start * row))
        if len(raw) != row * count:
            raise PcompileError(f"{self.path} is truncated (tensor {key!r})", "download or copy the file again")
        return torch.frombuffer(raw, dtype=dtype).view([count] + list(shape[1:]) if shape else [])

    def read(self, key: str, ranges: list[list[tuple[int, int]]]) -> torch.Tensor:
        """The piece of `key` made of, per dim, the [start, stop) ranges listed (several ranges on a
        dim are concatenated in order, as a block-wise cut's)."""
        shape = self.shape(key)
        if not shape:
            return self._rows(key, 0, 1).clone()
        itemsize = torch.empty((), dtype=DTYPES.get(self._header[key]["dtype"], torch.uint8)).element_size()
        step = max(1, CHUNK_BYTES // max(1, itemsize * int(torch.Size(shape[1:]).numel())))
        parts = []
        for start, stop in ranges[0]:
            for first in range(start, stop, step):
                slab = self._rows(key, first, min(first + step, stop))
                for dim, dim_ranges in enumerate(ranges[1:], start=1):
                    if dim_ranges != [(0, shape[dim])]:
                        slab = torch.cat([slab.narrow(dim, a, b - a) for a, b in dim_ranges], dim=dim)
                parts.append(slab)  # a cut is a copy: the slab it was cut from is freed
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
