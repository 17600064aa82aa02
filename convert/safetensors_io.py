"""Memory-mapped safetensors reading without torch (bfloat16 through ml_dtypes)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from mixtral_jax.errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One `.safetensors` file: header parsed and checked up front, tensors read lazily by memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (header past end of file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{self.path}: not a safetensors file (unreadable header)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {entry.get('dtype')}")
            start, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if end - start != np.dtype(dtype).itemsize * int(np.prod(shape)):
                raise CheckpointError(f"{self.path}: tensor {name} has a size that does not match its shape")
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated safetensors file (tensor {name} is cut off)")
            self._entries[name] = (np.dtype(dtype), shape, start, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """An in-memory copy of rows `rows` of a tensor, read with plain file reads (nothing stays mapped)."""
        dtype, shape, start, _ = self._entries[name]
        if not shape:
            return self.get(name).copy()
        lo, hi, _ = rows.indices(shape[0])
        row_items = int(np.prod(shape[1:]))
        count = max(hi - lo, 0) * row_items
        offset = self._data_start + start + lo * row_items * dtype.itemsize
        data = np.fromfile(self.path, dtype=dtype, count=count, offset=offset) if count else np.zeros(0, dtype)
        return data.reshape((max(hi - lo, 0),) + shape[1:])

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view; pages are read only when touched."""
        dtype, shape, start, _ = self._entries[name]
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=shape)
