"""The CPU backend: XLA:CPU's kernels and, on one device, the split layout of the weights.

Legend: B batch, T length, S cache slots, D model dim, K KV heads, H head dim, V vocab, L layers, E experts,
F expert FFN dim, M rows, C rows in one block of an expert's token copies, n rows grouped by expert.

XLA:CPU copies any slice of an array before a matmul reads it, so a scan over stacked [L, ...] weights and
experts picked out of [E, D, F] copy every weight a step reads: a decode step would move each byte three
times instead of once. The split layout (`split`, chosen for one CPU device once the layer weights outgrow
the caches) holds each layer's weights, and each expert's, in buffers of their own: the layers run
unrolled, the expert matrices (and their scales) are tuples of E output-major arrays [out, in], the LM
head (and its scales) is output-major [V, D], and every matmul reads its weights where they lie. It is the
only copy the handle holds (`place` builds it slice by slice). The checkpoint layout stays the public one:
checkpoints, training, export and expert parallelism use stacked weights (`split=False`).

Other XLA:CPU behaviours this module works around, each where it applies: a bfloat16 product with a
bfloat16 result widens its weights to float32 on every call (products accumulate in float32); a lone
bfloat16 row multiplies in a generic loop (it runs as two); a bfloat16 table is widened whole for a gather
(gathered as raw bits); a loop-carried buffer is copied twice a step without region analysis; a 16-bit
cache buffer is widened whole for each write (the split cache of a 16-bit model is float32, which holds its
values exactly); a few rows multiply faster by an output-major matrix in column form; quantised weights are
dequantised into a temporary before a float product, which reads it from the caches; int4 arrays convert to
wider types in a loop several times slower than bytes do (the split layout holds its output-major int4
matrices two entries to a byte, `packed_int4`); a loop of the grouped kernel or a branch of a switch builds
its products' pipelines the first time it runs (`warm_routes` names routings that run them all).
docs/performance.md has the measurements.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import quant
from mixtral_jax.backends import reference
from mixtral_jax.backends.attention import KVLayout, attend, attend_blocks, attention_mask
from mixtral_jax.backends.reference import Experts, LayerCache, Reader
from mixtral_jax.config import ModelConfig, stacked_axes

SPLIT_FROM_BYTES = 64 << 20  # the split layout from this many bytes of layer weights (twice a large L3 cache)
ROW_FORM_FROM = 128  # `times` multiplies this many rows and more in row form (faster from 128-192 rows)
# Rows per expert matmul in the grouped path, largest first (`block_sizes` picks some by the mean rows per
# expert). A block costs about one read of the expert's weights plus a little per row, so the sizes for a
# prefill's typical 20-60 rows per expert lie close together; at hundreds of rows a block costs about its
# rows, so 192, 128 and 96 keep the padding of a large prefill small. Each size is one more loop per expert
# to compile.
BLOCKS = (256, 192, 128, 96, 64, 48, 32, 16, 8, 4, 2, 1)
SWITCH_CHOICES = 16  # the most expert choices the split layout's `chosen_ffn` runs as switches
HEAD = ("lm_head", quant.scale_path("lm_head"))  # output-major in the split layout


@dataclasses.dataclass(frozen=True)
class CpuBackend(reference.Backend):
    """XLA:CPU. `split`: the split layout (one device only). `bf16`: how this CPU multiplies bfloat16
    (`bf16_support`): `amx`, `avx512` or None."""

    split: bool = False
    bf16: str | None = None
    name: ClassVar[str] = "cpu"
    # Keys [B, K, H, S] and values [B, K, S, H]: the attention's batched matmuls read both where they lie,
    # scores and outputs contracting the head dim and the slots as laid out.
    kv_layout: ClassVar[KVLayout] = KVLayout("BKHS", "BKSH")
    compiler_options: ClassVar[tuple[tuple[str, Any], ...]] = (("xla_cpu_copy_insertion_use_region_analysis", True),)

    def describe(self) -> str:
        return f"cpu ({'split' if self.split else 'stacked'} layout, bfloat16 products: {self.bf16 or 'widened'})"

    # ---- the weights --------------------------------------------------------------------------------------

    def place(self, cfg: ModelConfig, targets: dict[str, jax.ShapeDtypeStruct], reader: Reader) -> dict[str, Any]:
        """Split: each buffer read and placed on its own, so that no stacked copy is ever whole in memory
        (a reader of whole leaves only is read whole, then split)."""
        if not self.split:
            return reader.arrays(targets)
        if not reader.slices:
            return self.from_checkpoint_layout(cfg, reader.arrays(targets))
        leaves = {}
        for path, target in targets.items():
            device = next(iter(target.sharding.device_set))
            # each output-major buffer is placed as soon as it is read: the host holds one slice at a time
            split = _split_leaf(cfg, path, lambda index, p=path, t=target: reader.read(p, index, t.dtype),
                                lambda a, d=device: jax.device_put(np.ascontiguousarray(a.T), d))
            leaves[path] = jax.device_put(split, device)
        return leaves

    def from_checkpoint_layout(self, cfg: ModelConfig, leaves: dict[str, jax.Array]) -> dict[str, Any]:
        if not self.split:
            return leaves
        return {path: _split_leaf(cfg, path, lambda index, w=w: w[index] if index else w, _transposed)
                for path, w in leaves.items()}

    def to_checkpoint_layout(self, cfg: ModelConfig, leaves: dict[str, Any]) -> dict[str, jax.Array]:
        if not self.split:
            return leaves
        out = {}
        for path, value in leaves.items():
            axes = stacked_axes(cfg, path)
            if path in HEAD:
                out[path] = _transposed(_int4(cfg, value))
            elif axes == 2:
                out[path] = jnp.stack([jnp.stack([_transposed(_int4(cfg, w)) for w in layer]) for layer in value])
            elif axes == 1:
                out[path] = jnp.stack(value)
            else:
                out[path] = value
        return out

    # ---- products -----------------------------------------------------------------------------------------

    def dense(self, spec: str, x: jax.Array, w: jax.Array | quant.QTensor, dtype=None) -> jax.Array:
        """Accumulated in float32 (XLA:CPU widens the weights of a bfloat16 product with a bfloat16 result on
        every call); a lone bfloat16 row runs as two."""
        if lone_bf16_row(x.shape[0] * x.shape[1], x.dtype):
            return self.dense(spec, jnp.concatenate([x, x]), w, dtype)[:1]
        return super().dense(spec, x, w, dtype)

    def embed(self, table: jax.Array | quant.QTensor, ids: jax.Array) -> jax.Array:
        """16-bit tables are gathered as raw bits: XLA:CPU widens a bfloat16 table whole to float32 for a
        gather, and hoists that copy out of the decode loop."""
        if isinstance(table, quant.QTensor) or table.dtype.itemsize != 2:
            return super().embed(table, ids)
        return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(table, jnp.uint16)[ids], table.dtype)

    def unembed(self, x: jax.Array, embedder: jax.Array | quant.QTensor,
                lm_head: jax.Array | quant.QTensor | None) -> jax.Array:
        """Split: the head is output-major [V, D] (the tied embedder already is), multiplied by `times`."""
        if not self.split:
            return super().unembed(x, embedder, lm_head)
        head = embedder if lm_head is None else lm_head
        b, t, d = x.shape
        return times(x.reshape(b * t, d), head.astype(x.dtype), jnp.float32).reshape(b, t, -1)

    def rope_table(self, positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
        """Read through a gather by token: fused into the products' consumers, XLA:CPU computed the sines and
        cosines again for every head and half."""
        table = super().rope_table(positions, head_dim, theta).reshape(-1, head_dim)  # [B * T, H]
        return table[jnp.arange(len(table))].reshape(positions.shape + (1, head_dim))

    # ---- the layer stack ----------------------------------------------------------------------------------

    def run_layers(self, body: Callable, x: jax.Array, layers: Any, kv: Any,
                   keep: jax.Array | None) -> tuple[jax.Array, Any, Any]:
        """Split: a Python loop over the layers, each reading its own buffers and writing its own cache
        buffers in place; the last one runs its queries and FFN at `keep` only."""
        if not self.split:
            return super().run_layers(body, x, layers, kv, keep)
        is_layers = _is_per_layer  # each split leaf is a tuple of L per-layer values
        n_layers = len(jax.tree.leaves(layers, is_leaf=is_layers)[0])
        new_kv, router_logits = [], []
        for i in range(n_layers):
            state = jax.tree.map(lambda leaf: leaf[i], layers, is_leaf=is_layers)
            layer_kv = None if kv is None else kv.layer(i)
            x, layer_kv, logits = body(x, state, layer_kv, keep if i == n_layers - 1 else None)
            if kv is not None:
                new_kv.append(dataclasses.astuple(layer_kv))
            router_logits.append(logits)
        kv = None if kv is None else LayerCache(*(None if f[0] is None else tuple(f) for f in zip(*new_kv)))
        stacked = None if router_logits[0] is None or keep is not None else jnp.stack(router_logits)
        return x, kv, stacked

    # ---- the KV cache and attention -----------------------------------------------------------------------

    def cache_dtype(self, cfg: ModelConfig):
        """A split cache of a 16-bit model is float32 (see the module docstring), unless it is int8."""
        if self.split and jnp.dtype(cfg.dtype).itemsize == 2 and cfg.kv_cache_dtype == "auto":
            return jnp.dtype(jnp.float32)
        return super().cache_dtype(cfg)

    def new_cache(self, cfg: ModelConfig, batch: int, slots: int) -> LayerCache:
        """Split: L buffers of keys and of values, each written in place (a slice of one stacked array is
        copied)."""
        if not self.split:
            return super().new_cache(cfg, batch, slots)
        stacked = super().new_cache(cfg, 1, 1)  # which buffers, and their dtypes and layouts
        specs = list(self.kv_layout) + [reference._scale_spec(spec) for spec in self.kv_layout]
        return LayerCache(*(None if f is None else tuple(
            reference.cache_zeros(cfg, spec, batch, slots, f.dtype, stacked=False) for _ in range(cfg.n_layers))
            for spec, f in zip(specs, dataclasses.astuple(stacked))))

    def self_attention(self, q, q_pos, k, v, positions, window):
        return attend(q, [(*_own(k, v), attention_mask(q_pos, positions, window))], self.kv_layout)

    def prefill_attention(self, q, q_pos, k, v, positions, kv, slots, slot_pos, window):
        out = attend_blocks(q, *_own(k, v), q_pos, positions, window, self.kv_layout)
        return out, self.write(kv, k, v, slots)

    def extend_attention(self, q, q_pos, k, v, positions, kv, slots, slot_pos, window):
        kv = self.write(kv, k, v, slots)
        dtype = q.dtype  # the split cache of a 16-bit model is float32
        k_all, v_all = (a.astype(dtype) for a in self.read(kv, dtype))
        return attend_blocks(q, k_all, v_all, q_pos, slot_pos, window, self.kv_layout), kv

    def decode_attention(self, q, q_pos, k, v, positions, kv, slots, slot_pos, window):
        """The token attends to the cache as it was (less the slot it takes) and to itself, so the write does
        not have to precede (and copy) the reads."""
        cached = attention_mask(q_pos, slot_pos, window) & (jnp.arange(slot_pos.shape[1]) != slots)[:, None]
        own = attention_mask(q_pos, positions, window)
        out = attend(q, [(*self.read(kv, q.dtype), cached), (*_own(k, v), own)], self.kv_layout)  # in the cache dtype
        return out, self.write(kv, k, v, slots)

    # ---- experts ------------------------------------------------------------------------------------------

    def expert_arrays(self, experts: Experts, dtype):
        if not self.split:
            return super().expert_arrays(experts, dtype)
        n_experts = len(experts.w1)
        return tuple(jnp.stack([_dense_weight(_expert(experts, e, dtype)[i]).T for e in range(n_experts)])
                     for i in range(3))

    def grouped_ffn(self, xs: jax.Array, group_sizes: jax.Array, experts: Experts) -> jax.Array:
        """Each expert with rows multiplies them in blocks, reading its weights once (XLA:CPU's ragged_dot
        multiplies every row by every expert). Stacked experts train: the gradient is ragged_dot's."""
        if self.split:
            return blocked_ffn(xs, group_sizes, functools.partial(_expert, experts), len(experts.w1), self.bf16)
        w1, w3, w2 = self.expert_arrays(experts, xs.dtype)
        return _trainable_blocked_ffn(xs, group_sizes, w1, w3, w2, self.bf16)

    def warm_routes(self, n_tokens: int, valid: int, top_k: int, n_experts: int, grouped: bool) -> list[np.ndarray]:
        """The grouped kernel runs a loop for each expert and block size, and XLA:CPU sets a loop's products up
        the first time it runs (milliseconds each, hundreds a prefill program): routings whose group sizes
        run every loop (`covering_group_sizes`). The split layout's per-choice switches: every expert at each
        token's each choice."""
        if not grouped and not self.split:
            return []  # the reference gather: no branches
        if not grouped and n_tokens * top_k <= SWITCH_CHOICES:
            return [(np.arange(valid)[:, None] * top_k + np.arange(top_k) + r) % n_experts
                    for r in range(n_experts)]
        return [reference.routes_for(sizes, valid, top_k)
                for sizes in covering_group_sizes(n_tokens, valid, top_k, n_experts)]

    def chosen_ffn(self, x: jax.Array, expert_ids: jax.Array, experts: Experts) -> jax.Array:
        """Split: each token's choices run through `lax.switch` on the expert id, whose branch reads that
        expert's own buffers (cast there, not for every expert); past SWITCH_CHOICES choices, whose switches
        would make a program XLA:CPU takes long to compile (or fails to), the grouped kernel runs them. The
        sentinel id E (padding, a finished slot) takes a branch that reads no weights."""
        if not self.split:
            return super().chosen_ffn(x, expert_ids, experts)
        if expert_ids.size > SWITCH_CHOICES:
            n_experts = len(experts.w1)
            return reference.per_choice(x, expert_ids, n_experts,
                                        lambda rows, sizes: self.grouped_ffn(rows, sizes, experts))

        def branch(e, x):  # x [1, D]
            w1, w3, w2 = _expert(experts, e, x.dtype)
            return times(jax.nn.silu(times(x, w1)) * times(x, w3), w2)

        def sentinel(x):  # an id past the experts: no expert's weights are read
            return jnp.zeros_like(x)

        branches = [functools.partial(branch, e) for e in range(len(experts.w1))] + [sentinel]
        t, k = expert_ids.shape
        y = [jax.lax.switch(expert_ids[i, j], branches, x[i:i + 1]) for i in range(t) for j in range(k)]
        return jnp.concatenate(y).reshape(t, k, -1)


def bf16_support() -> str | None:
    """How this CPU multiplies bfloat16, from `/proc/cpuinfo`: `amx` (AMX tiles, Intel Xeon from Sapphire
    Rapids on: XLA:CPU's bfloat16 products are several times faster than float32 ones), `avx512`
    (AVX512_BF16 dot products, AMD from Zen 4 on: faster from tens of rows on, slower for a few rows), or None
    (XLA:CPU widens bfloat16 products, slower than float32 ones). docs/performance.md has the timings."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return "amx" if "amx_bf16" in flags else "avx512" if "avx512_bf16" in flags else None


def layer_bytes(cfg: ModelConfig) -> int:
    """Bytes of a model's layer weights (what the split layout holds in buffers of their own)."""
    d, f, e = cfg.dim, cfg.ffn_dim, max(cfg.n_experts, 1)
    attn = d * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    per_layer = attn + 2 * d + cfg.n_experts * d + 3 * d * f * e
    return cfg.n_layers * per_layer * jnp.dtype(cfg.param_dtype).itemsize


# ---- products ---------------------------------------------------------------------------------------------


def lone_bf16_row(rows: int, dtype) -> bool:
    """Whether a product of `rows` rows should run on them doubled: XLA:CPU multiplies a single bfloat16
    row by a matrix in a generic loop, an order of magnitude slower than two rows."""
    return rows == 1 and dtype == jnp.bfloat16


def times(x: jax.Array, w: jax.Array | quant.QTensor, dtype=None) -> jax.Array:
    """x [M, in] times an output-major w [out, in] -> [M, out], accumulated in float32 and returned in
    `dtype` (default x's): few rows in column form (w @ x.T, the output transposed after a barrier, which XLA
    would fold into row form), many in row form; a lone bfloat16 row as two. Quantised weights are
    dequantised first."""
    dtype = dtype or x.dtype
    w = _dense_weight(w)
    if lone_bf16_row(len(x), x.dtype):
        return times(jnp.concatenate([x, x]), w, dtype)[:1]
    if len(x) >= ROW_FORM_FROM:
        return jnp.einsum("MI,OI->MO", x, w, preferred_element_type=jnp.float32).astype(dtype)
    column = jnp.einsum("OI,MI->OM", w, x, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(column).T.astype(dtype)


# ---- the grouped expert FFN -------------------------------------------------------------------------------


def blocked_ffn(xs: jax.Array, group_sizes: jax.Array, expert: Callable[[int, Any], tuple], n_experts: int,
                bf16: str | None) -> jax.Array:
    """`reference.ragged_ffn` for XLA:CPU: each expert with rows multiplies them in blocks, reading its
    weights once, output-major (`expert(e, dtype)` -> its w1, w3 [F, D] and w2 [D, F], arrays or
    `quant.QTensor`). Blocks come in a few sizes C (`block_sizes`), largest first: as many of a size as the rows
    left fill, one more when the rest is more than the next size holds (rows past the group masked), the
    smallest size rounding up. Rows past the groups (the sentinel id E) stay zero. Products take bfloat16
    operands where the CPU multiplies them (`bf16`; with AVX512_BF16 only for blocks of prefill size,
    experts averaging over 4 rows: a batch-8 decode step ran slower with them), else float32 ones; they
    accumulate in float32, each rounded to the input dtype as ragged_dot rounds."""
    n, d = xs.shape
    dtype = xs.dtype
    fast_bf16 = bf16 == "amx" or bf16 == "avx512" and n > 4 * n_experts
    operand = dtype if dtype == jnp.bfloat16 and fast_bf16 else jnp.float32

    def rounded(a: jax.Array) -> jax.Array:  # float32 math, rounded where ragged_dot rounds
        return a.astype(dtype).astype(jnp.float32)

    def product(a, w):  # float32 [C, out]
        return times(a.astype(operand), w, jnp.float32)

    sizes = block_sizes(n, n_experts)
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

    def used_expert(e, ys):
        w = tuple(_dense_weight(m) for m in expert(e, operand))  # quantised ones dequantised once per expert
        for block, first, count in block_runs(group_sizes[e], sizes, jnp.maximum):
            ys = blocks(e, w, block, first, count, ys)
        return ys

    ys = jnp.zeros((n + sizes[0], d), jnp.float32)
    for e in range(n_experts):  # unrolled: each expert's weights are read only in its own branch
        ys = jax.lax.cond(group_sizes[e] > 0, functools.partial(used_expert, e), lambda ys: ys, ys)
    return ys[:n]


def block_runs(rows, sizes: tuple[int, ...], maximum: Callable = max) -> list[tuple[int, Any, Any]]:
    """The blocks `blocked_ffn` multiplies an expert's `rows` in (an int, or traced with `maximum=jnp.maximum`):
    (size, its first row, how many) for each of `sizes`, largest first: as many of a size as the rows left
    fill, one more when the rest is more than the next size holds, the smallest size rounding up."""
    runs, first = [], 0
    for i, block in enumerate(sizes):
        left = maximum(rows - first, 0)
        count = -(-left // block) if i == len(sizes) - 1 else left // block + (left % block > sizes[i + 1])
        runs.append((block, first, count))
        first = first + count * block
    return runs


def covering_group_sizes(n_tokens: int, valid: int, top_k: int, n_experts: int) -> list[np.ndarray]:
    """Group sizes [E] of the copies of `valid` of `n_tokens` tokens (summing to `valid * top_k`, each at most
    `valid`: a token's copies go to distinct experts) whose `blocked_ffn` runs between them run every
    expert's loop of every block size that a group of at most `valid` rows runs: each expert takes the fewest
    rows that run its largest loop not yet run that still fit, the rest of the rows go to the experts given
    least."""
    rows = valid * top_k
    sizes = block_sizes(n_tokens * top_k, n_experts)
    fewest = {}  # block size -> the fewest rows that run its loop
    for group in range(1, valid + 1):
        for block, _, count in block_runs(group, sizes):
            if count:
                fewest.setdefault(block, group)
    todo = {(e, block) for e in range(n_experts) for block in fewest}
    found = []
    while todo:
        sizes_e, left = np.zeros(n_experts, np.int64), rows
        for e in range(n_experts):
            wanted = [fewest[block] for block in sizes if (e, block) in todo and fewest[block] <= left]
            if wanted:
                sizes_e[e], left = wanted[0], left - wanted[0]
        for e in np.argsort(sizes_e, stable=True):
            more = min(left, valid - sizes_e[e])
            sizes_e[e], left = sizes_e[e] + more, left - more
        ran = {(e, block) for e in range(n_experts)
               for block, _, count in block_runs(int(sizes_e[e]), sizes) if count}
        if not ran & todo:
            break
        todo -= ran
        found.append(sizes_e)
    return found


def block_sizes(n: int, n_experts: int) -> tuple[int, ...]:
    """Row-block sizes for n rows over E experts, largest first: the sizes of BLOCKS that an expert with
    twice the average rows fills (never more than all n rows), down to single rows while experts average
    at most 4 rows (decode: XLA:CPU streams weights past one row at memory speed), to 4 while at most 16,
    else to 8 (fewer loops to compile; a masked block of 8 costs little more than of 4)."""
    mean = -(-n // n_experts)
    smallest = 1 if mean <= 4 else 4 if mean <= 16 else 8
    return tuple(b for b in BLOCKS if smallest <= b <= min(2 * mean, n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _trainable_blocked_ffn(xs, group_sizes, w1, w3, w2, bf16):
    """`blocked_ffn` over stacked experts (each expert's slices copied output-major); its backward is
    `ragged_ffn`'s (a loop whose trip count depends on the data cannot be reverse-differentiated)."""
    return _stacked_blocked(xs, group_sizes, w1, w3, w2, bf16)


def _stacked_blocked(xs, group_sizes, w1, w3, w2, bf16):
    return blocked_ffn(xs, group_sizes, lambda e, dtype: tuple(w[e].T.astype(dtype) for w in (w1, w3, w2)),
                       w1.shape[0], bf16)


def _trainable_fwd(xs, group_sizes, w1, w3, w2, bf16):
    return _stacked_blocked(xs, group_sizes, w1, w3, w2, bf16), (xs, group_sizes, w1, w3, w2)


def _trainable_bwd(bf16, residuals, g):
    xs, group_sizes, w1, w3, w2 = residuals

    def ffn(x, a, b, c):
        return reference.ragged_ffn(x, group_sizes, a, b, c).astype(jnp.float32)

    dx, d1, d3, d2 = jax.vjp(ffn, xs, w1, w3, w2)[1](g)
    return dx, None, d1, d3, d2


_trainable_blocked_ffn.defvjp(_trainable_fwd, _trainable_bwd)


# ---- the split layout -------------------------------------------------------------------------------------


def _split_leaf(cfg: ModelConfig, path: str, part: Callable[[tuple[int, ...]], jax.Array],
                output_major: Callable[[jax.Array], jax.Array]) -> Any:
    """A checkpoint-layout leaf in the split layout, from `part(index)` (its slice at a stacked index): layer
    weights as a tuple of L buffers, expert matrices (and their scales) a tuple of L tuples of E
    output-major buffers (int4 ones packed, `packed_int4`), the LM head (and its scales) output-major, the
    rest whole."""
    axes = stacked_axes(cfg, path)

    def matrix(index):
        w = output_major(part(index))
        group = _packing_group(cfg, w.shape[1])
        return packed_int4(w, group) if w.dtype == jnp.int4 and group % 2 == 0 else w

    if path in HEAD:
        return matrix(())
    if axes == 2:
        return tuple(tuple(matrix((i, e)) for e in range(cfg.n_experts)) for i in range(cfg.n_layers))
    if axes == 1:
        return tuple(part((i,)) for i in range(cfg.n_layers))
    return part(())


def _is_per_layer(value: Any) -> bool:
    return isinstance(value, tuple)


@jax.jit
def _transposed(w: jax.Array) -> jax.Array:
    """A matrix output-major, in a buffer of its own."""
    return w.T


def _expert(experts: Experts, e: int, dtype) -> tuple[Any, Any, Any]:
    """Split expert e's w1, w3 [F, D] and w2 [D, F] read as `dtype`: arrays, or `quant.QTensor` with their scales
    [out, groups] (int4 ones packed, `packed_int4`). Called where a branch multiplies by them, so that only that
    expert is cast."""
    if experts.scales is None:
        return tuple(w[e].astype(dtype) for w in experts[:3])
    return tuple(quant.QTensor(w[e], s[e], dtype) for w, s in zip(experts[:3], experts.scales))


def _dense_weight(w: jax.Array | quant.QTensor) -> jax.Array:
    """A weight as an array (quantised ones dequantised, packed int4 ones unpacked on the way)."""
    if not isinstance(w, quant.QTensor):
        return w
    if w.q.dtype != jnp.uint8:
        return w.dequantized()
    o, groups = w.scale.shape
    return quant.dequantize(_nibbles(w.q, groups).reshape(o, -1), w.scale, w.dtype)


def _packing_group(cfg: ModelConfig, n_in: int) -> int:
    """The int4 group of an output-major matrix with `n_in` contracted entries (one group if they are fewer)."""
    return min(cfg.quant_group, n_in)


@functools.partial(jax.jit, static_argnames="group")
def packed_int4(w: jax.Array, group: int) -> jax.Array:
    """An output-major int4 matrix [O, I] two entries to a byte, uint8 [O, I / 2]: byte j of a group holds the
    group's entry j in its low nibble and entry j + group / 2 in its high one, so that unpacking (shifts of
    bytes) lays the halves side by side rather than interleaving them."""
    o, n_in = w.shape
    halves = jax.lax.bitcast_convert_type(w.astype(jnp.int8), jnp.uint8).reshape(o, n_in // group, 2, group // 2)
    return ((halves[:, :, 0] & 0xF) | (halves[:, :, 1] << 4)).reshape(o, n_in // 2)


def _nibbles(packed: jax.Array, groups: int) -> jax.Array:
    """`packed_int4`'s bytes [O, I / 2] as their entries, int8 [O, groups, 2, group / 2] (each group's halves)."""
    b = jax.lax.bitcast_convert_type(packed, jnp.int8).reshape(packed.shape[0], groups, -1)
    return jnp.stack([jnp.left_shift(b, 4) >> 4, b >> 4], axis=2)  # arithmetic shifts sign-extend


def _int4(cfg: ModelConfig, w: jax.Array) -> jax.Array:
    """A split-layout matrix with int4 entries as int4 (`packed_int4`'s inverse); other matrices as they are."""
    if w.dtype != jnp.uint8:
        return w
    o, n_half = w.shape
    return _nibbles(w, 2 * n_half // _packing_group(cfg, 2 * n_half)).reshape(o, -1).astype(jnp.int4)


def _own(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A chunk's own keys and values [B, T, K, H] in the cache layout."""
    return k.transpose(0, 2, 3, 1), v.swapaxes(1, 2)
