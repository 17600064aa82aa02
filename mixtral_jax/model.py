"""The Mixtral decoder: embeddings, a stack of layers, final norm and LM head.

Legend: B batch, T length, D model dim, V vocab, L layers, E experts.

The layer weights are stacked ([L, ...]) in the checkpoint layout; how the stack runs (a scan, or layers
unrolled over weights a backend holds apart) is the backend's (`Backend.run_layers`), as are the products
and attention kernels the layers call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from mixtral_jax import quant
from mixtral_jax import sharding as sh
from mixtral_jax.backends import Backend
from mixtral_jax.backends.reference import at_index
from mixtral_jax.cache import KVCache
from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import Attention, Mode, RMSNorm, param, quantize_weights, weight
from mixtral_jax.moe import MoE


class MLP(nnx.Module):
    """Dense SwiGLU feed-forward (Mistral 7B)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, dt = cfg.dim, cfg.ffn_dim, cfg.param_dtype
        self.w1 = param(rngs, (d, f), (sh.EMBED, sh.MLP), dt)
        self.w3 = param(rngs, (d, f), (sh.EMBED, sh.MLP), dt)
        self.w2 = param(rngs, (f, d), (sh.MLP, sh.EMBED), dt)
        quantize_weights(self, cfg, ("w1", "w3", "w2"))

    def __call__(self, x: jax.Array, backend: Backend, valid: jax.Array | None = None) -> tuple[jax.Array, None]:
        """x [B, T, D] -> (y [B, T, D], None); `valid` is for the MoE's signature (a dense FFN runs every row)."""
        w1, w3, w2 = (weight(self, name, x.dtype) for name in ("w1", "w3", "w2"))
        h = jax.nn.silu(backend.dense("BTD,DF->BTF", x, w1)) * backend.dense("BTD,DF->BTF", x, w3)
        return backend.dense("BTF,FD->BTD", h, w2), None


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg, rngs=rngs)
        self.ffn = MoE(cfg, rngs=rngs) if cfg.is_moe else MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mode, backend, kv=None, slots=None, slot_pos=None, keep=None):
        """x [B, T, D] -> (x, the layer's cache, router logits [B, T, E] or None); with `keep` [B] every token
        is cached but the rest runs at that index of each row only (x, router logits [B, 1, ...])."""
        h, kv = self.attn(self.attn_norm(x), positions, mode, backend, kv, slots, slot_pos, keep)
        valid = positions >= 0  # [B, T]: padding skips the experts (its output is never read)
        if keep is not None:
            x, valid = at_index(x, keep), at_index(valid, keep)
        x = sh.constrain(x + h, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        y, router_logits = self.ffn(self.ffn_norm(x), backend, valid)
        return sh.constrain(x + y, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), kv, router_logits


class Output(NamedTuple):
    logits: jax.Array  # [B, T, V] float32 (T = 1 with `logit_index`)
    cache: KVCache | None
    router_logits: jax.Array | None  # [L, B, T, E] float32; None for a dense model, or with `logit_index`


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
        vocab = ("embedder",) if cfg.tie_embeddings else ("embedder", "lm_head")
        quantize_weights(self, cfg, vocab if cfg.quantize_vocab else ())

    def __call__(self, tokens: jax.Array, positions: jax.Array, mode: Mode, backend: Backend,
                 cache: KVCache | None = None, logit_index: jax.Array | None = None) -> Output:
        """tokens [B, T] at positions [B, T] (-1: padding, never cached) -> logits, in `mode` (TRAIN without a
        cache, the others with one: its keys and values written, and the tokens attending to what it holds).
        `logit_index` [B]: logits at that index of each row only."""
        cfg = self.config
        x = sh.constrain(self.embed(tokens, backend), (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        graphdef, layer_weights = nnx.split(self.layers)
        slots = slot_pos = None
        if mode is not Mode.TRAIN:
            slots, cache = cache.slot_index(positions), cache.with_positions(positions)
            slot_pos = cache.pos

        def body(x, weights, kv, keep):
            return nnx.merge(graphdef, weights)(x, positions, mode, backend, kv, slots, slot_pos, keep)

        if self.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(3,))
        x, kv, router_logits = backend.run_layers(body, x, layer_weights, None if cache is None else cache.kv,
                                                  logit_index)
        if cache is not None:
            cache = cache.replace(kv=kv)
        x = self.final_norm(x)
        lm_head = None if cfg.tie_embeddings else self._vocab_matrix("lm_head")
        logits = backend.unembed(x, self._vocab_matrix("embedder"), lm_head)
        logits = sh.constrain(logits, (sh.BATCH, sh.LENGTH, sh.ACT_VOCAB))
        return Output(logits, cache, router_logits)

    def embed(self, tokens: jax.Array, backend: Backend) -> jax.Array:
        """tokens [B, T] -> their embeddings [B, T, D] in the compute dtype (the first layer's input)."""
        return backend.embed(self._vocab_matrix("embedder"), tokens).astype(self.config.dtype)

    def _vocab_matrix(self, name: str) -> jax.Array | quant.QTensor:
        """The embedding table or LM head as stored (the backend casts it where it reads it), or a
        `quant.QTensor` read as the compute dtype when quantised."""
        w = getattr(self, name).get_value()
        if self.scales is None:
            return w
        return quant.QTensor(w, getattr(self.scales, name).get_value(), self.config.dtype)


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and parameter shapes (with logical axis metadata) without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
