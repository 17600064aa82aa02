"""The runtime layout of the weights for inference: stacked (scanned) or split into whole buffers.

Legend: L layers, E experts, M rows, D model dim, V vocab.

XLA:CPU copies any slice of an array before a matmul reads it, so on CPU a scan over stacked [L, ...]
weights and experts picked out of [E, D, F] copy every weight a step reads: a decode step moves each byte
three times instead of once. The split layout holds each layer's weights, and each expert's, in buffers of
their own (the expert matrices and their int8 scales become tuples of E output-major arrays): the layers
run unrolled and every matmul reads its weights where they lie. The LM head is held output-major too
([V, D]): XLA:CPU multiplies a few rows (a decode batch) by an output-major matrix up to twice as fast in
column form (`times`). Stacked stays the public format (checkpoints, training, export, quantisation, expert
parallelism); a model handle makes its split copy once, for inference.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import quant
from mixtral_jax.config import ModelConfig
from mixtral_jax.errors import MixtralError

EXPERT_WEIGHTS = ("w1", "w3", "w2")
SPLIT_FROM_BYTES = 64 << 20  # `auto` splits layer weights from this size on (twice a large L3 cache)
ROW_FORM_FROM = 128  # `times` multiplies this many rows and more in row form (AMD host: 9-10% faster at 128-192)
INT8_ROWS = 8  # `times` multiplies int8 weights (`quant.Int8`) by up to this many rows in int8 products


class Split(NamedTuple):
    layers: tuple[nnx.State, ...]  # one state per layer (`split`)
    head: jax.Array | None  # the LM head output-major [V, D]; None with tied embeddings (already [V, D])


def use_split(cfg: ModelConfig, mesh: jax.sharding.Mesh | None, layer_bytes: int) -> bool:
    """`layout` auto: split on one CPU device once the layer weights (`layer_bytes`) outgrow the caches
    (smaller ones are copied cheaply, and the unrolled program takes longer to compile); stacked on
    accelerators and on meshes of several devices (expert parallelism needs the experts stacked)."""
    devices = 1 if mesh is None else mesh.devices.size
    if cfg.layout == "split" and devices > 1:
        raise MixtralError("layout 'split' runs on a single device; use 'stacked' or 'auto' on a mesh")
    if cfg.layout == "auto":
        return (devices == 1 and layer_bytes >= SPLIT_FROM_BYTES
                and (jax.devices() if mesh is None else mesh.devices.flat)[0].platform == "cpu")
    return cfg.layout == "split"


def split(cfg: ModelConfig, params: nnx.State) -> Split:
    """A model's stacked layer weights (leaves [L, ...]) -> one state per layer, each leaf its own buffer; a
    MoE model's expert leaves ([E, in, out] in a layer, int8 scales [E, 1, out]) become tuples of E
    output-major buffers ([out, in], [out, 1]), as does the LM head."""

    def is_expert(path: tuple) -> bool:
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return cfg.is_moe and keys[0] == "ffn" and keys[-1] in EXPERT_WEIGHTS

    def leaf(path: tuple, x: jax.Array) -> tuple:
        return tuple(expert_buffers(p) for p in _unstack(x)) if is_expert(path) else _unstack(x)

    per_leaf = jax.tree_util.tree_map_with_path(leaf, params["layers"])  # each leaf: L parts
    layers = tuple(jax.tree.map(lambda parts, i=i: parts[i], per_leaf, is_leaf=lambda v: isinstance(v, tuple))
                   for i in range(cfg.n_layers))
    return Split(layers, None if cfg.tie_embeddings else params["lm_head"].get_value().T)


def times(x: jax.Array, w: jax.Array | quant.Int8, dtype=None) -> jax.Array:
    """x [M, in] times an output-major w [out, in] -> [M, out], accumulated in float32 (as `layers.dense`)
    and returned in `dtype` (default x's): few rows in column form (w @ x.T, the output transposed after a
    barrier, which XLA would fold into row form), many in row form; a lone bfloat16 row as two
    (`lone_bf16_row`). Int8 weights meet up to INT8_ROWS rows in int8 products (`quant.int8_times`), more
    dequantised."""
    dtype = dtype or x.dtype
    if isinstance(w, quant.Int8):
        if len(x) <= INT8_ROWS:
            return quant.int8_times(x, w).astype(dtype)
        w = w.dequantized()
    if lone_bf16_row(len(x), x.dtype):
        return times(jnp.concatenate([x, x]), w, dtype)[:1]
    if len(x) >= ROW_FORM_FROM:
        return jnp.einsum("MI,OI->MO", x, w, preferred_element_type=jnp.float32).astype(dtype)
    column = jnp.einsum("OI,MI->OM", w, x, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(column).T.astype(dtype)


def cast(w: jax.Array | quant.Int8, dtype) -> jax.Array | quant.Int8:
    """A weight read as `dtype` (int8 ones stay int8, dequantised to it where multiplied)."""
    return w._replace(dtype=dtype) if isinstance(w, quant.Int8) else w.astype(dtype)


def dense(w: jax.Array | quant.Int8) -> jax.Array:
    """A weight as an array (int8 ones dequantised)."""
    return w.dequantized() if isinstance(w, quant.Int8) else w


def lone_bf16_row(rows: int, dtype) -> bool:
    """Whether a product of `rows` rows should run on them doubled: XLA:CPU multiplies a single bfloat16
    row by a matrix in a generic loop (2 GB/s of weights, against 31 GB/s for two rows on an AMX CPU)."""
    return rows == 1 and dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


@functools.cache
def cpu_bf16() -> str | None:
    """How this CPU multiplies bfloat16, from `/proc/cpuinfo`: `amx` (AMX tiles, Intel Xeon from Sapphire
    Rapids on: XLA:CPU's bfloat16 products 4-6x faster than float32 ones), `avx512` (AVX512_BF16 dot
    products, AMD from Zen 4 on: 2-3.5x faster from tens of rows on, slower for a few rows), or None
    (XLA:CPU widens bfloat16 products, slower than float32 ones)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return "amx" if "amx_bf16" in flags else "avx512" if "avx512_bf16" in flags else None


@jax.jit
def expert_buffers(w: jax.Array) -> tuple[jax.Array, ...]:
    """Stacked experts [E, in, out] -> E output-major buffers [out, in]."""
    return tuple(w[i].T for i in range(w.shape[0]))


@jax.jit
def _unstack(x: jax.Array) -> tuple[jax.Array, ...]:
    """[N, ...] -> N arrays [...] in buffers of their own."""
    return tuple(x[i] for i in range(x.shape[0]))
