"""RMSNorm, rotary embeddings and grouped-query attention.

Legend: B batch, T length, S cache length, D model dim, N query heads, K KV heads, G query heads per KV
head (N = K * G), H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import layout
from mixtral_jax import sharding as sh
from mixtral_jax.config import ModelConfig

MASKED = float(jnp.finfo(jnp.float32).min)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], dtype: str,
          init: nnx.Initializer = nnx.initializers.normal(0.02)) -> nnx.Param:
    """A parameter carrying its logical axis names (placed on the mesh later, not eagerly)."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = param(rngs, (cfg.dim,), (sh.EMBED,), cfg.param_dtype, nnx.initializers.ones)
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D], normalised in float32 like the reference."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def at_index(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, T, ...] at index [B] of each row -> [B, 1, ...]."""
    return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


def dense(spec: str, x: jax.Array, w: jax.Array, dtype=None) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for x [B, T, ...], accumulated in float32 and returned in `dtype` (default
    x's): XLA:CPU widens the weights of a bfloat16 product with a bfloat16 result to float32 on every call.
    A lone bfloat16 row runs as two (`layout.lone_bf16_row`)."""
    if layout.lone_bf16_row(x.shape[0] * x.shape[1], x.dtype):
        return dense(spec, jnp.concatenate([x, x]), w, dtype)[:1]
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(dtype or x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the half-split layout ([B, T, heads, H], positions [B, T])."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T] query and [B, S] key positions -> [B, T, S] bool; key position -1 marks an empty slot."""
    q, k = q_pos[:, :, None], kv_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, T, N, H], k/v [B, K, S, H], mask [B, T, S] -> [B, T, N, H]; softmax in float32."""
    b, t, n, h = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * h**-0.5
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, dt = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        self.wq = param(rngs, (d, n, h), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), dt)
        self.wk = param(rngs, (d, k, h), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), dt)
        self.wv = param(rngs, (d, k, h), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), dt)
        self.wo = param(rngs, (n, h, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), dt)
        self.theta = cfg.rope_theta
        self.window = cfg.sliding_window

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        slots: jax.Array | None = None,
        slot_pos: jax.Array | None = None,
        keep: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D] at positions [B, T] -> ([B, T, D], updated kv).

        Without a cache, tokens attend to each other. With one (k, v [B, K, S, H]), the new keys are
        written at `slots` [B, T] (out-of-range slots are dropped) and queries attend to every slot,
        whose positions after the write are `slot_pos` [B, S]. `keep` [B]: every token writes its key and
        value, but only the one at this index of each row queries (output [B, 1, D]).
        """
        dtype = x.dtype
        q_x, q_pos = x, positions
        if keep is not None:
            q_x, q_pos = at_index(x, keep), at_index(positions, keep)
        q = rope(dense("BTD,DNH->BTNH", q_x, self.wq[...].astype(dtype)), q_pos, self.theta)
        k = rope(dense("BTD,DKH->BTKH", x, self.wk[...].astype(dtype)), positions, self.theta)
        v = dense("BTD,DKH->BTKH", x, self.wv[...].astype(dtype))
        q = sh.constrain(q, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.HEAD_DIM))
        if kv is None:
            keys, values, kv_pos = k.swapaxes(1, 2), v.swapaxes(1, 2), positions
        else:
            batch = jnp.arange(x.shape[0])[:, None]  # with slots [B, T], indexes [B, T, K, H] of [B, K, S, H]
            kv = tuple(c.at[batch, :, slots].set(new.astype(c.dtype), mode="drop") for c, new in zip(kv, (k, v)))
            keys, values, kv_pos = kv[0].astype(dtype), kv[1].astype(dtype), slot_pos
        out = attend(q, keys, values, attention_mask(q_pos, kv_pos, self.window))
        return dense("BTNH,NHD->BTD", out, self.wo[...].astype(dtype)), kv
