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

import os
from pathlib import Path
from typing import NamedTuple

import jax
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
    slice is read in float32 and quantised on its own (`quant.quantize_slice`), so the host holds the
    quantised weights plus one slice; a reader without slices (a training OUTPUT) gives one whole weight."""

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
            q = np.empty(q_target.shape, q_target.dtype)
            scale = np.empty(s_target.shape, s_target.dtype)
            whole = None if self.slices else self._whole(path, q_target.shape)
            for index in quant.stacked_slices(self.cfg, path, q_target.shape):
                if whole is None:
                    q[index], scale[index] = self._slice(path, index)
                else:
                    q[index], scale[index] = quant.quantize_slice(self.cfg, path, whole[index])
            del whole
            out[path] = _placed(q, q_target)
            out[quant.scale_path(path)] = _placed(scale, s_target)
        return out

    def read(self, path: str, index: tuple[int, ...], dtype) -> np.ndarray:
        if path.rsplit(".", 2)[-2:-1] == ["scales"]:
            return self._slice(path.replace(".scales.", "."), index)[1]
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


def _placed(host: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    return jax.make_array_from_callback(target.shape, target.sharding, lambda index: host[index])
