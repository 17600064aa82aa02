"""The sparse mixture-of-experts block: a float32 router and dropless expert dispatch.

Legend: T tokens (batch and length flattened), D model dim, E experts, F expert FFN dim, k experts per token.

Every dispatch strategy has one signature, `(backend, x [T, D], weights [T, k] f32, expert ids [T, k] int32,
experts) -> [T, D] f32`, and computes `sum_k weights * SwiGLU_expert(x)`; none drops a token. An id past the
experts (the sentinel, with weight zero: padding, a finished slot, or an expert on another device) adds
nothing, and the grouped and chosen kernels skip it. The backend holds the expert weights
(`backends.Experts`) and runs their kernels.
- reference: every expert on every token (the oracle; E/k times the needed FLOPs).
- grouped: token copies sorted by expert, each expert's rows multiplied by its weights only
  (`Backend.grouped_ffn`; prefill, large batches).
- decode: each token through its chosen experts only (`Backend.chosen_ffn`; few tokens).
On a mesh whose expert or tensor axis is split, the chosen strategy runs per device on its local experts
inside `expert_parallel.dispatch`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import expert_parallel
from mixtral_jax import sharding as sh
from mixtral_jax.backends import Backend, Experts
from mixtral_jax.backends.reference import per_choice
from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import param, quantize_weights

Dispatch = Callable[..., jax.Array]


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] (float32) -> (weights [T, k] summing to 1, expert ids [T, k]).

    Softmax over the chosen k equals the reference's softmax over all experts renormalised over the top k.
    """
    top_logits, experts = jax.lax.top_k(logits.astype(jnp.float32), top_k)
    return jax.nn.softmax(top_logits, axis=-1), experts


def reference(backend: Backend, x, weights, expert_ids, experts: Experts) -> jax.Array:
    w1, w3, w2 = backend.expert_arrays(experts, x.dtype)
    h = jax.nn.silu(jnp.einsum("TD,EDF->TEF", x, w1)) * jnp.einsum("TD,EDF->TEF", x, w3)
    y = jnp.einsum("TEF,EFD->TED", h, w2)  # [T, E, D]
    gate = jnp.sum(jax.nn.one_hot(expert_ids, w1.shape[0], dtype=jnp.float32) * weights[..., None], axis=1)
    return jnp.einsum("TE,TED->TD", gate, y.astype(jnp.float32))


def grouped(backend: Backend, x, weights, expert_ids, experts: Experts) -> jax.Array:
    y = per_choice(x, expert_ids, len(experts.w1), lambda rows, sizes: backend.grouped_ffn(rows, sizes, experts))
    return jnp.einsum("TK,TKD->TD", weights, y.astype(jnp.float32))


def decode(backend: Backend, x, weights, expert_ids, experts: Experts) -> jax.Array:
    y = backend.chosen_ffn(x, expert_ids, experts)  # [T, k, D]
    return jnp.einsum("TK,TKD->TD", weights, y.astype(jnp.float32))


DISPATCH: dict[str, Dispatch] = {"reference": reference, "grouped": grouped, "decode": decode}


def choose(impl: str, n_tokens: int, top_k: int, n_experts: int) -> Dispatch:
    """`auto` gathers experts while that reads fewer weights than all experts, else groups."""
    if impl == "auto":
        impl = "decode" if n_tokens * top_k < n_experts else "grouped"
    return DISPATCH[impl]


def warm_routes(backend: Backend, cfg: ModelConfig, n_tokens: int, valid: int) -> list[np.ndarray]:
    """`Backend.warm_routes` for the kernels that `choose` runs `n_tokens` tokens through, `valid` of them not
    padding: expert choices [valid, k] whose runs take every branch they have (none for a dense model)."""
    if not cfg.is_moe:
        return []
    strategy = choose(backend.moe, n_tokens, cfg.top_k, cfg.n_experts)
    if strategy is reference:
        return []
    return backend.warm_routes(n_tokens, valid, cfg.top_k, cfg.n_experts, grouped=strategy is grouped)


class MoE(nnx.Module):
    """Router plus E SwiGLU experts stored stacked in einsum layout; quantised with their scales (`scales`)
    when the config says so (`quant.py`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, e, f, dt = cfg.dim, cfg.n_experts, cfg.ffn_dim, cfg.param_dtype
        self.router = param(rngs, (d, e), (sh.EMBED, None), dt)
        self.w1 = param(rngs, (e, d, f), (sh.EXP, sh.EMBED, sh.MLP), dt)
        self.w3 = param(rngs, (e, d, f), (sh.EXP, sh.EMBED, sh.MLP), dt)
        self.w2 = param(rngs, (e, f, d), (sh.EXP, sh.MLP, sh.EMBED), dt)
        quantize_weights(self, cfg, ("w1", "w3", "w2"), lead=1)
        self.top_k = cfg.top_k

    def __call__(self, x: jax.Array, backend: Backend, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], router logits [B, T, E] float32). Tokens not `valid` [B, T] (padding,
        finished slots) take the sentinel expert id E with weight zero, so no expert multiplies them; their
        output is zero."""
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        router = self.router[...].astype(jnp.float32)
        logits = jnp.einsum("TD,DE->TE", tokens.astype(jnp.float32), router)
        weights, expert_ids = route(logits, self.top_k)
        if valid is not None:
            valid = valid.reshape(b * t, 1)
            weights, expert_ids = jnp.where(valid, weights, 0.0), jnp.where(valid, expert_ids, router.shape[1])
        # get_value: the backend's layout may hold each expert in a buffer of its own (a tuple)
        scales = None if self.scales is None else tuple(getattr(self.scales, n).get_value() for n in ("w1", "w3", "w2"))
        experts = Experts(self.w1.get_value(), self.w3.get_value(), self.w2.get_value(), scales)
        if expert_parallel.active():  # each device runs the strategy on its own experts
            y = expert_parallel.dispatch(functools.partial(choose, backend.moe), backend, tokens, weights,
                                         expert_ids, experts)
        else:
            y = choose(backend.moe, b * t, self.top_k, router.shape[1])(backend, tokens, weights, expert_ids, experts)
        return y.astype(x.dtype).reshape(b, t, d), logits.reshape(b, t, -1)
