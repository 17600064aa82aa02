"""RMSNorm, rotary embeddings and grouped-query attention.

Legend: B batch, T length, S cache length, D model dim, N query heads, K KV heads, G query heads per KV
head (N = K * G), H head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import layout
from mixtral_jax import sharding as sh
from mixtral_jax.config import ModelConfig

MASKED = float(jnp.finfo(jnp.float32).min)
# A prefill chunk attends to the cache in blocks of this many slots, up to its last position (`attend_blocks`).
KEY_BLOCK = 256
MIN_KEY_BLOCK = KEY_BLOCK // 4  # the smallest block `key_block` takes; caches without such blocks: one pass


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


def rope_table(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """Positions [B, T] -> their rotary (sin, cos) [B, T, 1, H] float32, for `rope`.

    The table is read through a gather by token: fused into the products' consumers, XLA:CPU computed the
    sines and cosines again for every head and half (0.5 against 3.8 ms for a layer's queries and keys at
    1k tokens)."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32).reshape(-1, 1) * inv_freq  # [B * T, H/2]
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return table[jnp.arange(len(table))].reshape(positions.shape + (1, head_dim))


def rope(x: jax.Array, table: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout: x [B, T, heads, H] by `rope_table` [B, T, 1, H]."""
    sin, cos = jnp.split(table, 2, axis=-1)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T] query and [B, S] key positions -> [B, T, S] bool; key position -1 marks an empty slot."""
    q, k = q_pos[:, :, None], kv_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def attend(q: jax.Array, parts: Sequence[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """q [B, T, N, H] over parts of keys and values, each (k [B, K, H, S_i], v [B, K, S_i, H], mask
    [B, T, S_i]), as over their concatenation -> [B, T, N * H]; one softmax over all parts, in float32.

    Each KV head's G query heads and T rows form Q = G * T rows, so scores [B, K, Q, S] come out of the
    products in the layout the softmax reads: with T and S apart XLA:CPU transposed every chunk's scores
    (2.5x the attention's time at 1k tokens). A single query row (decode) takes the same batched matmuls,
    which read the cache in place: 1.5-1.6x faster than multiplying and summing (batch 8, 1,536 slots)."""
    rows = _query_rows(q, parts[0][0].shape[1])
    probs = jax.nn.softmax(jnp.concatenate([_scores(rows, k, mask) for k, _, mask in parts], axis=-1), axis=-1)
    out, start = 0, 0
    for _, v, _ in parts:
        out = out + _weighted(probs[..., start:start + v.shape[2]], v)
        start += v.shape[2]
    return _heads(out, q)


def attend_blocks(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, slot_pos: jax.Array,
                  window: int | None, block: int | None = None) -> jax.Array:
    """`attend(q, [(k, v, mask)])` over a cache (k [B, K, H, S], v [B, K, S, H], slot positions [B, S]) in
    blocks of `block` slots (default `key_block(S)`), with a running softmax, and only up to the slot of the
    last query position q_pos [B, T] (all S slots once positions pass S): a prefill chunk skips the slots
    after it. A cache without such blocks is scored in one pass."""
    slots = k.shape[-1]
    block = block or key_block(slots)
    if block is None:
        return attend(q, [(k, v, attention_mask(q_pos, slot_pos, window))])
    rows = _query_rows(q, k.shape[1])
    n_blocks = jnp.clip(jnp.max(q_pos) // block + 1, 1, slots // block)

    def body(j, carry):  # running max m and sum l [B, K, Q, 1], output acc [B, K, Q, H], all float32
        m, l, acc = carry
        start = j * block
        mask = attention_mask(q_pos, jax.lax.dynamic_slice_in_dim(slot_pos, start, block, axis=1), window)
        s = _scores(rows, jax.lax.dynamic_slice_in_dim(k, start, block, axis=3), mask)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)  # masked scores (MASKED) give 0 once a row has seen a key
        scale = jnp.exp(m - m_new)
        acc = acc * scale + _weighted(p, jax.lax.dynamic_slice_in_dim(v, start, block, axis=2))
        return m_new, l * scale + jnp.sum(p, axis=-1, keepdims=True), acc

    m = jnp.full(rows.shape[:-1] + (1,), MASKED, jnp.float32)
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, (m, jnp.zeros_like(m), jnp.zeros(rows.shape, jnp.float32)))
    return _heads(acc / l, q)


def uses_dot_product(impl: str, dtype, head_dim: int) -> bool:
    """Whether tokens attending to each other go through `dot_product` for the `attention_impl` `impl`. `auto`
    takes it on GPU for 16-bit models with head dims cuDNN's flash attention takes (a multiple of 8, at most
    128) and query and KV heads on the same mesh axes (its partitioner needs q, k and v sharded alike)."""
    if impl == "auto":
        return (jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 and head_dim % 8 == 0
                and head_dim <= 128 and sh.mesh_axes(sh.ACT_HEADS) == sh.mesh_axes(sh.ACT_KV_HEADS))
    return impl == "dot_product"


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, window: int | None) -> jax.Array:
    """Causal attention of q [B, T, N, H] over k, v [B, T, K, H] by `jax.nn.dot_product_attention`: cuDNN's
    flash attention for 16-bit inputs on GPU (causal and padding masks from lengths, no score matrix in
    memory), XLA's elsewhere. Each row's positions [B, T] must count 0, 1, ... up to its length, then -1
    (right padding), as `generate`, `score`, `Mixtral.logits` and training pass them -> [B, T, N * H]."""
    b, t, n, h = q.shape
    lengths = jnp.maximum(jnp.sum(positions >= 0, axis=1), 1).astype(jnp.int32)  # a padding row reads its first key
    cudnn = jax.default_backend() == "gpu" and q.dtype.itemsize == 2
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn" if cudnn else "xla")
    return out.reshape(b, t, n * h)


def key_block(slots: int) -> int | None:
    """The block size `attend_blocks` takes over S slots: the largest power of two dividing S, at most
    KEY_BLOCK; None (one pass over all slots) when S holds fewer than two such blocks or they are small."""
    block = min(KEY_BLOCK, slots & -slots)
    return block if block >= MIN_KEY_BLOCK and slots >= 2 * block else None


def _query_rows(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, T, N, H] -> [B, K, Q, H], Q = G * T (G-major)."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, h)


def _scores(rows: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled scores [B, K, Q, S] float32 of rows [B, K, Q, H] against k [B, K, H, S]; MASKED off mask
    [B, T, S]."""
    qk = jnp.einsum("BKQH,BKHS->BKQS", rows, k, preferred_element_type=jnp.float32)
    mask = jnp.tile(mask, (1, rows.shape[2] // mask.shape[1], 1))  # [B, Q, S]
    return jnp.where(mask[:, None], qk * rows.shape[-1] ** -0.5, MASKED)


def _weighted(p: jax.Array, v: jax.Array) -> jax.Array:
    """Probabilities p [B, K, Q, S] float32 times v [B, K, S, H] -> [B, K, Q, H] float32."""
    return jnp.einsum("BKQS,BKSH->BKQH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _heads(out: jax.Array, q: jax.Array) -> jax.Array:
    """out [B, K, Q, H] float32 for q [B, T, N, H] -> [B, T, N * H] in q's dtype."""
    b, t, n, h = q.shape
    return out.reshape(b, out.shape[1], -1, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n * h).astype(q.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, dt = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        self.wq = param(rngs, (d, n, h), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), dt)
        self.wk = param(rngs, (d, k, h), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), dt)
        self.wv = param(rngs, (d, k, h), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), dt)
        self.wo = param(rngs, (n, h, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), dt)
        self.head_dim = h
        self.theta = cfg.rope_theta
        self.window = cfg.sliding_window
        self.impl = cfg.attention_impl

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

        Without a cache, or with one that holds nothing yet (`slot_pos` None: a prefill's only chunk), tokens
        attend to each other (`dot_product` where `uses_dot_product`). With a cache (k [B, K, H, S],
        v [B, K, S, H]), the new keys are written at `slots` [B, T] (out-of-range slots are dropped); a chunk
        after the first attends to the slots, whose positions after the write are `slot_pos` [B, S], in blocks
        up to its last query position (`attend_blocks`); a single token (decode) attends to the cache as it was
        and to itself, so the write does not have to precede (and copy) the reads. `keep` [B]: every token
        writes its key and value, but only the one at this index of each row queries (output [B, 1, D]).
        """
        dtype = x.dtype
        table = rope_table(positions, self.head_dim, self.theta)
        q_x, q_pos, q_table = x, positions, table
        if keep is not None:
            q_x, q_pos, q_table = at_index(x, keep), at_index(positions, keep), at_index(table, keep)
        q = rope(dense("BTD,DNH->BTNH", q_x, self.wq[...].astype(dtype)), q_table)
        k = rope(dense("BTD,DKH->BTKH", x, self.wk[...].astype(dtype)), table)
        v = dense("BTD,DKH->BTKH", x, self.wv[...].astype(dtype))
        q = sh.constrain(q, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.HEAD_DIM))
        keys, values = k.transpose(0, 2, 3, 1), v.swapaxes(1, 2)  # [B, K, H, T], [B, K, T, H]
        if kv is not None:
            batch = jnp.arange(x.shape[0])[:, None]  # with slots [B, T], indexes [B, T, K, H] of the cache
            written = (kv[0].at[batch, :, :, slots].set(k.astype(kv[0].dtype), mode="drop"),
                       kv[1].at[batch, :, slots].set(v.astype(kv[1].dtype), mode="drop"))
        if (kv is None or slot_pos is None) and keep is None and uses_dot_product(self.impl, dtype, self.head_dim):
            out = dot_product(q, k, v, positions, self.window)  # [B, T, N * H]
        elif kv is None:
            out = attend(q, [(keys, values, attention_mask(q_pos, positions, self.window))])
        elif slot_pos is None:  # the cache was empty: the chunk's own keys are all it may see
            out = attend_blocks(q, keys, values, q_pos, positions, self.window)
        elif x.shape[1] == 1:  # decode: the cache as it was (less the slot this token takes) and the token
            cached = attention_mask(q_pos, slot_pos, self.window)
            cached &= (jnp.arange(slot_pos.shape[1]) != slots)[:, None]
            own = attention_mask(q_pos, positions, self.window)
            out = attend(q, [(kv[0], kv[1], cached), (keys, values, own)])  # in the cache dtype (`KVCache.create`)
        else:
            out = attend_blocks(q, written[0].astype(dtype), written[1].astype(dtype), q_pos, slot_pos, self.window)
        kv = None if kv is None else written
        # wo as [N * H, D] (a free reshape): contracted as [N, H, D], XLA:CPU transposed it every decode step
        wo = self.wo[...].astype(dtype)
        return dense("BTX,XD->BTD", out, wo.reshape(-1, wo.shape[-1])), kv
