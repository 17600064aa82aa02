"""The built-in demo model: a small Mixtral trained from scratch on Python's standard library sources.

It ships as package data (`assets/demo/`: a Hugging Face folder with bfloat16 weights and its own 2048-piece
SentencePiece vocabulary) and is what the commands use when no checkpoint is given. `scripts/train_demo.py`
is its recipe.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import jax

from mixtral_jax import api
from mixtral_jax.errors import CheckpointError

NAME = "the built-in demo model (a 4-layer, 8-expert Mixtral trained on Python's standard library)"


def path() -> Path:
    """The folder of the demo model inside the installed package."""
    return Path(str(importlib.resources.files("mixtral_jax.assets").joinpath("demo")))


def load(dtype: str | None = None, mesh: jax.sharding.Mesh | str | None = None,
         backend: str | None = None, **options: Any) -> api.Mixtral:
    """The demo model's handle, computing in `dtype` (None: float32, as it is small and meant for CPU; it is
    stored in bfloat16), run by `backend` (None: the platform's); `options` are `api.load`'s (`quantize`,
    `quant_group`, `kv_cache_dtype`)."""
    folder = path()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: the demo model is not installed with this package")
    return api.load(folder, dtype=dtype or "float32", mesh=mesh, backend=backend, **options)
