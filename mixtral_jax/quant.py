"""Weight-only quantisation: symmetric, round to nearest, float32 scales; and the int8 KV cache's rounding.

Formats (`ModelConfig.quantize`):
- `int8`: one scale per output channel (the scale spans every contracted axis);
- `int4` (`jnp.int4`, values -7..7): one scale per group of `ModelConfig.quant_group` consecutive entries
  along the contracted axes (flattened: `wo`'s N x H rows form groups across heads when a head is shorter
  than a group).

Every large matrix is quantised: the attention projections, the experts (or a dense model's MLP); the
norms and router keep their dtype, and so do the embedding table and LM head unless
`ModelConfig.quantize_vocab`: then the LM head [D, V] has a scale per vocabulary entry (int8) or per group
along D (int4), as the other weights do, and the embedding table [V, D] a scale per row (int8) or per group
of a row (int4), so that a gathered row comes with its scales (and the tied head [V, D] reads them as its
output channels' scales). A quantised module stores its weights under their usual names, in int8 or int4
with the same shape and logical axes, and their scales in a `scales` submodule (`layers.attn.scales.wq`,
`layers.ffn.scales.w1`, `scales.embedder` ...): the scales have the weight's rank, each contracted axis
shrunk to its number of groups, and keep the weight's axis names except on those axes, which are replicated
(they are 1/group of the weight's rows at most).

`dequantize` multiplies the scales back for any shapes of that kind, so the same code reads the checkpoint
layout ([..., in, out]) and the CPU backend's output-major matrices ([out, in]). Weights are quantised
while a checkpoint is converted or loaded (`convert --quantize`, `load(..., quantize=...)`), never after.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import QUANTIZE, ModelConfig, stacked_axes
from mixtral_jax.errors import ConfigError

LEVELS = {"int8": 127.0, "int4": 7.0}
STORAGE = {"int8": jnp.int8, "int4": jnp.int4}
SCALE_DTYPE = jnp.float32
# Where each quantised weight's contracted axes lie past its stacked (layer, expert) axes: (the axes before
# them, how many). The embedding table [V, D] contracts D after its vocabulary axis.
CONTRACTED = {"wq": (0, 1), "wk": (0, 1), "wv": (0, 1), "wo": (0, 2), "w1": (0, 1), "w3": (0, 1), "w2": (0, 1),
              "embedder": (1, 1), "lm_head": (0, 1)}
VOCAB_WEIGHTS = ("embedder", "lm_head")  # quantised with `ModelConfig.quantize_vocab`


def quantized_config(cfg: ModelConfig, quantize: str | None, quant_group: int | None,
                     source: str | os.PathLike = "the checkpoint", vocab: bool = False) -> ModelConfig:
    """`cfg` with its large matrices in `quantize`'s format (groups of `quant_group`, None: 128), and with
    `vocab` its embedding table and LM head too; a ConfigError for an unknown format, `vocab` without one, a
    group that does not divide the weights, or weights that are quantised already."""
    if vocab and quantize in (None, "none"):
        raise ConfigError("quantising the embeddings and LM head (--quantize-vocab) needs --quantize int8 or int4")
    if quantize not in QUANTIZE[1:]:
        raise ConfigError(f"unknown quantisation {quantize!r}; known: {', '.join(QUANTIZE[1:])}")
    if cfg.quantize != "none":
        raise ConfigError(f"{source}: its weights are already quantised ({cfg.quantize}); load it without "
                           "quantising")
    if quant_group is not None and quantize != "int4":
        raise ConfigError(f"a group size applies to int4 only, not {quantize}")
    return cfg.replace(quantize=quantize, quant_group=quant_group or ModelConfig.quant_group, quantize_vocab=vocab)


def is_quantized(cfg: ModelConfig, path: str) -> bool:
    """Whether the checkpoint-layout parameter `path` (`layers.attn.wq`) is a quantised weight under `cfg`."""
    if cfg.quantize == "none":
        return False
    if path in VOCAB_WEIGHTS:
        return cfg.quantize_vocab
    return path.startswith("layers.") and ".scales." not in path and path.rsplit(".", 1)[-1] in CONTRACTED


def scale_path(path: str) -> str:
    """The path of a quantised weight's scales: `layers.attn.wq` -> `layers.attn.scales.wq`, `embedder` ->
    `scales.embedder`."""
    parent, _, name = path.rpartition(".")
    return f"{parent}.scales.{name}" if parent else f"scales.{name}"


def weight_path(path: str) -> str:
    """The path of the weight whose scales are at `path` (`scale_path`'s inverse)."""
    parent, _, name = path.rpartition(".")
    return f"{parent.removesuffix('scales')}{name}"


def quantize_slice(cfg: ModelConfig, path: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (layer) or (layer, expert) slice of the weight `path` (an unstacked one whole) in `cfg.quantize`'s
    format: (q, scales) as host arrays. Loading and converting both quantise through here, so they store the
    same values."""
    lead, contracted = CONTRACTED[path.rsplit(".", 1)[-1]]
    q, scale = quantize(jnp.asarray(w), cfg.quantize, lead, contracted, cfg.quant_group)
    return np.asarray(q), np.asarray(scale)


def stacked_slices(cfg: ModelConfig, path: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The (layer) or (layer, expert) indices a weight of `shape` is quantised slice by slice over (`[()]`: an
    unstacked weight, whole)."""
    return list(itertools.product(*map(range, shape[:stacked_axes(cfg, path)])))


class QTensor(NamedTuple):
    """A quantised weight q with its float32 scales (the weight's rank, contracted axes shrunk to their
    groups), read as `dtype`."""

    q: jax.Array
    scale: jax.Array
    dtype: Any

    def dequantized(self) -> jax.Array:
        return dequantize(self.q, self.scale, self.dtype)

    def astype(self, dtype) -> QTensor:
        """The same weight read as `dtype` (as an array's `astype`, for code that takes either)."""
        return self._replace(dtype=dtype)

    @property
    def T(self) -> QTensor:
        """A matrix transposed, its scales alike."""
        return QTensor(self.q.T, self.scale.T, self.dtype)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """q times its scales, each scale broadcast over the entries of its group, in `dtype`. Each grouped axis
    is split into (groups, entries) rather than the scales repeated, which XLA:CPU fuses into a slower loop."""
    q_shape, s_shape = [], []
    for n, s in zip(q.shape, scale.shape):
        q_shape += [s, n // s] if n != s else [n]
        s_shape += [s, 1] if n != s else [s]
    grouped = q.astype(jnp.float32).reshape(q_shape) * scale.reshape(s_shape)
    return grouped.reshape(q.shape).astype(dtype)


def group_shape(contracted: tuple[int, ...], group: int) -> tuple[int, ...]:
    """The contracted axes' sizes in the scales: their N / group groups (flattened in order) laid out over
    the same axes, the last axes first."""
    shape = []
    for size in reversed(contracted):
        if group >= size:
            shape.append(1)
            group //= size
        else:
            shape.append(size // group)
            group = 1
    return tuple(reversed(shape))


@functools.partial(jax.jit, static_argnames=("fmt", "lead", "contracted", "group"))
def quantize(w: jax.Array, fmt: str, lead: int, contracted: int, group: int) -> tuple[jax.Array, jax.Array]:
    """Weights [*lead axes, *contracted axes, *output axes] -> (q of the same shape in `fmt`'s storage
    dtype, float32 scales of `scale_shape`). int8: a scale per output channel; int4: per `group` entries."""
    w = w.astype(jnp.float32)
    shape = w.shape
    csizes = shape[lead:lead + contracted]
    n = math.prod(csizes)
    g = n if fmt == "int8" else group
    grouped = w.reshape(shape[:lead] + (n // g, g) + shape[lead + contracted:])
    levels = LEVELS[fmt]
    scale = jnp.max(jnp.abs(grouped), axis=lead + 1, keepdims=True) / levels
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(grouped / scale), -levels, levels).astype(STORAGE[fmt]).reshape(shape)
    return q, scale.reshape(scale_shape(shape, fmt, lead, contracted, group)).astype(SCALE_DTYPE)


def scale_shape(shape: tuple[int, ...], fmt: str, lead: int, contracted: int, group: int) -> tuple[int, ...]:
    csizes = tuple(shape[lead:lead + contracted])
    groups = (1,) * contracted if fmt == "int8" else group_shape(csizes, group)
    return tuple(shape[:lead]) + groups + tuple(shape[lead + contracted:])


def bits(dtype) -> int:
    """Bits of one entry of `dtype` (int4: 4)."""
    return jax.dtypes.itemsize_bits(jnp.dtype(dtype))


# ---- the int8 KV cache ------------------------------------------------------------------------------------


def quantize_kv(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Keys or values -> (int8, float32 scales with `axis` (the head dim) dropped): one scale per token and
    KV head."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / LEVELS["int8"]
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / scale), -LEVELS["int8"], LEVELS["int8"]).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis)


def dequantize_kv(q: jax.Array, scale: jax.Array, axis: int, dtype) -> jax.Array:
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axis)).astype(dtype)
