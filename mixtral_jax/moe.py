"""The sparse mixture-of-experts block: a float32 router and dropless expert dispatch.

Legend: T tokens (batch and length flattened), D model dim, E experts, F expert FFN dim, k experts per token,
C rows in one block of an expert's token copies.

Every dispatch strategy has one signature, `(x [T, D], weights [T, k] f32, experts [T, k] int32, w1, w3, w2)
-> [T, D] f32`, and computes `sum_k weights * SwiGLU_expert(x)`; none drops a token.
- reference: every expert on every token (the oracle; E/k times the needed FLOPs).
- grouped: token copies sorted by expert, each expert's rows multiplied by its weights only (prefill, large
  batches): `jax.lax.ragged_dot` on GPU and TPU, a loop over experts and row blocks on CPU.
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
MAX_BLOCK = 64  # rows per expert matmul in the CPU grouped path
# The backend whose grouped kernel `grouped` compiles (None: the default backend); `plan` sets an accelerator
# to size accelerator programs on CPU placeholder devices.
KERNEL_BACKEND: str | None = None


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
    xk = jnp.broadcast_to(x[:, None], experts.shape + x.shape[1:])  # [T, k, D]: batched matvecs, no transpose
    y = _swiglu(xk, w1[experts], w3[experts], w2[experts], "TKD,TKDF->TKF|TKF,TKFD->TKD")  # [T, k, D]
    return jnp.einsum("TK,TKD->TD", weights, y.astype(jnp.float32))


def grouped(x, weights, experts, w1, w3, w2) -> jax.Array:
    t, k = experts.shape
    flat = experts.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)  # drops the sentinel id E
    xs = x[order // k]  # [T*k, D], grouped by expert
    expert_ffn = _cpu_ffn if (KERNEL_BACKEND or jax.default_backend()) == "cpu" else _ragged_ffn
    ys = expert_ffn(xs, group_sizes, w1, w3, w2)  # [T*k, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)
    return jnp.einsum("TK,TKD->TD", weights, y.astype(jnp.float32))


def _ragged_ffn(xs, group_sizes, w1, w3, w2) -> jax.Array:
    """Rows xs [n, D] grouped by expert -> SwiGLU [n, D] with `jax.lax.ragged_dot` (GPU, TPU)."""
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, group_sizes)) * jax.lax.ragged_dot(xs, w3, group_sizes)
    return jax.lax.ragged_dot(h, w2, group_sizes)


def _blocked_ffn(xs, group_sizes, w1, w3, w2) -> jax.Array:
    """`_ragged_ffn` for XLA:CPU, whose ragged_dot multiplies every row by every expert: each expert with
    rows multiplies them in blocks of C rows (the last one masked), reading its weights once. Rows past
    the groups (the sentinel id E) stay zero. Products are float32 (XLA:CPU has no fast bfloat16 matmul
    on most CPUs), each rounded to the input dtype as ragged_dot rounds."""
    n, d = xs.shape
    n_experts = w1.shape[0]
    dtype = xs.dtype

    def rounded(a: jax.Array) -> jax.Array:  # float32 math, rounded where ragged_dot rounds
        return a.astype(dtype).astype(jnp.float32)

    block = min(MAX_BLOCK, 1 << (-(-n // n_experts) - 1).bit_length())  # C: about one block per expert
    starts = jnp.cumsum(group_sizes) - group_sizes
    xs = jnp.pad(xs.astype(jnp.float32), ((0, block), (0, 0)))

    def expert_rows(e, w1e, w3e, w2e, ys):
        def one_block(j, ys):
            start = starts[e] + j * block
            rows = jax.lax.dynamic_slice_in_dim(xs, start, block)  # [C, D]
            y = rounded(rounded(jax.nn.silu(rounded(rows @ w1e)) * rounded(rows @ w3e)) @ w2e)
            keep = (jnp.arange(block) < group_sizes[e] - j * block)[:, None]
            old = jax.lax.dynamic_slice_in_dim(ys, start, block)
            return jax.lax.dynamic_update_slice_in_dim(ys, jnp.where(keep, y, old), start, 0)

        return jax.lax.fori_loop(0, -(-group_sizes[e] // block), one_block, ys)

    ys = jnp.zeros((n + block, d), jnp.float32)
    for e in range(n_experts):  # unrolled: a static slice copies one expert, a loop would copy all first
        ys = jax.lax.cond(group_sizes[e] > 0, functools.partial(expert_rows, e), lambda *a: a[-1],
                          *(w[e].astype(jnp.float32) for w in (w1, w3, w2)), ys)
    return ys[:n]



@jax.custom_vjp
def _cpu_ffn(xs, group_sizes, w1, w3, w2) -> jax.Array:
    """`_blocked_ffn` forward; its backward is `_ragged_ffn`'s (a loop whose trip count depends on the
    data cannot be reverse-differentiated)."""
    return _blocked_ffn(xs, group_sizes, w1, w3, w2)


def _cpu_ffn_fwd(xs, group_sizes, w1, w3, w2):
    return _blocked_ffn(xs, group_sizes, w1, w3, w2), (xs, group_sizes, w1, w3, w2)


def _cpu_ffn_bwd(residuals, g):
    xs, group_sizes, w1, w3, w2 = residuals

    def ffn(x, a, b, c):
        return _ragged_ffn(x, group_sizes, a, b, c).astype(jnp.float32)

    dx, d1, d3, d2 = jax.vjp(ffn, xs, w1, w3, w2)[1](g)
    return dx, None, d1, d3, d2


_cpu_ffn.defvjp(_cpu_ffn_fwd, _cpu_ffn_bwd)

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
        self.scales = None  # int8 expert weights: `quant.Int8Scales` (set by `quant.quantize`)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], router logits [B, T, E] float32)."""
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        logits = jnp.einsum("TD,DE->TE", tokens.astype(jnp.float32), self.router[...].astype(jnp.float32))
        weights, experts = route(logits, self.top_k)
        if expert_parallel.active():  # each device runs the strategy on its own experts
            dispatch = functools.partial(expert_parallel.dispatch, functools.partial(choose, self.impl))
        else:
            dispatch = choose(self.impl, b * t, self.top_k, self.w1.shape[0])
        w1, w3, w2 = (self.w1[...], self.w3[...], self.w2[...])
        if self.scales is not None:
            w1, w3, w2 = self.scales.dequantize(w1, w3, w2)
        w1, w3, w2 = (w.astype(x.dtype) for w in (w1, w3, w2))
        y = dispatch(tokens, weights, experts, w1, w3, w2)
        return y.astype(x.dtype).reshape(b, t, d), logits.reshape(b, t, -1)
