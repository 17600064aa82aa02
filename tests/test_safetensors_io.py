"""Safetensors headers: files written by the `safetensors` library read back exactly, and every lying
header (bad types, offsets out of the file, overlapping or leaving holes, sizes that disagree with the
dtype and shape, a wrong header length) is refused with a one-line CheckpointError before any read; where
the reference implementation (the `safetensors` package, the Rust crate) refuses a file, so do we."""

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open
from safetensors.numpy import save_file

from mixtral_jax.convert.safetensors_io import DTYPES, LIMIT, MAX_HEADER_BYTES, SafetensorsFile
from mixtral_jax.errors import CheckpointError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=6).filter(
    lambda s: s.isprintable() and s != "__metadata__"
)
# Any JSON value, for the fields and entries a lying header fills with the wrong kind of thing.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# Numpy dtypes `safetensors.numpy` writes, with their names in the format.
NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def _file(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: the header's length (or `length`), its JSON text (compact, no padding), data."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _valid(count: object) -> bool:
    """A JSON integer the format takes as a dimension or an offset."""
    return type(count) is int and 0 <= count < LIMIT


@st.composite
def layouts(draw, min_tensors: int = 0) -> tuple[dict, bytes]:
    """A valid header and its data: tensors of any known dtype and small shapes tiling the data, listed in
    any order, with or without `__metadata__`."""
    names = draw(st.lists(NAMES, min_size=min_tensors, max_size=4, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = dict(draw(st.permutations(list(header.items()))))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    return header, draw(st.binary(min_size=offset, max_size=offset))


def _sized(header: dict) -> list[str]:
    return [n for n, e in header.items() if n != "__metadata__" and e["data_offsets"][1] > e["data_offsets"][0]]


def _tensors(header: dict) -> list[str]:
    return [n for n in header if n != "__metadata__"]


@st.composite
def lying_files(draw) -> tuple[bytes, bool]:
    """(the bytes of a file whose header lies, whether the reference implementation refuses it too).

    Each kind of lie leaves a file that no reading of the format accepts: e.g. moving a tensor that holds
    bytes anywhere else leaves its old bytes to no tensor, or overlaps another, or runs past the data.
    """
    header, data = draw(layouts(min_tensors=draw(st.sampled_from([0, 1, 1, 1]))))
    tensors, sized = _tensors(header), _sized(header)
    kinds = ["not an object", "bad metadata", "trailing bytes", "header length short", "header length long",
             "header length huge", "not UTF-8", "NaN literal"]
    kinds += ["bad entry", "missing field", "bad dtype", "bad shape", "bad offsets", "unprintable name",
              "duplicate"] if tensors else []
    kinds += ["moved", "resized", "reshaped", "truncated"] if sized else []
    kind = draw(st.sampled_from(kinds))
    name = draw(st.sampled_from(sized if kind in ("moved", "resized", "reshaped") else tensors or [None]))
    entry = header.get(name)
    refused_by_reference = True
    if kind == "not an object":
        return _file(json.dumps(draw(JSON.filter(lambda v: not isinstance(v, dict)))).encode(), data), True
    if kind == "bad metadata":
        header["__metadata__"] = draw(
            JSON.filter(lambda v: v is not None and not isinstance(v, dict))
            | st.dictionaries(st.text(max_size=3), JSON.filter(lambda v: not isinstance(v, str)), min_size=1,
                              max_size=2)
        )
    elif kind == "trailing bytes":
        data += draw(st.binary(min_size=1, max_size=9))
    elif kind == "truncated":
        data = data[: -draw(st.integers(1, len(data)))]
    elif kind == "header length short":
        text = _file(header, b"")[8:]
        return _file(header, data, len(text) - draw(st.integers(1, len(text)))), True
    elif kind == "header length long":
        text = _file(header, b"")[8:]
        return _file(header, data, len(text) + draw(st.integers(1, len(data) + 9))), True
    elif kind == "header length huge":
        return _file(header, data, draw(st.integers(MAX_HEADER_BYTES + 1, LIMIT - 1))), True
    elif kind == "not UTF-8":
        text = _file(header, b"")[8:]
        at = draw(st.integers(0, len(text)))
        return _file(text[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + text[at:], data), True
    elif kind == "NaN literal":
        header["__metadata__"] = {"x": "@@"}
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        return _file(_file(header, b"")[8:].replace(b'"@@"', literal), data), True
    elif kind == "bad entry":
        header[name] = draw(JSON.filter(lambda v: not isinstance(v, dict)))
        refused_by_reference = not isinstance(header[name], list)  # serde reads [dtype, shape, offsets] too
    elif kind == "missing field":
        del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "bad dtype":
        entry["dtype"] = draw(JSON.filter(lambda v: not isinstance(v, str)) | st.text("abcxyz0123_", max_size=6))
    elif kind == "bad shape":
        good = st.lists(st.integers(0, 4), max_size=3)
        bad = st.sampled_from([-1, -(2**63), LIMIT, True, False, 1.0, "1", None, [1]])
        entry["shape"] = draw(
            JSON.filter(lambda v: not (isinstance(v, list) and all(_valid(d) for d in v)))
            | st.tuples(good, bad, good).map(lambda t: t[0] + [t[1]] + t[2])
        )
    elif kind == "bad offsets":
        entry["data_offsets"] = draw(
            JSON.filter(lambda v: not (isinstance(v, list) and len(v) == 2 and all(_valid(o) for o in v)
                                       and v[0] <= v[1]))
            | st.tuples(st.integers(-(2**65), LIMIT + 5), st.integers(-(2**65), LIMIT + 5))
                .filter(lambda t: not (_valid(t[0]) and _valid(t[1]) and t[0] <= t[1])).map(list)
        )
    elif kind == "unprintable name":
        header[name + draw(st.sampled_from(["\n", "\r", "\x1b", "\u2028", "\x00"]))] = header.pop(name)
        refused_by_reference = False  # the format allows any name; every message names it on one line
    elif kind == "duplicate":
        text = _file(header, b"")[8:-1] + b"," + json.dumps({name: entry})[1:].encode()
        return _file(text, data), False  # the reference keeps the last of the two
    elif kind == "moved":
        start, end = entry["data_offsets"]
        delta = draw(st.integers(-start, len(data) + 9).filter(bool))
        entry["data_offsets"] = [start + delta, end + delta]
    elif kind == "resized":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = [start, draw(st.integers(start, len(data) + 9).filter(lambda e: e != end))]
    elif kind == "reshaped":
        old = math.prod(entry["shape"])
        entry["shape"] = draw(st.lists(st.integers(0, 5), max_size=3).filter(lambda s: math.prod(s) != old))
    return _file(header, data), refused_by_reference


def _reference_refuses(path) -> bool:
    try:
        with safe_open(path, framework="np"):
            return False
    except Exception:  # the reference raises its own SafetensorError, or others, for what it refuses
        return True


@SETTINGS
@given(lying_files())
def test_lying_header_is_refused_with_one_line(tmp_path_factory, lie):
    content, refused_by_reference = lie
    path = tmp_path_factory.mktemp("lie") / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "\r" not in message, message
    assert not refused_by_reference or _reference_refuses(path)


@st.composite
def tensor_dicts(draw) -> dict[str, np.ndarray]:
    names = draw(st.lists(NAMES, max_size=4, unique=True))
    return {
        name: draw(hnp.arrays(st.sampled_from(list(NUMPY_DTYPES.values())),
                              hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
        for name in names
    }


@SETTINGS
@given(tensor_dicts(), st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
def test_files_written_by_safetensors_read_back_exactly(tmp_path_factory, tensors, metadata):
    assume(tensors or metadata != {})  # the library then writes `{},"__metadata__":{}}`, which it cannot read
    path = tmp_path_factory.mktemp("valid") / "model.safetensors"
    save_file(tensors, path, metadata=metadata)
    f = SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == (metadata or {})
    for name, want in tensors.items():
        assert f.dtype(name) == want.dtype and f.shape(name) == want.shape
        for got in (f.read(name), np.asarray(f.get(name))):
            assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
        if want.ndim:
            rows = slice(1, 3)
            assert f.read(name, rows).tobytes() == want[rows].tobytes()


@SETTINGS
@given(layouts())
def test_any_valid_layout_is_accepted(tmp_path_factory, layout):
    header, data = layout
    path = tmp_path_factory.mktemp("layout") / "model.safetensors"
    path.write_bytes(_file(header, data))
    f = SafetensorsFile(path)
    assert not _reference_refuses(path)
    assert sorted(f.keys()) == sorted(_tensors(header))
    for name in f.keys():
        start, end = header[name]["data_offsets"]
        assert f.read(name).tobytes() == data[start:end]


def test_offsets_into_the_header_are_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]}}, bytes(16)))
    with pytest.raises(CheckpointError, match=r"tensor w has data_offsets \[-4, 12\]: expected \[start, end\]"):
        SafetensorsFile(path)


@pytest.mark.parametrize("offsets, data_bytes, says", [
    ([[0, 8], [4, 12]], 12, r"tensor b has data_offsets \[4, 12\]: they overlap tensor a, which ends at 8"),
    ([[0, 8], [12, 20]], 20, r"tensor b has data_offsets \[12, 20\]: data bytes 8 to 12 belong to no tensor"),
    ([[8, 16], [16, 24]], 24, r"tensor a has data_offsets \[8, 16\]: data bytes 0 to 8 belong to no tensor"),
    ([[0, 8], [8, 16]], 24, r"not a safetensors file \(data bytes 16 to 24 belong to no tensor\)"),
    ([[0, 8], [8, 16]], 12, (r"truncated safetensors file \(tensor b is cut off: its data_offsets \[8, 16\] run "
                             r"past the 12 bytes of data\)")),
    ([[0, 8], [8, 12]], 12, (r"tensor b has data_offsets \[8, 12\] \(4 bytes\), but dtype F32 and shape \[2\] "
                             r"take 8 bytes")),
])
def test_overlaps_holes_and_uncovered_bytes_are_named(tmp_path, offsets, data_bytes, says):
    path = tmp_path / "model.safetensors"
    header = {n: {"dtype": "F32", "shape": [2], "data_offsets": o} for n, o in zip("ab", offsets)}
    path.write_bytes(_file(header, bytes(data_bytes)))
    with pytest.raises(CheckpointError, match=says):
        SafetensorsFile(path)
