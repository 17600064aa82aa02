"""Where a model's weights come from: each checkpoint format as a reader of leaves (`backends.Reader`).

- a model folder (`mixtral-jax convert` output): Orbax restores whole leaves into their shardings, and
  tensorstore reads one (layer, expert) slice of its zarr arrays;
- a training OUTPUT (its latest step): Orbax restores whole leaves (its arrays are in one OCDBT store);
- a Hugging Face or Mistral folder: each device's slice, or one (layer, expert) slice, assembled from the
  memory-mapped source tensors through the converter's mapping rules.

A backend reads what it needs (`Backend.place`): whole sharded leaves, or slice by slice for a layout that
holds them apart, so that no stacked copy is ever whole in memory.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import checkpoint, quant, trained
from mixtral_jax.config import ModelConfig
from mixtral_jax.convert import mapping
from mixtral_jax.convert.sources import Source, open_source
from mixtral_jax.errors import CheckpointError


class Opened(NamedTuple):
    config: ModelConfig  # as stored
    tokenizer: Path | None
    reader: object  # a `backends.Reader`


def open_checkpoint(path: str | os.PathLike, allow_non_finite: bool = False) -> Opened:
    """A model folder, a training OUTPUT or a Hugging Face / Mistral folder, ready to read; a foreign folder's
    weights holding NaN or inf are refused as they are read unless `allow_non_finite`."""
    if not str(path):
        raise CheckpointError("the checkpoint path is empty")
    if trained.is_training_output(path):
        step = trained.latest_step_folder(path)
        cfg = ModelConfig.load(Path(path) / trained.MODEL_CONFIG)
        tokenizer = Path(path) / trained.TOKENIZER
        return Opened(cfg, tokenizer if tokenizer.is_file() else None, OrbaxReader(step, slices=False))
    if checkpoint.is_checkpoint(path):
        return Opened(checkpoint.read_config(path), checkpoint.tokenizer_path(path), OrbaxReader(Path(path)))
    source = open_source(Path(path))
    source.check()
    return Opened(source.config, source.tokenizer, ForeignReader(source, allow_non_finite))


class OrbaxReader:
    """A folder holding `params/` (a model folder, or a training step's folder)."""

    def __init__(self, folder: Path, slices: bool = True):
        self.folder = folder
        self.slices = slices

    def arrays(self, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        return checkpoint.restore(self.folder, targets)

    def read(self, path: str, index: tuple[int, ...], dtype) -> np.ndarray:
        return checkpoint.read_slice(self.folder, path, index, dtype)


class ForeignReader:
    """A Hugging Face or Mistral folder, read through the converter's mapping rules."""

    slices = True

    def __init__(self, source: Source, allow_non_finite: bool):
        self.source = source
        self.allow_non_finite = allow_non_finite
        self.rules = {rule.target: rule for rule in mapping.rules_for(source.naming, source.config)}

    def arrays(self, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        def place(path: str, target: jax.ShapeDtypeStruct) -> jax.Array:
            return jax.make_array_from_callback(target.shape, target.sharding, lambda index: self._assemble(
                path, index, target.dtype))

        return {path: place(path, target) for path, target in targets.items()}

    def read(self, path: str, index: tuple[int, ...], dtype) -> np.ndarray:
        w = self._assemble(path, tuple(slice(i, i + 1) for i in index), dtype)
        return w.reshape(w.shape[len(index):])

    def _assemble(self, path: str, index: tuple[slice, ...], dtype) -> np.ndarray:
        return mapping.assemble(self.rules[path], self.source, self.source.config, index, dtype,
                                self.allow_non_finite)


class QuantizingReader:
    """A reader of a 16-bit checkpoint that serves `cfg`'s quantised weights: each (layer) or (layer, expert)
    slice is read in float32, quantised on its own (`quant.quantize_slice`) and written into its leaf on the
    devices (`_Filling`), so memory holds the quantised weights plus one slice (and, for int4, one leaf's
    bytes as it is converted); from a reader without slices (a training OUTPUT) one whole weight is read at a
    time, then quantised slice by slice."""

    def __init__(self, reader, cfg: ModelConfig):
        self.inner, self.cfg = reader, cfg
        self.slices = reader.slices
        self._last: tuple[tuple[str, tuple[int, ...]], tuple[np.ndarray, np.ndarray]] | None = None

    def arrays(self, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        weights = [path for path in targets if quant.is_quantized(self.cfg, path)]
        scales = {quant.scale_path(path) for path in weights}
        out = self.inner.arrays({p: t for p, t in targets.items() if p not in scales and p not in weights})
        for path in weights:
            q_target, s_target = targets[path], targets[quant.scale_path(path)]
            q, scale = _Filling(q_target), _Filling(s_target)
            whole = None if self.slices else self._whole(path, q_target.shape)
            for index in quant.stacked_slices(self.cfg, path, q_target.shape):
                if whole is None:
                    q_slice, s_slice = self._slice(path, index)
                else:
                    q_slice, s_slice = quant.quantize_slice(self.cfg, path, whole[index])
                q.write(index, q_slice)
                scale.write(index, s_slice)
            del whole
            out[path], out[quant.scale_path(path)] = q.done(), scale.done()
        return out

    def read(self, path: str, index: tuple[int, ...], dtype) -> np.ndarray:
        if path.rsplit(".", 2)[-2:-1] == ["scales"]:
            return self._slice(quant.weight_path(path), index)[1]
        if quant.is_quantized(self.cfg, path):
            return self._slice(path, index)[0]
        return self.inner.read(path, index, dtype)

    def _slice(self, path: str, index: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(q, scales) of a weight's slice; the last one is kept, as its q and scales are read one after the
        other."""
        if self._last is None or self._last[0] != (path, index):
            self._last = None  # the float slice and its quantised form are not held twice
            self._last = (path, index), quant.quantize_slice(self.cfg, path, self.inner.read(path, index, np.float32))
        return self._last[1]

    def _whole(self, path: str, shape: tuple[int, ...]) -> np.ndarray:
        device = jax.local_devices()[0]
        target = jax.ShapeDtypeStruct(shape, np.float32, sharding=jax.sharding.SingleDeviceSharding(device))
        return np.asarray(self.inner.arrays({path: target})[path])


class _Filling:
    """A leaf allocated on its devices with its target sharding, then written one stacked slice at a time in
    place: memory holds the leaf and one slice, never a second stacked copy. Every process makes the same
    calls in the same order (each slice is a global array), so that this works across hosts too.

    An int4 leaf is filled as bytes [..., ceil(n / 2)] (two entries a byte along its last axis, the first in
    the low nibble: how `lax.bitcast_convert_type` unpacks them) and converted to int4 once, when done, since
    an in-place update of an int4 array is not one on every backend (XLA:CPU rewrites all of it for each
    slice); the conversion holds the leaf twice, at half a byte an entry."""

    def __init__(self, target: jax.ShapeDtypeStruct):
        self.target = target
        self.packed = quant.bits(target.dtype) == 4
        shape = (*target.shape[:-1], -(-target.shape[-1] // 2)) if self.packed else target.shape
        self.sharding = _packed_sharding(target.sharding, shape) if self.packed else target.sharding
        self.leaf = jnp.zeros(shape, np.uint8 if self.packed else target.dtype, device=self.sharding)

    def write(self, index: tuple[int, ...], host: np.ndarray) -> None:
        """Write `host` [*target.shape[len(index):]] at the stacked `index`; each device receives only what it
        holds of it (the slice is sharded as the leaf is past its stacked axes)."""
        if self.packed:
            host = _pack_int4(host)
        spec = jax.sharding.PartitionSpec(*self.sharding.spec[len(index):])
        piece = jax.make_array_from_callback(host.shape, jax.sharding.NamedSharding(self.sharding.mesh, spec),
                                             lambda shard: host[shard])
        self.leaf = _written(self.leaf, piece, index)

    def done(self) -> jax.Array:
        """The leaf, in its target's dtype and sharding."""
        leaf, self.leaf = self.leaf, None
        if not self.packed:
            return leaf
        return _unpacked_int4(leaf, self.target.shape[-1], self.target.sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _written(leaf: jax.Array, piece: jax.Array, index: tuple[int, ...]) -> jax.Array:
    """`leaf` with `piece` at its stacked `index`, updated in place (donated); the index is traced, so that every
    slice of a leaf runs one program."""
    return jax.lax.dynamic_update_slice(leaf, piece[(None,) * len(index)], (*index, *(0,) * piece.ndim))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpacked_int4(packed: jax.Array, n: int, sharding: jax.sharding.NamedSharding) -> jax.Array:
    """uint8 [..., ceil(n / 2)] (`_pack_int4`) -> int4 [..., n] in `sharding` (one program for the leaves of
    one shape and sharding, as w1 and w3)."""
    unpacked = jax.lax.bitcast_convert_type(packed, jnp.int4).reshape(*packed.shape[:-1], -1)[..., :n]
    return jax.lax.with_sharding_constraint(unpacked, sharding)


def _pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 [..., n] -> uint8 [..., ceil(n / 2)], two entries a byte, the first in the low nibble."""
    nibbles = q.view(np.uint8) & 0xF  # an int4 entry's byte holds it in its low nibble
    if nibbles.shape[-1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros_like(nibbles[..., :1])], axis=-1)
    return nibbles[..., 0::2] | nibbles[..., 1::2] << 4


def _packed_sharding(sharding: jax.sharding.NamedSharding, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
    """An int4 leaf's `sharding` for its bytes of `shape`: the same, except that the last axis is whole where
    the mesh axes that shard it do not divide its bytes."""
    spec = [*sharding.spec, *(None,) * (len(shape) - len(sharding.spec))]
    names = spec[-1] if isinstance(spec[-1], tuple) else (spec[-1],) if spec[-1] else ()
    if shape[-1] % math.prod(sharding.mesh.shape[name] for name in names):
        spec[-1] = None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
