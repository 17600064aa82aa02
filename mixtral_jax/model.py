"""The Mixtral decoder: embeddings, a scanned stack of layers, final norm and LM head.

Legend: B batch, T length, D model dim, V vocab, L layers, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import layout
from mixtral_jax import sharding as sh
from mixtral_jax.cache import KVCache
from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import Attention, RMSNorm, at_index, dense, param
from mixtral_jax.moe import MoE


class MLP(nnx.Module):
    """Dense SwiGLU feed-forward (Mistral 7B)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, dt = cfg.dim, cfg.ffn_dim, cfg.param_dtype
        self.w1 = param(rngs, (d, f), (sh.EMBED, sh.MLP), dt)
        self.w3 = param(rngs, (d, f), (sh.EMBED, sh.MLP), dt)
        self.w2 = param(rngs, (f, d), (sh.MLP, sh.EMBED), dt)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        w1, w3, w2 = (w[...].astype(x.dtype) for w in (self.w1, self.w3, self.w2))
        h = jax.nn.silu(dense("BTD,DF->BTF", x, w1)) * dense("BTD,DF->BTF", x, w3)
        return dense("BTF,FD->BTD", h, w2), None


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg, rngs=rngs)
        self.ffn = MoE(cfg, rngs=rngs) if cfg.is_moe else MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, kv=None, slots=None, slot_pos=None, keep=None):
        """x [B, T, D] -> (x, kv, router logits [B, T, E] or None); with `keep` [B] every token writes the
        cache but the rest runs at that index of each row only (x, router logits [B, 1, ...])."""
        h, kv = self.attn(self.attn_norm(x), positions, kv, slots, slot_pos, keep)
        if keep is not None:
            x = at_index(x, keep)
        x = sh.constrain(x + h, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        y, router_logits = self.ffn(self.ffn_norm(x))
        return sh.constrain(x + y, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), kv, router_logits


class Output(NamedTuple):
    logits: jax.Array  # [B, T, V] float32 (T = 1 with `logit_index`)
    cache: KVCache | None
    router_logits: jax.Array | None  # [L, B, T, E] float32; None for a dense model, or split with `logit_index`


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: bool = False):
        self.config = cfg
        self.remat = remat
        self.embedder = nnx.Param(
            nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.dim), cfg.param_dtype),
            out_sharding=(sh.VOCAB, sh.EMBED), eager_sharding=False,
        )

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: sh.LAYERS})
        def stack(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs=rngs)

        self.layers = stack(rngs)
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.dim, cfg.vocab_size), (sh.EMBED, sh.VOCAB), cfg.param_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        logit_index: jax.Array | None = None,
        split: layout.Split | None = None,
        fresh_cache: bool = False,
    ) -> Output:
        """tokens [B, T] at positions [B, T] (default 0..T-1; negative marks padding that is not cached).

        With a cache, keys and values are written into it and attention spans all cached positions.
        `logit_index` [B] computes logits only at that index of each row (prefill). `split`: the weights in
        the split layout (`layout.split`): layers run unrolled in place of the scanned stack, and with
        `logit_index` the last layer computes keys and values at every position but the rest at that index
        only (nothing else of it reaches the logits). `fresh_cache`: the cache holds nothing yet (a prefill's
        only chunk), so the tokens attend to each other and only write it.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = _rows(self.embedder[...], tokens).astype(dtype)
        x = sh.constrain(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        graphdef, layer_state = nnx.split(self.layers)
        slots = slot_pos = None
        if cache is not None:
            slots, cache = cache.slot_index(positions), cache.with_positions(positions)
            slot_pos = None if fresh_cache else cache.pos

        def body(x, xs, keep=None):
            state, kv = xs
            x, kv, router_logits = nnx.merge(graphdef, state)(x, positions, kv, slots, slot_pos, keep)
            return x, (kv, router_logits)

        if self.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        kv_in = None if cache is None else (cache.k, cache.v)
        if split is None:
            x, (kv, router_logits) = jax.lax.scan(body, x, (layer_state, kv_in))
        else:
            x, (kv, router_logits) = _unrolled(body, x, split.layers, kv_in, logit_index)
        if cache is not None:
            cache = cache.replace(k=kv[0], v=kv[1])
        if logit_index is not None and split is None:
            x = at_index(x, logit_index)
        x = self.final_norm(x)
        if split is None:
            head = self.embedder[...].T if cfg.tie_embeddings else self.lm_head[...]
            logits = dense("BTD,DV->BTV", x, head.astype(dtype), jnp.float32)
        else:
            head = self.embedder[...] if split.head is None else split.head  # [V, D]
            b, t, d = x.shape
            logits = layout.times(x.reshape(b * t, d), head.astype(dtype), jnp.float32).reshape(b, t, -1)
        logits = sh.constrain(logits, (sh.BATCH, sh.LENGTH, sh.ACT_VOCAB))
        return Output(logits, cache, router_logits)


def _rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table [V, D] at ids [B, T] -> [B, T, D]; 16-bit tables are gathered as raw bits (XLA:CPU widens a
    bfloat16 table whole to float32 for a gather, and hoists that copy out of the decode loop)."""
    if table.dtype.itemsize != 2:
        return table[ids]
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(table, jnp.uint16)[ids], table.dtype)


def _unrolled(body, x, layers, kv, keep=None):
    """`lax.scan(body, x, (stacked layers, kv))` as a Python loop over per-layer states and per-layer
    cache buffers (`KVCache.create(per_layer=True)`), each updated in place; the last layer gets `keep`
    (router logits then None: its shape differs)."""
    keys, values, outs = [], [], []
    for i, state in enumerate(layers):
        last = keep if i == len(layers) - 1 else None
        x, (kv_i, router_logits) = body(x, (state, None if kv is None else (kv[0][i], kv[1][i])), last)
        if kv is not None:
            keys.append(kv_i[0])
            values.append(kv_i[1])
        outs.append(router_logits)
    kv = None if kv is None else (tuple(keys), tuple(values))
    return x, (kv, None if outs[0] is None or keep is not None else jnp.stack(outs))
