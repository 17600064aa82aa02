"""RMSNorm, rotary embeddings and grouped-query attention, and the modes a forward pass runs in.

Legend: B batch, T length, S cache slots, D model dim, N query heads, K KV heads, H head dim.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import quant
from mixtral_jax import sharding as sh
from mixtral_jax.backends import Backend, LayerCache
from mixtral_jax.backends.reference import at_index
from mixtral_jax.config import ModelConfig


class Mode(enum.Enum):
    """What a forward pass does with the KV cache.

    TRAIN: no cache; the tokens attend to each other (training, scoring whole texts).
    PREFILL: the first chunk of prompts into an empty cache: the tokens attend to each other and are cached.
    EXTEND: a later chunk: it is cached and attends to everything cached up to it.
    DECODE: one new token per row: it is cached and attends to its row's cache.
    """

    TRAIN = "train"
    PREFILL = "prefill"
    EXTEND = "extend"
    DECODE = "decode"


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], dtype,
          init: nnx.Initializer = nnx.initializers.normal(0.02)) -> nnx.Param:
    """A parameter carrying its logical axis names (placed on the mesh later, not eagerly)."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class Scales(nnx.Module):
    """The float32 scales of a module's quantised weights, under the weights' names (`quant.py`)."""

    def __init__(self, **scales: nnx.Param):
        for name, scale in scales.items():
            setattr(self, name, scale)


def quantize_weights(module: nnx.Module, cfg: ModelConfig, names: tuple[str, ...], lead: int = 0) -> None:
    """Store the weights `names` of `module` (each [*lead axes, ...] with its contracted axes where
    `quant.CONTRACTED` says) in `cfg.quantize`'s format with their scales in `module.scales`; None when the
    config does not quantise or `names` is empty."""
    if cfg.quantize == "none" or not names:
        module.scales = None
        return
    scales = {}
    for name in names:
        weight = getattr(module, name)
        before, contracted = quant.CONTRACTED[name]
        first = lead + before
        q, scale = quant.quantize(weight[...], cfg.quantize, first, contracted, cfg.quant_group)
        setattr(module, name, weight.replace(value=q))
        axes = tuple(None if first <= i < first + contracted else a for i, a in enumerate(weight.out_sharding))
        scales[name] = nnx.Param(scale, out_sharding=axes, eager_sharding=False)
    module.scales = Scales(**scales)


def weight(module: nnx.Module, name: str, dtype) -> jax.Array | quant.QTensor:
    """The weight `name` of `module` read as `dtype`: an array, or a `quant.QTensor` when it is quantised
    (the backend's products multiply its scales back)."""
    w = getattr(module, name)[...]
    if module.scales is None:
        return w.astype(dtype)
    return quant.QTensor(w, getattr(module.scales, name)[...], dtype)


def _rows(w: jax.Array | quant.QTensor) -> jax.Array | quant.QTensor:
    """[N, H, D] -> [N * H, D] (a free reshape; a quantised weight's scales alike: their groups run in the
    same order)."""
    if isinstance(w, quant.QTensor):
        return w._replace(q=w.q.reshape(-1, w.q.shape[-1]), scale=w.scale.reshape(-1, w.scale.shape[-1]))
    return w.reshape(-1, w.shape[-1])


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = param(rngs, (cfg.dim,), (sh.EMBED,), cfg.param_dtype, nnx.initializers.ones)
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x [..., D] normalised in float32 like the reference, times `scale` [D], in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope(x: jax.Array, table: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout: x [B, T, heads, H] by a (sin, cos) table [B, T, 1, H]
    (`Backend.rope_table`)."""
    sin, cos = jnp.split(table, 2, axis=-1)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, dt = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        self.wq = param(rngs, (d, n, h), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), dt)
        self.wk = param(rngs, (d, k, h), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), dt)
        self.wv = param(rngs, (d, k, h), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), dt)
        self.wo = param(rngs, (n, h, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), dt)
        quantize_weights(self, cfg, ("wq", "wk", "wv", "wo"))
        self.head_dim = h
        self.theta = cfg.rope_theta
        self.window = cfg.sliding_window

    def __call__(self, x: jax.Array, positions: jax.Array, mode: Mode, backend: Backend,
                 kv: LayerCache | None = None, slots: jax.Array | None = None, slot_pos: jax.Array | None = None,
                 keep: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D] at positions [B, T] (-1: padding) -> ([B, T, D], the layer's cache after `mode`).

        With a cache (every mode but TRAIN), the tokens' keys and values go to `slots` [B, T] (out of range:
        dropped), and `slot_pos` [B, S] are the positions the slots hold after this pass. `keep` [B]: only the
        token at this index of each row queries (output [B, 1, D]); every token is still cached."""
        dtype = x.dtype
        table = backend.rope_table(positions, self.head_dim, self.theta)
        q_x, q_pos, q_table = x, positions, table
        if keep is not None:
            q_x, q_pos, q_table = at_index(x, keep), at_index(positions, keep), at_index(table, keep)
        q = rope(backend.dense("BTD,DNH->BTNH", q_x, weight(self, "wq", dtype)), q_table)
        k = rope(backend.dense("BTD,DKH->BTKH", x, weight(self, "wk", dtype)), table)
        v = backend.dense("BTD,DKH->BTKH", x, weight(self, "wv", dtype))
        q = sh.constrain(q, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.HEAD_DIM))
        match mode:
            case Mode.TRAIN:
                out = backend.self_attention(q, q_pos, k, v, positions, self.window)
            case Mode.PREFILL:
                out, kv = backend.prefill_attention(q, q_pos, k, v, positions, kv, slots, slot_pos, self.window)
            case Mode.EXTEND:
                out, kv = backend.extend_attention(q, q_pos, k, v, positions, kv, slots, slot_pos, self.window)
            case Mode.DECODE:
                out, kv = backend.decode_attention(q, q_pos, k, v, positions, kv, slots, slot_pos, self.window)
        return backend.dense("BTX,XD->BTD", out, _rows(weight(self, "wo", dtype))), kv
