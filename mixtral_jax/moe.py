"""The sparse mixture-of-experts block: a float32 router and dropless expert dispatch.

Legend: T tokens (batch and length flattened), D model dim, E experts, F expert FFN dim, k experts per token,
C rows in one block of an expert's token copies.

Every dispatch strategy has one signature, `(x [T, D], weights [T, k] f32, experts [T, k] int32, w1, w3, w2)
-> [T, D] f32`, and computes `sum_k weights * SwiGLU_expert(x)`; none drops a token. The expert weights are
stacked (w1, w3 [E, D, F], w2 [E, F, D]) or, in the split layout (`layout.py`), tuples of E loaders of
separate output-major buffers (w1, w3 [F, D], w2 [D, F]: `Experts`), which every strategy reads in place.
- reference: every expert on every token (the oracle; E/k times the needed FLOPs).
- grouped: token copies sorted by expert, each expert's rows multiplied by its weights only (prefill, large
  batches). Its kernel (`grouped_kernel`, `auto` by backend): `blocked`, a loop over experts and row blocks
  (CPU); `ragged_dot`, `jax.lax.ragged_dot` (GPU); `megablox`, the Pallas grouped matmul of
  `jax.experimental.pallas.ops.tpu.megablox` (TPU; interpreted elsewhere, for tests).
- decode: the chosen experts' weights gathered per token, or each choice switched to its expert's buffers
  (reads only those; few tokens).
On a mesh whose expert or tensor axis is split, the chosen strategy runs per device on its local experts
inside `expert_parallel.dispatch`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import expert_parallel, layout, quant
from mixtral_jax import sharding as sh
from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import param

Dispatch = Callable[..., jax.Array]
# One expert matrix of every expert: stacked [E, in, out], or in the split layout E loaders, each returning its
# expert's own output-major buffer [out, in] cast where a branch reads it (int8 ones as `quant.Int8`).
Experts = jax.Array | tuple[Callable[[], jax.Array | quant.Int8], ...]
# Rows per expert matmul in the CPU grouped path, largest first (`_block_sizes` picks some by the mean rows
# per expert). A block costs about one read of the expert's weights plus a little per row, so the sizes for a
# prefill's typical 20-60 rows per expert lie close together: 48 and 16 saved 4% of a 128-token MoE block
# (side by side, Xeon host); each size is one more loop per expert to compile (these two: +30% prefill compile).
# At hundreds of rows a block costs about its rows (AMD host), so 192, 128 and 96 keep the padding of a large
# prefill small: batch-8 prefill 795 -> 724 ms, prefill compile +25%.
BLOCKS = (256, 192, 128, 96, 64, 48, 32, 16, 8, 4, 2, 1)
# The backend whose grouped kernel `grouped` compiles (None: the default backend); `plan` sets an accelerator
# to size accelerator programs on CPU placeholder devices (with `ragged_dot`: Pallas kernels need the chip).
KERNEL_BACKEND: str | None = None
# megablox tiles (rows, contracted, out), as MaxText's defaults; each is cut to its dimension where that is less.
MEGABLOX_TILES = (512, 1024, 1024)


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
    w1, w3, w2 = (_stacked(w) for w in (w1, w3, w2))
    y = _swiglu(x, w1, w3, w2, "TD,EDF->TEF|TEF,EFD->TED")  # [T, E, D]
    gate = jnp.sum(jax.nn.one_hot(experts, w1.shape[0], dtype=jnp.float32) * weights[..., None], axis=1)
    return jnp.einsum("TE,TED->TD", gate, y.astype(jnp.float32))


def _stacked(w: Experts) -> jax.Array:
    """Experts as one array [E, in, out] (split ones stacked and transposed back)."""
    return jnp.stack([layout.dense(load()).T for load in w]) if isinstance(w, tuple) else w


def decode(x, weights, experts, w1, w3, w2) -> jax.Array:
    if isinstance(w1, tuple):
        y = _switched(x, experts, w1, w3, w2)
    else:
        xk = jnp.broadcast_to(x[:, None], experts.shape + x.shape[1:])  # [T, k, D]: batched matvecs
        y = _swiglu(xk, w1[experts], w3[experts], w2[experts], "TKD,TKDF->TKF|TKF,TKFD->TKD")  # [T, k, D]
    return jnp.einsum("TK,TKD->TD", weights, y.astype(jnp.float32))


def _switched(x, experts, w1, w3, w2) -> jax.Array:
    """Each token's choices [T, k] run through `lax.switch` on the expert id, whose branch reads that
    expert's own buffers -> [T, k, D]."""

    def branch(a, b, c, x):  # x [1, D]
        return layout.times(jax.nn.silu(layout.times(x, a())) * layout.times(x, b()), c())

    branches = [functools.partial(branch, a, b, c) for a, b, c in zip(w1, w3, w2)]
    t, k = experts.shape
    y = [jax.lax.switch(experts[i, j], branches, x[i:i + 1]) for i in range(t) for j in range(k)]
    return jnp.concatenate(y).reshape(t, k, -1)


def grouped(x, weights, experts, w1, w3, w2, kernel: str = "auto") -> jax.Array:
    t, k = experts.shape
    flat = experts.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=len(w1)).astype(jnp.int32)  # drops the sentinel id E
    xs = x[order // k]  # [T*k, D], grouped by expert
    ys = _grouped_kernel(w1, kernel)(xs, group_sizes, w1, w3, w2)  # [T*k, D]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    y = ys[inverse].reshape(t, k, -1)  # unsorted by a gather: a scatter into zeros wrote ys twice
    return jnp.einsum("TK,TKD->TD", weights, y.astype(jnp.float32))


def _grouped_kernel(w1: Experts, kernel: str) -> Callable[..., jax.Array]:
    if isinstance(w1, tuple):  # split layout (inference): blocks read each expert's buffers in place
        return _blocked_ffn
    if kernel == "auto":
        backend = KERNEL_BACKEND or jax.default_backend()
        kernel = "blocked" if backend == "cpu" else "megablox" if jax.default_backend() == "tpu" else "ragged_dot"
    return {"blocked": _cpu_ffn, "ragged_dot": _ragged_ffn, "megablox": _megablox_ffn}[kernel]


def _ragged_ffn(xs, group_sizes, w1, w3, w2) -> jax.Array:
    """Rows xs [n, D] grouped by expert -> SwiGLU [n, D] with `jax.lax.ragged_dot` (GPU, TPU)."""
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, group_sizes)) * jax.lax.ragged_dot(xs, w3, group_sizes)
    return jax.lax.ragged_dot(h, w2, group_sizes)


def _megablox_ffn(xs, group_sizes, w1, w3, w2) -> jax.Array:
    """`_ragged_ffn` with megablox's `gmm` (Pallas; compiled on TPU, interpreted elsewhere). Rows are padded
    to a multiple of the row tile; gmm leaves rows past the groups unwritten, so they are zeroed on the way
    out, and on the way in for the gradient that comes back through them."""
    from jax.experimental.pallas.ops.tpu.megablox import ops

    n = xs.shape[0]
    tm = min(MEGABLOX_TILES[0], -(-n // 8) * 8)
    grouped_rows = (jnp.arange(n + -n % tm) < jnp.sum(group_sizes))[:, None]  # [n padded, 1]
    xs = jnp.where(grouped_rows, jnp.pad(xs, ((0, -n % tm), (0, 0))), 0)
    interpret = jax.default_backend() != "tpu"

    def gmm(a, w):  # a [n padded, in], w [E, in, out] -> [n padded, out] in a's dtype, as ragged_dot
        tiling = (tm, min(MEGABLOX_TILES[1], w.shape[1]), min(MEGABLOX_TILES[2], w.shape[2]))
        return ops.gmm(a, w.astype(a.dtype), group_sizes, a.dtype, tiling, None, None, False, interpret)

    h = jax.nn.silu(gmm(xs, w1)) * gmm(xs, w3)
    return jnp.where(grouped_rows, gmm(h, w2), 0)[:n]


def _blocked_ffn(xs, group_sizes, w1, w3, w2) -> jax.Array:
    """`_ragged_ffn` for XLA:CPU, whose ragged_dot multiplies every row by every expert: each expert with
    rows multiplies them in blocks, reading its weights once, output-major (`Experts`, `layout.times`).
    Blocks come in a few sizes C (`_block_sizes`), largest first: as many of a size as the rows left fill,
    one more when the rest is more than the next size holds (rows past the group masked), the smallest
    size rounding up. Rows past the groups (the sentinel id E) stay zero. Products take bfloat16 operands
    where the CPU multiplies them (`layout.cpu_bf16`; with AVX512_BF16 only for blocks of prefill size,
    experts averaging over 4 rows: a batch-8 decode step ran 15% slower with them), else float32 ones; they
    accumulate in float32, each rounded to the input dtype as ragged_dot rounds."""
    n, d = xs.shape
    n_experts = len(w1)
    dtype = xs.dtype
    bf16 = layout.cpu_bf16() == "amx" or layout.cpu_bf16() == "avx512" and n > 4 * n_experts
    operand = dtype if dtype == jnp.bfloat16 and bf16 else jnp.float32

    def rounded(a: jax.Array) -> jax.Array:  # float32 math, rounded where ragged_dot rounds
        return a.astype(dtype).astype(jnp.float32)

    def product(a, w):  # float32 [C, out]
        return layout.times(a.astype(operand), w, jnp.float32)

    sizes = _block_sizes(n, n_experts)
    starts = jnp.cumsum(group_sizes) - group_sizes
    xs = jnp.pad(xs.astype(operand), ((0, sizes[0]), (0, 0)))

    def ffn(rows, w1e, w3e, w2e):  # rows [C, D]; w1e, w3e [F, D], w2e [D, F]
        h = rounded(jax.nn.silu(rounded(product(rows, w1e))) * rounded(product(rows, w3e)))  # [C, F]
        return rounded(product(h, w2e))

    def blocks(e, w, block, first, count, ys):
        """`count` blocks of C = `block` rows of expert e from its row `first` on; rows past the group masked."""

        def one_block(j, ys):
            offset = first + j * block
            start = starts[e] + offset
            y = ffn(jax.lax.dynamic_slice_in_dim(xs, start, block), *w)  # [C, D]
            keep = (jnp.arange(block) < group_sizes[e] - offset)[:, None]
            old = jax.lax.dynamic_slice_in_dim(ys, start, block)
            return jax.lax.dynamic_update_slice_in_dim(ys, jnp.where(keep, y, old), start, 0)

        return jax.lax.fori_loop(0, count, one_block, ys)

    def used_expert(e, ys):  # a stacked expert is copied (transposed) from its static slice, a split one read
        w = tuple(layout.cast(w[e]() if isinstance(w, tuple) else w[e].T, operand) for w in (w1, w3, w2))
        dense = tuple(layout.dense(m) for m in w)  # int8 ones dequantised once, for blocks of many rows
        first = jnp.int32(0)
        for i, block in enumerate(sizes):
            left = jnp.maximum(group_sizes[e] - first, 0)
            if i == len(sizes) - 1:
                count = -(-left // block)
            else:  # full blocks, and one more when the rest is more than the next size holds
                count = left // block + (left % block > sizes[i + 1])
            ys = blocks(e, w if block <= layout.INT8_ROWS else dense, block, first, count, ys)
            first = first + count * block
        return ys

    ys = jnp.zeros((n + sizes[0], d), jnp.float32)
    for e in range(n_experts):  # unrolled: each expert's weights are read only in its own branch
        ys = jax.lax.cond(group_sizes[e] > 0, functools.partial(used_expert, e), lambda ys: ys, ys)
    return ys[:n]


def _block_sizes(n: int, n_experts: int) -> tuple[int, ...]:
    """Row-block sizes for n rows over E experts, largest first: the sizes of BLOCKS that an expert with
    twice the average rows fills (never more than all n rows), down to single rows while experts average
    at most 4 rows (decode: XLA:CPU streams weights past one row at memory speed), to 4 while at most 16,
    else to 8 (fewer loops to compile; a masked block of 8 costs little more than of 4)."""
    mean = -(-n // n_experts)
    smallest = 1 if mean <= 4 else 4 if mean <= 16 else 8
    return tuple(b for b in BLOCKS if smallest <= b <= min(2 * mean, n))


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


def choose(impl: str, n_tokens: int, top_k: int, n_experts: int, kernel: str = "auto") -> Dispatch:
    """`auto` gathers experts while that reads fewer weights than all experts, else groups (with the
    `grouped_kernel` named by `kernel`)."""
    if impl == "auto":
        impl = "decode" if n_tokens * top_k < n_experts else "grouped"
    if impl == "grouped" and kernel != "auto":
        return functools.partial(grouped, kernel=kernel)
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
        self.kernel = cfg.grouped_kernel
        self.scales = None  # int8 expert weights: `quant.Int8Scales` (set by `quant.quantize`)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], router logits [B, T, E] float32)."""
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        logits = jnp.einsum("TD,DE->TE", tokens.astype(jnp.float32), self.router[...].astype(jnp.float32))
        weights, experts = route(logits, self.top_k)
        if expert_parallel.active():  # each device runs the strategy on its own experts
            dispatch = functools.partial(expert_parallel.dispatch,
                                         functools.partial(choose, self.impl, kernel=self.kernel))
        else:
            dispatch = choose(self.impl, b * t, self.top_k, len(self.w1.get_value()), self.kernel)
        ws = (self.w1.get_value(), self.w3.get_value(), self.w2.get_value())  # [E, ...] or tuples (split)
        scales = (None,) * 3 if self.scales is None else self.scales.values()
        if isinstance(ws[0], tuple):  # split: each expert is cast in the branch that reads it
            ws = tuple(tuple(functools.partial(_split_load, q, s, x.dtype)
                             for q, s in zip(w, scale or (None,) * len(w))) for w, scale in zip(ws, scales))
        else:
            ws = tuple(_load(w, scale, x.dtype) for w, scale in zip(ws, scales))
        y = dispatch(tokens, weights, experts, *ws)
        return y.astype(x.dtype).reshape(b, t, d), logits.reshape(b, t, -1)


def _load(w: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """Expert weights in `dtype`; int8 ones multiplied back by their scales."""
    return (w if scale is None else w.astype(jnp.float32) * scale).astype(dtype)


def _split_load(w: jax.Array, scale: jax.Array | None, dtype) -> jax.Array | quant.Int8:
    """One split expert matrix [out, in] in `dtype`; an int8 one with its scales [out, 1] (`layout.times`)."""
    return w.astype(dtype) if scale is None else quant.Int8(w, scale, dtype)
