"""Memory-mapped safetensors reading without torch (bfloat16 and float8 through ml_dtypes).

The header is checked as the reference implementation (the Rust `safetensors` crate) checks it before
any tensor is read: a JSON object of entries whose byte ranges match their dtype and shape and tile the
data exactly, so that a lying header can never make a read return bytes outside its own tensor.
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from mixtral_jax.errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation refuses longer headers
LIMIT = 1 << 64  # sizes, offsets and dimensions are unsigned 64-bit integers in the format


class SafetensorsFile:
    """One `.safetensors` file: header parsed and checked up front, tensors read lazily by memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(
                        f"{self.path}: not a safetensors file (header length {n} is over the format's "
                        f"limit of {MAX_HEADER_BYTES} bytes)"
                    )
                if n > size - 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (header past end of file)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        header = self._parse(raw)
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise CheckpointError(f"{self.path}: not a safetensors file (__metadata__ must map strings to strings)")
        self.metadata: dict[str, str] = metadata or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {
            name: self._entry(name, entry) for name, entry in header.items()
        }
        self._check_tiling(size - self._data_start)

    def _parse(self, raw: bytes) -> dict:
        """The header as a dict, refusing what the format's JSON parser refuses (invalid UTF-8, NaN and
        Infinity literals) and keys that appear twice."""

        def pairs(items: list[tuple[str, object]]) -> dict:
            counts = collections.Counter(key for key, _ in items)
            twice = next((key for key, count in counts.items() if count > 1), None)
            if twice is not None:
                raise CheckpointError(f"{self.path}: not a safetensors file (key {_show(twice)} appears twice)")
            for key, value in items:
                if not _utf8(key) or (isinstance(value, str) and not _utf8(value)):
                    raise CheckpointError(f"{self.path}: not a safetensors file (an invalid \\u escape in the header)")
            return dict(items)

        def constant(literal: str):
            raise ValueError(f"{literal} is not JSON")

        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, or an int too long
            raise CheckpointError(f"{self.path}: not a safetensors file (unreadable header)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (the header is not a JSON object)")
        return header

    def _entry(self, name: str, entry: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, start, end) of one header entry, each field checked on its own."""
        if not name.isprintable():  # every message names the tensor on one line
            raise CheckpointError(f"{self.path}: tensor {_show(name)} has a name with unprintable characters")
        where = f"{self.path}: tensor {name}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has header entry {_show(entry)}: expected an object with dtype, "
                                  f"shape and data_offsets")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise CheckpointError(f"{where} has no {key} in the header")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {_show(dtype)}")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise CheckpointError(f"{where} has shape {_show(shape)}: expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(
                f"{where} has data_offsets {_show(offsets)}: expected [start, end] with 0 <= start <= end"
            )
        dtype, (start, end) = np.dtype(DTYPES[dtype]), offsets
        nbytes = _nbytes(shape, dtype.itemsize)
        if nbytes is None:
            raise CheckpointError(f"{where} has shape {_show(shape)}: over 2^64 bytes")
        if end - start != nbytes:
            raise CheckpointError(
                f"{where} has data_offsets {offsets} ({end - start} bytes), but dtype {entry['dtype']} "
                f"and shape {shape} take {nbytes} bytes"
            )
        return dtype, tuple(shape), start, end

    def _check_tiling(self, data_bytes: int) -> None:
        """The tensors' byte ranges, in order, cover the `data_bytes` after the header exactly once."""
        covered, previous = 0, None
        for start, end, name in sorted((s, e, name) for name, (_, _, s, e) in self._entries.items()):
            where = f"{self.path}: tensor {name} has data_offsets [{start}, {end}]"
            if start < covered:
                raise CheckpointError(f"{where}: they overlap tensor {previous}, which ends at {covered}")
            if start > covered:
                raise CheckpointError(f"{where}: data bytes {covered} to {start} belong to no tensor")
            if end > data_bytes:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file (tensor {name} is cut off: its data_offsets "
                    f"[{start}, {end}] run past the {data_bytes} bytes of data)"
                )
            covered, previous = end, name
        if covered != data_bytes:
            raise CheckpointError(
                f"{self.path}: not a safetensors file (data bytes {covered} to {data_bytes} belong to no tensor)"
            )

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
            return np.fromfile(self.path, dtype=dtype, count=1, offset=self._data_start + start).reshape(())
        lo, hi, _ = rows.indices(shape[0])
        row_items = math.prod(shape[1:])
        count = max(hi - lo, 0) * row_items
        offset = self._data_start + start + lo * row_items * dtype.itemsize
        data = np.fromfile(self.path, dtype=dtype, count=count, offset=offset) if count else np.zeros(0, dtype)
        return data.reshape((max(hi - lo, 0),) + shape[1:])

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view; pages are read only when touched."""
        dtype, shape, start, _ = self._entries[name]
        if 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=shape)


def _count(value: object) -> bool:
    """A JSON integer that fits the format's unsigned 64-bit sizes (a bool is not one)."""
    return type(value) is int and 0 <= value < LIMIT


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """The bytes of a tensor, None when a running product reaches 2^64 (as the reference refuses)."""
    n = 1
    for d in shape + [itemsize]:
        n *= d
        if n >= LIMIT:
            return None
    return n


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(value: object) -> str:
    """A header value as JSON on one short line, for messages."""
    try:
        text = json.dumps(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."
