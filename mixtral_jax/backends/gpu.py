"""The GPU backend: the reference, with `jax.nn.dot_product_attention` (cuDNN's flash attention) where its
conditions hold.

Legend: B batch, T length, S cache slots, N query heads, K KV heads, H head dim.

cuDNN's fused attention takes 16-bit q, k, v [B, T, N/K, H] with head dims a multiple of 8 up to 128 and
masks given as lengths: tokens attending to each other (training, a first prefill chunk: causal, right
padding as lengths) and a decode step over the cache, which is held token-major [B, S, K, H] (the
reference's layout) so that the kernel reads it in place, each row seeing its slots 0..position. Elsewhere
(a later prefill chunk, a sliding window's ring buffer in decode, 32-bit models) the reference's XLA
attention runs. The experts use `jax.lax.ragged_dot`, as the reference does. Not yet measured on a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mixtral_jax import sharding as sh
from mixtral_jax.backends import reference


@dataclasses.dataclass(frozen=True)
class GpuBackend(reference.Backend):
    """GPU. `cudnn`: whether `jax.nn.dot_product_attention` runs cuDNN's kernel (on a GPU) or XLA's (tests)."""

    cudnn: bool = True
    name: ClassVar[str] = "gpu"

    def describe(self) -> str:
        return "gpu (" + ("cuDNN" if self.cudnn else "XLA") + " fused attention, ragged_dot experts)"

    def _fused(self, q: jax.Array) -> bool:
        """Whether the fused kernel takes these queries: 16-bit (cuDNN's; XLA's takes any), a head dim it
        supports, and (for its partitioner) query and KV heads split over the same mesh axes."""
        h = q.shape[-1]
        return ((q.dtype.itemsize == 2 or not self.cudnn) and h % 8 == 0 and h <= 128
                and sh.mesh_axes(sh.ACT_HEADS) == sh.mesh_axes(sh.ACT_KV_HEADS))

    def self_attention(self, q, q_pos, k, v, positions, window):
        if not self._fused(q) or q.shape[1] != k.shape[1]:  # queries at some positions only: the mask form
            return super().self_attention(q, q_pos, k, v, positions, window)
        return self._causal(q, k, v, positions, window)

    def prefill_attention(self, q, q_pos, k, v, positions, kv, slots, slot_pos, window):
        if not self._fused(q) or q.shape[1] != k.shape[1]:
            return super().prefill_attention(q, q_pos, k, v, positions, kv, slots, slot_pos, window)
        return self._causal(q, k, v, positions, window), self.write(kv, k, v, slots)

    def decode_attention(self, q, q_pos, k, v, positions, kv, slots, slot_pos, window):
        if not self._fused(q) or window is not None:  # a ring buffer's slots are not in position order
            return super().decode_attention(q, q_pos, k, v, positions, kv, slots, slot_pos, window)
        kv = self.write(kv, k, v, slots)
        seen = jnp.maximum(q_pos[:, 0] + 1, 1).astype(jnp.int32)  # slots 0..position; a finished row reads one
        b, t, n, h = q.shape
        k_all, v_all = (a.astype(q.dtype) for a in self.read(kv, q.dtype))
        out = jax.nn.dot_product_attention(
            q, k_all, v_all, query_seq_lengths=jnp.ones((b,), jnp.int32),
            key_value_seq_lengths=seen, implementation=self._implementation())
        return out.reshape(b, t, n * h), kv

    def _causal(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                window: int | None) -> jax.Array:
        """Causal attention of q [B, T, N, H] over k, v [B, T, K, H]; each row's positions [B, T] count 0, 1,
        ... up to its length, then -1 (right padding), as generate, score and training pass them."""
        b, t, n, h = q.shape
        lengths = jnp.maximum(jnp.sum(positions >= 0, axis=1), 1).astype(jnp.int32)  # a padding row reads one
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=None if window is None else (window - 1, 0), implementation=self._implementation())
        return out.reshape(b, t, n * h)

    def _implementation(self) -> str:
        return "cudnn" if self.cudnn else "xla"
