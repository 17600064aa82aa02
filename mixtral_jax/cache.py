"""The KV cache: a pytree that flows through the compiled decode loop.

Legend: B batch, T length, S cache slots.

Slot `s` holds the token at position `p` with `p % S == s`, so a sliding-window model keeps a bounded ring
buffer; `pos` records which position each slot holds (-1: empty) and drives the attention mask. The keys
and values themselves are the backend's (`Backend.new_cache`): their layout, dtype, and whether the layers
share one stacked buffer or hold one each.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mixtral_jax.backends import Backend, LayerCache
from mixtral_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    kv: LayerCache  # every layer's keys and values, as the backend holds them
    pos: jax.Array  # [B, S] int32

    @classmethod
    def create(cls, cfg: ModelConfig, backend: Backend, batch: int, max_len: int, chunk: int = 1) -> KVCache:
        """Room for `max_len` positions; a sliding window needs only `window + chunk - 1` slots, where
        `chunk` is the longest number of tokens written in one forward pass."""
        slots = max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window + chunk - 1)
        return cls(kv=backend.new_cache(cfg, batch, slots), pos=jnp.full((batch, slots), -1, jnp.int32))

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
