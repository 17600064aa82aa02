"""Model folders holding an Orbax checkpoint: atomic writes, streaming writes, sharded restore.

Every Orbax call of the project lives here. A model folder is:

    FOLDER/model_config.json   the `ModelConfig` (JSON)
    FOLDER/tokenizer.model     SentencePiece tokenizer, when the source had one
    FOLDER/params/             Orbax `StandardCheckpointer` layout without OCDBT: `_METADATA` (the tree),
                               `_CHECKPOINT_METADATA`, and one zarr v2 array per parameter, named by its
                               path (`layers.ffn.w1/`), zstd-compressed chunks of at most `CHUNK_BYTES`
                               (one layer and one expert per chunk, inner dimensions halved to fit)

`ArrayWriter` fills that layout a slice at a time (a converter never holds more than one tensor, and
`write_model` saves in-memory parameters through it). `restore` reads straight into the target sharding: each
host reads only the chunks under its devices' shards; `read_slice` reads one (layer, expert) slice.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from mixtral_jax import outputs
from mixtral_jax.config import ModelConfig, stacked_axes
from mixtral_jax.errors import CheckpointError

CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"
CHUNK_BYTES = 16 << 20


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete model folder (the config is written last, just before the rename)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR / "_METADATA").is_file()


def write_model(folder: str | os.PathLike, config: ModelConfig, params: dict[str, jax.Array],
                tokenizer: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Save parameters in the checkpoint layout (path -> array, possibly sharded), the config and a tokenizer
    as a model folder, a (layer, expert) slice at a time (`ArrayWriter`), from a single process (the staging
    folder is named after it)."""
    specs = {path: ArraySpec(tuple(w.shape), np.dtype(w.dtype), stacked_axes(config, path))
             for path, w in params.items()}
    with outputs.staging(folder, "model", force) as tmp, ArrayWriter(tmp, specs) as writer:
        for path, w in params.items():
            for index in itertools.product(*map(range, w.shape[: specs[path].stacked])):
                writer.write(path, index, np.asarray(w[index] if index else w))
        writer.close()
        finish(tmp, config, tokenizer)
    return Path(folder)


def finish(folder: Path, config: ModelConfig, tokenizer: str | os.PathLike | None) -> None:
    """Write the tokenizer and, last, the config that makes `folder` a checkpoint."""
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / TOKENIZER_FILE)
    config.save(folder / CONFIG_FILE)


def read_config(folder: str | os.PathLike) -> ModelConfig:
    folder = Path(folder)
    if not is_checkpoint(folder):
        raise CheckpointError(f"{folder}: not a model checkpoint folder (no {CONFIG_FILE} and {PARAMS_DIR}/)")
    return ModelConfig.load(folder / CONFIG_FILE)


def tokenizer_path(folder: str | os.PathLike) -> Path | None:
    path = Path(folder) / TOKENIZER_FILE
    return path if path.is_file() else None


def restore(folder: str | os.PathLike, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """The parameters of a model folder (or a training step's folder, which holds `params/` alike) read into
    the shapes, dtypes (cast) and shardings of `targets` (path -> ShapeDtypeStruct; all of them or some):
    each host reads only the chunks under its devices' shards."""
    path = Path(folder).absolute() / PARAMS_DIR
    stored = stored_tree(path)
    nested: dict[str, Any] = {}
    for name, target in targets.items():
        meta = _get(stored, name.split("."))
        if meta is None:
            raise CheckpointError(f"{path}: parameter {name} is missing")
        if tuple(meta.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{path}: parameter {name} has shape {list(meta.shape)}, the config implies {list(target.shape)}"
            )
        *parents, leaf = name.split(".")
        functools.reduce(lambda tree, key: tree.setdefault(key, {}), parents, nested)[leaf] = target
    try:
        restored = _restore(path, nested, partial=len(targets) < _count(stored))
    except Exception as e:
        raise unreadable(path, e) from None
    return {name: _get(restored, name.split(".")) for name in targets}


def _restore(path: Path, nested: dict[str, Any], partial: bool) -> Any:
    """Orbax's restore of `nested` (ShapeDtypeStructs); `partial`: some of the stored leaves only."""
    if not partial:
        return ocp.StandardCheckpointer().restore(path, nested)
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                                dtype=t.dtype), nested)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(nested, restore_args, partial_restore=True))


def _count(tree: Any) -> int:
    return sum(_count(v) for v in tree.values()) if isinstance(tree, dict) else 1


def read_slice(folder: str | os.PathLike, name: str, index: tuple[int, ...], dtype) -> np.ndarray:
    """`parameter[index]` of a model folder as a host array of `dtype`, read from its zarr array alone (only
    the chunks under the slice: a converted folder holds one layer and expert per chunk)."""
    path = Path(folder).absolute() / PARAMS_DIR / name
    try:
        array = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}, open=True).result()
        return np.asarray(array[index].read().result()).astype(dtype)
    except ValueError as e:
        raise unreadable(path, e) from None


def stored_tree(path: Path) -> Any:
    """The array metadata tree of the `StandardCheckpointer` item at `path`, read before any array is.

    A CheckpointError names what Orbax cannot open (`_METADATA`, the OCDBT manifest, an array's metadata),
    which a restore would report only after reading, if at all: it reads without the tree's `_METADATA`.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: incomplete checkpoint (the folder is missing)")
    try:
        return ocp.StandardCheckpointHandler().metadata(path).tree
    except Exception as e:
        raise unreadable(path, e, "incomplete checkpoint") from None


def unreadable(path: str | os.PathLike, e: Exception, what: str = "unreadable checkpoint") -> CheckpointError:
    """What Orbax raised reading the checkpoint at `path` (a file damaged, missing or not JSON) as one line,
    `PATH: WHAT (CAUSE)`.

    Orbax wraps tensorstore's errors in a bare Exception whose message dumps the array's whole spec: the
    first line of the innermost cause says what failed, less tensorstore's spec suffix.
    """
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) adds quotes
    line = next(iter(text.strip().splitlines()), "") or type(e).__name__
    return CheckpointError(f"{path}: {what} ({line.split(' [tensorstore_spec')[0]})")


class ArraySpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: int  # leading axes written one index at a time (layer, expert)


class ArrayWriter:
    """Fills the `params/` layout that `StandardCheckpointer` restores, one slice at a time.

    `specs` maps parameter paths (`"layers.attn.wq"`) to their `ArraySpec`. Writes go straight to disk;
    one write is in flight while the caller prepares the next. `close` writes the tree metadata. Used as a
    context manager it waits for the write in flight however the block ends, so that a caller removing the
    folder after an error races no write still landing in it.
    """

    def __init__(self, folder: str | os.PathLike, specs: dict[str, ArraySpec]):
        self.path = Path(folder).absolute() / PARAMS_DIR
        self.path.mkdir(parents=True)
        self._specs = specs
        self._pending: tuple[ts.Future, np.ndarray] | None = None
        self._started = time.time_ns()
        self._arrays = {name: self._create(name, spec) for name, spec in specs.items()}

    def _create(self, name: str, spec: ArraySpec) -> ts.TensorStore:
        dtype = np.dtype(spec.dtype)
        return ts.open({
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(self.path / name)},
            "metadata": {
                "shape": list(spec.shape), "chunks": list(chunk_shape(spec.shape, dtype.itemsize, spec.stacked)),
                "dtype": dtype.name if dtype.name in ("bfloat16", "int4") else dtype.str,
                "compressor": {"id": "zstd", "level": 1}, "dimension_separator": ".",
            },
        }, create=True).result()

    def __enter__(self) -> ArrayWriter:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self._pending is not None:
            future, self._pending = self._pending[0], None
            try:
                future.result()
            except Exception:
                if kind is None:
                    raise  # the block's own error, if any, is the one to report

    def chunks(self, name: str) -> tuple[int, ...]:
        """The storage chunk shape of a parameter (writes aligned to it never rewrite a chunk)."""
        return tuple(self._arrays[name].chunk_layout.read_chunk.shape)

    def write(self, name: str, index: tuple[int | slice, ...], value: np.ndarray) -> None:
        """`param[index] = value` (e.g. `(layer, expert)`, or `(layer, slice(None), slice(0, 512))`)."""
        self.flush()
        value = np.asarray(value, dtype=self._specs[name].dtype)
        array = self._arrays[name][index] if index else self._arrays[name]
        self._pending = (array.write(value), value)

    def flush(self) -> None:
        if self._pending is not None:
            self._pending[0].result()
            self._pending = None

    def close(self) -> None:
        self.flush()
        tree: dict[str, Any] = {}
        for name, spec in self._specs.items():
            keys = name.split(".")
            tree[str(tuple(keys))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in keys],  # 2: a dict key
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                   "write_shape": list(spec.shape)},
            }
        metadata = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.path / "_METADATA").write_text(json.dumps(metadata))
        (self.path / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": ocp.StandardCheckpointHandler.typestr(), "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": self._started, "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {},
        }))


def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: int) -> tuple[int, ...]:
    """Storage chunks: 1 along the `stacked` leading axes (layer, expert), inner axes halved until a chunk
    holds at most `CHUNK_BYTES`; halving keeps chunk edges on the boundaries of 2-, 4-, 8-way shards."""
    chunks = [1] * stacked + list(shape[stacked:])
    while int(np.prod(chunks)) * itemsize > CHUNK_BYTES:
        inner = [i for i in range(stacked, len(chunks)) if chunks[i] % 2 == 0]
        if not inner:
            break
        i = max(inner, key=lambda i: chunks[i])
        chunks[i] //= 2
    return tuple(chunks)


def _get(tree: Any, keys: list[str]) -> Any:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree
