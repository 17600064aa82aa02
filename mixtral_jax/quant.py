"""Int8 weight-only quantisation: symmetric, round to nearest, one float32 scale per output channel.

Legend: the quantised matrices are [..., in, out] (einsum layout): `in` is contracted, the scales span the
rest, [..., 1, out].

A model quantises its expert weights when its config says so (`ModelConfig.quantize = "int8"`: the MoE
block then holds int8 w1, w3, w2 and their scales, `ffn.scales.w1` ...; `Mixtral.quantize` makes such a
handle from a float one). A decode step reads a quarter of the expert bytes of float32, half of bfloat16;
Mixtral 8x7B's experts take 45 GB instead of 90 GB in bfloat16. Backends multiply the scales back where
they read the weights (the CPU backend multiplies few rows in int8 products).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

INT8_MAX = 127.0
CONTRACTED = -2  # the contracted axis of a weight [..., in, out]; its scales span the others


@jax.jit
def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weights [..., in, out] -> (int8 of the same shape, float32 scales [..., 1, out])."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=CONTRACTED, keepdims=True) / INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


class Int8(NamedTuple):
    """An int8 output-major weight q [out, in] with its float32 scales [out, 1], read as `dtype`."""

    q: jax.Array
    scale: jax.Array
    dtype: Any

    def dequantized(self) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(self.dtype)
