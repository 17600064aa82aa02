"""Attention in plain XLA ops over keys and values in any layout: one softmax over several parts, and a
running softmax over a cache in blocks of slots.

Legend: B batch, T query length, S key slots, N query heads, K KV heads, G query heads per KV head
(N = K * G), Q = G * T query rows of one KV head, H head dim.

A `KVLayout` names the axes of one layer's keys and values (e.g. `BSKH`, or `BKHS` for keys whose slots
are the minor axis); the products are einsums written from those names, so they read a cache where it lies
whatever a backend chose. Scores and probabilities are float32.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

MASKED = float(jnp.finfo(jnp.float32).min)
# A chunk attends to a cache in blocks of at most this many slots, up to its last position (`attend_blocks`).
KEY_BLOCK = 256
MIN_KEY_BLOCK = KEY_BLOCK // 4  # the smallest block `key_block` takes; caches without such blocks: one pass


class KVLayout(NamedTuple):
    """The axes of one layer's cached keys and values, as einsum letters over B, S, K, H."""

    k: str
    v: str


TOKEN_MAJOR = KVLayout("BSKH", "BSKH")  # as projected: [B, T, K, H]


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T] query and [B, S] key positions -> [B, T, S] bool; key position -1 marks an empty slot."""
    q, k = q_pos[:, :, None], kv_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def attend(q: jax.Array, parts: Sequence[tuple[jax.Array, jax.Array, jax.Array]], layout: KVLayout) -> jax.Array:
    """q [B, T, N, H] over parts of keys and values in `layout`, each (k, v, mask [B, T, S_i]), as over their
    concatenation -> [B, T, N * H] in q's dtype; one softmax over all parts, in float32.

    Each KV head's G query heads and T rows form Q = G * T rows, so the scores [B, K, Q, S] come out of the
    products in the layout the softmax reads."""
    rows = _query_rows(q, parts[0][0].shape[layout.k.index("K")])
    probs = jax.nn.softmax(jnp.concatenate([_scores(rows, k, mask, layout) for k, _, mask in parts], axis=-1), axis=-1)
    out, start = 0, 0
    for _, v, _ in parts:
        size = v.shape[layout.v.index("S")]
        out = out + _weighted(probs[..., start:start + size], v, layout)
        start += size
    return _heads(out, q)


def attend_blocks(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, slot_pos: jax.Array,
                  window: int | None, layout: KVLayout, block: int | None = None) -> jax.Array:
    """`attend(q, [(k, v, mask)])` over a cache in `layout` with slot positions [B, S], in blocks of `block`
    slots (default `key_block(S)`), with a running softmax, and only up to the slot of the last query position
    q_pos [B, T] (all S slots once positions pass S): a prefill chunk skips the slots after it, and no score
    matrix larger than one block is made. A cache without such blocks is scored in one pass."""
    slots = slot_pos.shape[1]
    block = block or key_block(slots)
    if block is None:
        return attend(q, [(k, v, attention_mask(q_pos, slot_pos, window))], layout)
    rows = _query_rows(q, k.shape[layout.k.index("K")])
    n_blocks = jnp.clip(jnp.max(q_pos) // block + 1, 1, slots // block)
    k_axis, v_axis = layout.k.index("S"), layout.v.index("S")

    def body(j, carry):  # running max m and sum l [B, K, Q, 1], output acc [B, K, Q, H], all float32
        m, l, acc = carry
        start = j * block
        mask = attention_mask(q_pos, jax.lax.dynamic_slice_in_dim(slot_pos, start, block, axis=1), window)
        s = _scores(rows, jax.lax.dynamic_slice_in_dim(k, start, block, axis=k_axis), mask, layout)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)  # masked scores (MASKED) give 0 once a row has seen a key
        scale = jnp.exp(m - m_new)
        acc = acc * scale + _weighted(p, jax.lax.dynamic_slice_in_dim(v, start, block, axis=v_axis), layout)
        return m_new, l * scale + jnp.sum(p, axis=-1, keepdims=True), acc

    m = jnp.full(rows.shape[:-1] + (1,), MASKED, jnp.float32)
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, (m, jnp.zeros_like(m), jnp.zeros(rows.shape, jnp.float32)))
    return _heads(acc / l, q)


def key_block(slots: int) -> int | None:
    """The block size `attend_blocks` takes over S slots: the largest power of two dividing S, at most
    KEY_BLOCK; None (one pass over all slots) when S holds fewer than two such blocks or they are small."""
    block = min(KEY_BLOCK, slots & -slots)
    return block if block >= MIN_KEY_BLOCK and slots >= 2 * block else None


def _query_rows(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, T, N, H] -> [B, K, Q, H], Q = G * T (G-major)."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, h)


def _scores(rows: jax.Array, k: jax.Array, mask: jax.Array, layout: KVLayout) -> jax.Array:
    """Scaled scores [B, K, Q, S] float32 of rows [B, K, Q, H] against keys in `layout`; MASKED off mask
    [B, T, S]."""
    qk = jnp.einsum(f"BKQH,{layout.k}->BKQS", rows, k, preferred_element_type=jnp.float32)
    mask = jnp.tile(mask, (1, rows.shape[2] // mask.shape[1], 1))  # [B, Q, S]
    return jnp.where(mask[:, None], qk * rows.shape[-1] ** -0.5, MASKED)


def _weighted(p: jax.Array, v: jax.Array, layout: KVLayout) -> jax.Array:
    """Probabilities p [B, K, Q, S] float32 times values in `layout` -> [B, K, Q, H] float32."""
    return jnp.einsum(f"BKQS,{layout.v}->BKQH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _heads(out: jax.Array, q: jax.Array) -> jax.Array:
    """out [B, K, Q, H] float32 for q [B, T, N, H] -> [B, T, N * H] in q's dtype."""
    b, t, n, h = q.shape
    return out.reshape(b, out.shape[1], -1, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n * h).astype(q.dtype)
