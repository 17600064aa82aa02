"""Mixtral sparse mixture-of-experts models in JAX/Flax.

The public names are imported on first use, so that `import mixtral_jax.cli` (the command's start, where a
Ctrl-C must still end quietly) does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral, init_random, load
    from mixtral_jax.config import ModelConfig, preset
    from mixtral_jax.errors import MixtralError
    from mixtral_jax.tokenizer import StreamDecoder, Tokenizer

_HOMES = {
    "Mixtral": "api", "init_random": "api", "load": "api", "ModelConfig": "config", "preset": "config",
    "MixtralError": "errors", "StreamDecoder": "tokenizer", "Tokenizer": "tokenizer",
}
__all__ = ["Mixtral", "MixtralError", "ModelConfig", "StreamDecoder", "Tokenizer", "init_random", "load", "preset"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
