"""The sparse mixture-of-experts block: a float32 router and dropless expert dispatch.

Legend: T tokens (batch and length flattened), D model dim, E experts, F expert FFN dim, k experts per token.

Every dispatch strategy has one signature, `(x [T, D], weights [T, k] f32, experts [T, k] int32, w1, w3, w2)
-> [T, D] f32`, and computes `sum_k weights * SwiGLU_expert(x)`; none drops a token.
- reference: every expert on every token (the oracle; E/k times the needed FLOPs).
- grouped: token copies sorted by expert and multiplied with `jax.lax.ragged_dot` (prefill, large batches).
- decode: the chosen experts' weights gathered per token (reads only those; few tokens).
On a mesh whose expert or tensor axis is split, the chosen strategy runs per device on its local experts
inside `expert_parallel.dispatch`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import expert_parallel
from mixtral_jax import sharding as sh
from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import param

Dispatch = Callable[..., jax.Array]


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] (float32) -> (weights [T, k] summing to 1, expert ids [T, k]).

    Softmax over the chosen k equals the reference's softmax over all experts renormalised over the top k.
    """
    top_logits, experts = jax.lax.top_k(logits.astype(jnp.float32), top_k)
    return jax.nn.softmax(top_logits, axis=-1), experts


def _swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, spec: str) -> jax.Array:
    up, down = spec.split("|")
    return jnp.einsum(down, jax.nn.silu(jnp.einsum(up, x, w1)) * jnp.einsum(up, x, w3), w2)


def reference(x, weights, experts, w1, w3, w2) -> jax.Array:
    y = _swiglu(x, w1, w3, w2, "TD,EDF->TEF|TEF,EFD->TED")  # [T, E, D]
    gate = jnp.sum(jax.nn.one_hot(experts, w1.shape[0], dtype=jnp.float32) * weights[..., None], axis=1)
    return jnp.einsum("TE,TED->TD", gate, y.astype(jnp.float32))


def decode(x, weights, experts, w1, w3, w2) -> jax.Array:
    y = _swiglu(x, w1[experts], w3[experts], w2[experts], "TD,TKDF->TKF|TKF,TKFD->TKD")  # [T, k, D]
    return jnp.einsum("TK,TKD->TD", weights, y.astype(jnp.float32))


def grouped(x, weights, experts, w1, w3, w2) -> jax.Array:
    t, k = experts.shape
    flat = experts.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
    xs = x[order // k]  # [T*k, D], grouped by expert
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, group_sizes)) * jax.lax.ragged_dot(xs, w3, group_sizes)
    ys = jax.lax.ragged_dot(h, w2, group_sizes)  # [T*k, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)
    return jnp.einsum("TK,TKD->TD", weights, y.astype(jnp.float32))


DISPATCH: dict[str, Dispatch] = {"reference": reference, "grouped": grouped, "decode": decode}


def choose(impl: str, n_tokens: int, top_k: int, n_experts: int) -> Dispatch:
    """`auto` gathers experts while that reads fewer weights than all experts, else groups."""
    if impl == "auto":
        impl = "decode" if n_tokens * top_k < n_experts else "grouped"
    return DISPATCH[impl]


class MoE(nnx.Module):
    """Router plus E SwiGLU experts stored stacked in einsum layout."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, e, f, dt = cfg.dim, cfg.n_experts, cfg.ffn_dim, cfg.param_dtype
        self.router = param(rngs, (d, e), (sh.EMBED, None), dt)
        self.w1 = param(rngs, (e, d, f), (sh.EXP, sh.EMBED, sh.MLP), dt)
        self.w3 = param(rngs, (e, d, f), (sh.EXP, sh.EMBED, sh.MLP), dt)
        self.w2 = param(rngs, (e, f, d), (sh.EXP, sh.MLP, sh.EMBED), dt)
        self.top_k = cfg.top_k
        self.impl = cfg.moe_impl

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], router logits [B, T, E] float32)."""
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        logits = jnp.einsum("TD,DE->TE", tokens.astype(jnp.float32), self.router[...].astype(jnp.float32))
        weights, experts = route(logits, self.top_k)
        dispatch = choose(self.impl, b * t, self.top_k, self.w1.shape[0])
        if expert_parallel.active():
            dispatch = functools.partial(expert_parallel.dispatch, functools.partial(choose, self.impl))
        w1, w3, w2 = (w[...].astype(x.dtype) for w in (self.w1, self.w3, self.w2))
        y = dispatch(tokens, weights, experts, w1, w3, w2)
        return y.astype(x.dtype).reshape(b, t, d), logits.reshape(b, t, -1)
