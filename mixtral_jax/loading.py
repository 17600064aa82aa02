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

from mixtral_jax import checkpoint, trained
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
