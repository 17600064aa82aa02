"""Mixtral sparse mixture-of-experts models in JAX/Flax."""

from mixtral_jax.api import Mixtral, init_random, load
from mixtral_jax.config import ModelConfig, preset
from mixtral_jax.errors import MixtralError

__all__ = ["Mixtral", "ModelConfig", "MixtralError", "init_random", "load", "preset"]
