"""The KV cache: a pytree that flows through the compiled decode loop.

Legend: L layers, B batch, K KV heads, S cache slots, H head dim.
Slot `s` holds the token at position `p` with `p % S == s`, so a sliding-window model keeps a bounded ring
buffer; `pos` records which position each slot holds (-1: empty) and drives the attention mask. With the
split layer layout (`layout.py`) keys and values are L separate buffers, so each layer writes its own in
place instead of a slice of one stacked array (which XLA:CPU copies). Keys are [B, K, H, S] and values
[B, K, S, H]: the attention's batched matmuls (`layers.attend`) read both where they lie, scores and
outputs contracting the head dim and the slots as laid out.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mixtral_jax import sharding as sh
from mixtral_jax.config import ModelConfig

K_AXES = (sh.LAYERS, sh.BATCH, sh.ACT_KV_HEADS, sh.HEAD_DIM, sh.CACHE_LENGTH)
V_AXES = (sh.LAYERS, sh.BATCH, sh.ACT_KV_HEADS, sh.CACHE_LENGTH, sh.HEAD_DIM)


@flax.struct.dataclass
class KVCache:
    k: jax.Array | tuple[jax.Array, ...]  # [L, B, K, H, S], or L arrays [B, K, H, S] (per_layer)
    v: jax.Array | tuple[jax.Array, ...]  # [L, B, K, S, H], or L arrays [B, K, S, H]
    pos: jax.Array  # [B, S] int32

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, chunk: int = 1, dtype: str | None = None,
               per_layer: bool = False) -> KVCache:
        """Room for `max_len` positions; a sliding window needs only `window + chunk - 1` slots, where
        `chunk` is the longest number of tokens written in one forward pass. Per-layer buffers (the split
        layout: XLA:CPU) of a 16-bit model default to float32, which holds its keys and values exactly:
        XLA:CPU widens a 16-bit buffer whole to float32 for each write into it (scatter or update-slice),
        three cache copies a decode step."""
        if dtype is None:
            dtype = jnp.float32 if per_layer and jnp.dtype(cfg.dtype).itemsize == 2 else cfg.dtype
        slots = max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window + chunk - 1)
        k_shape = (batch, cfg.n_kv_heads, cfg.head_dim, slots)
        v_shape = (batch, cfg.n_kv_heads, slots, cfg.head_dim)

        def zeros(shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array | tuple[jax.Array, ...]:
            if per_layer:
                return tuple(sh.constrain(jnp.zeros(shape, dtype), axes[1:]) for _ in range(cfg.n_layers))
            return sh.constrain(jnp.zeros((cfg.n_layers, *shape), dtype), axes)

        return cls(k=zeros(k_shape, K_AXES), v=zeros(v_shape, V_AXES), pos=jnp.full((batch, slots), -1, jnp.int32))

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    def slot_index(self, positions: jax.Array) -> jax.Array:
        """Positions [B, T] -> slots [B, T]; negative positions (padding) map out of range and are dropped."""
        return jnp.where(positions >= 0, positions % self.slots, self.slots)

    def with_positions(self, positions: jax.Array) -> KVCache:
        """The slot positions after writing tokens at `positions` [B, T]."""
        batch = jnp.arange(positions.shape[0])[:, None]
        pos = self.pos.at[batch, self.slot_index(positions)].set(positions, mode="drop")
        return self.replace(pos=pos)
