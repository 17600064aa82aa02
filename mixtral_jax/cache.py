"""The KV cache: a pytree that flows through the compiled decode loop.

Legend: L layers, B batch, S cache slots, K KV heads, H head dim.
Slot `s` holds the token at position `p` with `p % S == s`, so a sliding-window model keeps a bounded ring
buffer; `pos` records which position each slot holds (-1: empty) and drives the attention mask.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mixtral_jax import sharding as sh
from mixtral_jax.config import ModelConfig

CACHE_AXES = (sh.LAYERS, sh.BATCH, sh.CACHE_LENGTH, sh.ACT_KV_HEADS, sh.HEAD_DIM)


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    pos: jax.Array  # [B, S] int32

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, chunk: int = 1, dtype: str | None = None) -> KVCache:
        """Room for `max_len` positions; a sliding window needs only `window + chunk - 1` slots, where
        `chunk` is the longest number of tokens written in one forward pass."""
        slots = max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window + chunk - 1)
        shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, dtype or cfg.dtype)
        k = sh.constrain(zeros, CACHE_AXES)
        v = sh.constrain(zeros, CACHE_AXES)
        return cls(k=k, v=v, pos=jnp.full((batch, slots), -1, jnp.int32))

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
