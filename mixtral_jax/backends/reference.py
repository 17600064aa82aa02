"""The reference backend: every kernel in plain XLA ops, the weights in their checkpoint layout.

Legend: B batch, T length, S cache slots, D model dim, N query heads, K KV heads, H head dim, V vocab,
L layers, E experts, F expert FFN dim, k experts per token, n rows grouped by expert.

A backend is the one place where how a model runs on a platform is decided: the layout its weights and KV
cache are held in, and the kernels of its products, attention and expert FFNs. `Backend` is the reference:
it runs anywhere, is the oracle the others are tested against, and is what `plan` compiles. The CPU, GPU
and TPU backends (`cpu.py`, `gpu.py`, `tpu.py`) subclass it and override what they speed up. A backend is a
frozen dataclass: hashable and static, it is resolved once for a model handle (`backends.resolve`) and
passed into every compiled function, which hands it to the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import quant
from mixtral_jax import sharding as sh
from mixtral_jax.backends.attention import TOKEN_MAJOR, KVLayout, attend, attend_blocks, attention_mask
from mixtral_jax.config import ModelConfig

MOE_STRATEGIES = ("auto", "reference", "grouped", "decode")
# Logical axes of the cache: layers first, then the layout's B, S, K, H (`Backend.kv_layout`).
_KV_AXES = {"B": sh.BATCH, "S": sh.CACHE_LENGTH, "K": sh.ACT_KV_HEADS, "H": sh.HEAD_DIM}


class Experts(NamedTuple):
    """One MoE layer's expert weights as a backend holds them: in the checkpoint layout w1, w3 [E, D, F] and
    w2 [E, F, D], with their float32 scales each when they are quantised (`quant.py`), else None."""

    w1: Any
    w3: Any
    w2: Any
    scales: tuple[Any, Any, Any] | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer's cached keys and values, in the backend's `kv_layout`; with an int8 cache, their float32
    scales per token and KV head (the layout less H), else None."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    def layer(self, i: int) -> LayerCache:
        """Layer i of a cache held as one buffer a layer (tuples)."""
        return LayerCache(*(None if f is None else f[i] for f in dataclasses.astuple(self)))


class Reader(Protocol):
    """Where a model's weights come from, leaf by leaf (`loading.py` has one per checkpoint format). Paths are
    dotted parameter paths of the checkpoint layout (`layers.ffn.w1`)."""

    slices: bool  # whether `read` can read one slice of a leaf

    def arrays(self, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """Whole leaves, each placed with its target's sharding (a host reads only its devices' shards)."""

    def read(self, path: str, index: tuple[int, ...], dtype) -> np.ndarray:
        """One slice of a leaf along its stacked leading axes (`(layer,)` or `(layer, expert)`, `()`: all of
        it) as a host array of `dtype`."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """Plain XLA kernels and the checkpoint layout: the reference (see the module docstring).

    `moe` picks the MoE dispatch strategy (`moe.choose`): `auto` by the number of tokens, or one by name.
    """

    moe: str = "auto"
    name: ClassVar[str] = "reference"
    kv_layout: ClassVar[KVLayout] = TOKEN_MAJOR
    compiler_options: ClassVar[tuple[tuple[str, Any], ...]] = ()  # of every compiled program (`jax.jit`)

    def __post_init__(self) -> None:
        if self.moe not in MOE_STRATEGIES:
            raise ValueError(f"moe must be one of {', '.join(MOE_STRATEGIES)}, got {self.moe!r}")

    def describe(self) -> str:
        """What runs, for messages and benchmarks."""
        return self.name

    # ---- the weights --------------------------------------------------------------------------------------

    def place(self, cfg: ModelConfig, targets: dict[str, jax.ShapeDtypeStruct], reader: Reader) -> dict[str, Any]:
        """The weights as this backend holds them (flat: path -> leaf), read from `reader`; `targets` are the
        checkpoint-layout leaves with their shardings."""
        return reader.arrays(targets)

    def from_checkpoint_layout(self, cfg: ModelConfig, leaves: dict[str, jax.Array]) -> dict[str, Any]:
        """Leaves in the checkpoint layout (path -> array) -> as this backend holds them."""
        return leaves

    def to_checkpoint_layout(self, cfg: ModelConfig, leaves: dict[str, Any]) -> dict[str, jax.Array]:
        """The inverse of `from_checkpoint_layout`."""
        return leaves

    # ---- products -----------------------------------------------------------------------------------------

    def dense(self, spec: str, x: jax.Array, w: jax.Array | quant.QTensor, dtype=None) -> jax.Array:
        """`einsum(spec, x, w)` for activations x [B, T, ...] and a weight, accumulated in float32 and returned
        in `dtype` (default x's); a quantised weight is dequantised, then multiplied."""
        if isinstance(w, quant.QTensor):
            w = w.dequantized()
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(dtype or x.dtype)

    def embed(self, table: jax.Array | quant.QTensor, ids: jax.Array) -> jax.Array:
        """table [V, D] at ids [B, T] -> [B, T, D]; a quantised table's rows are gathered with their scales,
        then multiplied back."""
        if isinstance(table, quant.QTensor):
            return quant.dequantize(self.embed(table.q, ids), self.embed(table.scale, ids), table.dtype)
        return table[ids]

    def unembed(self, x: jax.Array, embedder: jax.Array | quant.QTensor,
                lm_head: jax.Array | quant.QTensor | None) -> jax.Array:
        """Logits [B, T, V] float32 of x [B, T, D] through the LM head [D, V] (None: the tied embedder [V, D]),
        either an array or a `quant.QTensor`."""
        head = embedder.T if lm_head is None else lm_head
        return self.dense("BTD,DV->BTV", x, head.astype(x.dtype), jnp.float32)

    def rope_table(self, positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
        """Positions [B, T] -> their rotary (sin, cos) [B, T, 1, H] float32 (`layers.rope`)."""
        half = head_dim // 2
        inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
        angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)[:, :, None, :]

    # ---- the layer stack ----------------------------------------------------------------------------------

    def run_layers(self, body: Callable, x: jax.Array, layers: Any, kv: Any,
                   keep: jax.Array | None) -> tuple[jax.Array, Any, Any]:
        """Every layer in turn: `body(x, layer_weights, layer_cache, keep)` -> (x, layer cache, router logits),
        over the stacked layer weights and cache (None without a cache) -> (x, cache, router logits stacked).
        `keep` [B]: the result at that index of each row only ([B, 1, D]); a backend may run the last layer's
        queries and FFN there alone."""
        def step(x, xs):
            x, layer_kv, router_logits = body(x, xs[0], xs[1], None)
            return x, (layer_kv, router_logits)

        x, (kv, router_logits) = jax.lax.scan(step, x, (layers, kv))
        return (x if keep is None else at_index(x, keep)), kv, router_logits

    # ---- the KV cache and attention -----------------------------------------------------------------------

    def cache_dtype(self, cfg: ModelConfig):
        return jnp.dtype(jnp.int8 if cfg.kv_cache_dtype == "int8" else cfg.dtype)

    def new_cache(self, cfg: ModelConfig, batch: int, slots: int) -> LayerCache:
        """Zeroed keys and values of every layer, [L, ...] in `kv_layout` (and their scales for int8)."""
        dtype = self.cache_dtype(cfg)
        kv = [cache_zeros(cfg, spec, batch, slots, dtype, stacked=True) for spec in self.kv_layout]
        if dtype == jnp.int8:
            kv += [cache_zeros(cfg, _scale_spec(spec), batch, slots, jnp.float32, stacked=True)
                   for spec in self.kv_layout]
        return LayerCache(*kv)

    def write(self, kv: LayerCache, k: jax.Array, v: jax.Array, slots: jax.Array) -> LayerCache:
        """A layer's cache with new keys and values k, v [B, T, K, H] at slots [B, T] (out of range: dropped);
        an int8 cache stores them rounded, with a scale per token and KV head."""
        ks, vs = self.kv_layout
        if kv.k_scale is None:
            return LayerCache(_scatter(kv.k, k, slots, ks), _scatter(kv.v, v, slots, vs))
        (k, k_scale), (v, v_scale) = quant.quantize_kv(k, -1), quant.quantize_kv(v, -1)
        return LayerCache(_scatter(kv.k, k, slots, ks), _scatter(kv.v, v, slots, vs),
                          _scatter(kv.k_scale, k_scale, slots, _scale_spec(ks)),
                          _scatter(kv.v_scale, v_scale, slots, _scale_spec(vs)))

    def read(self, kv: LayerCache, dtype) -> tuple[jax.Array, jax.Array]:
        """A layer's keys and values to attend to: as held, or an int8 cache's multiplied back into `dtype`."""
        if kv.k_scale is None:
            return kv.k, kv.v
        ks, vs = self.kv_layout
        return (quant.dequantize_kv(kv.k, kv.k_scale, ks.index("H"), dtype),
                quant.dequantize_kv(kv.v, kv.v_scale, vs.index("H"), dtype))

    def insert_rows(self, kv: LayerCache, rows: LayerCache, at: jax.Array) -> LayerCache:
        """`kv` with the batch rows of `rows` (a cache of as many slots and fewer rows) written from row `at`,
        or, where `at` is a vector [R], row r to row `at[r]`."""

        def put(spec: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
            def one(big: jax.Array, small: jax.Array) -> jax.Array:
                axis = spec.index("B") + big.ndim - len(spec)  # past a stacked layer axis
                return insert_rows(big, small.astype(big.dtype), at, axis)
            return one

        ks, vs = self.kv_layout
        specs = (ks, vs, _scale_spec(ks), _scale_spec(vs))
        return LayerCache(*(None if big is None else jax.tree.map(put(spec), big, small)
                            for spec, big, small in zip(specs, dataclasses.astuple(kv), dataclasses.astuple(rows))))

    def self_attention(self, q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                       window: int | None) -> jax.Array:
        """Tokens attending to each other and to nothing else (training, scoring): q [B, T', N, H] at q_pos
        [B, T'] over k, v [B, T, K, H] at positions [B, T] (-1: padding) -> [B, T', N * H], in one
        differentiable softmax."""
        return attend(q, [(k, v, attention_mask(q_pos, positions, window))], TOKEN_MAJOR)

    def prefill_attention(self, q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                          kv: LayerCache, slots: jax.Array, slot_pos: jax.Array,
                          window: int | None) -> tuple[jax.Array, LayerCache]:
        """A first chunk into an empty cache: it attends to its own keys, in blocks (no score matrix over the
        whole chunk), and writes them."""
        out = attend_blocks(q, k, v, q_pos, positions, window, TOKEN_MAJOR)
        return out, self.write(kv, k, v, slots)

    def extend_attention(self, q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                         kv: LayerCache, slots: jax.Array, slot_pos: jax.Array,
                         window: int | None) -> tuple[jax.Array, LayerCache]:
        """A chunk after others: its keys are written, then it attends to the cache (slot positions after the
        write `slot_pos` [B, S]) in blocks up to its last position."""
        kv = self.write(kv, k, v, slots)
        return attend_blocks(q, *self.read(kv, q.dtype), q_pos, slot_pos, window, self.kv_layout), kv

    def decode_attention(self, q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                         kv: LayerCache, slots: jax.Array, slot_pos: jax.Array,
                         window: int | None) -> tuple[jax.Array, LayerCache]:
        """One token per row: written, then attending to every slot it may see."""
        kv = self.write(kv, k, v, slots)
        return attend(q, [(*self.read(kv, q.dtype), attention_mask(q_pos, slot_pos, window))], self.kv_layout), kv

    # ---- experts ------------------------------------------------------------------------------------------

    def expert_arrays(self, experts: Experts, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """w1, w3 [E, D, F] and w2 [E, F, D] in `dtype`; quantised ones multiplied back by their scales."""
        scales = experts.scales or (None,) * 3
        return tuple(_dequantized(w, s, dtype) for w, s in zip(experts[:3], scales))

    def grouped_ffn(self, xs: jax.Array, group_sizes: jax.Array, experts: Experts) -> jax.Array:
        """Rows xs [n, D] sorted by expert (`group_sizes` [E] rows each; rows past them: zero) -> each row
        through its expert's SwiGLU [n, D], as `jax.lax.ragged_dot` computes it."""
        return ragged_ffn(xs, group_sizes, *self.expert_arrays(experts, xs.dtype))

    def warm_routes(self, n_tokens: int, valid: int, top_k: int, n_experts: int, grouped: bool) -> list[np.ndarray]:
        """Expert choices [valid, k] of the valid tokens of runs of the expert kernels over `n_tokens` tokens
        (`grouped_ffn` if `grouped`, else `chosen_ffn`) that between them take every branch the kernels have,
        for a server to run at start-up where a runtime sets a branch up the first time it runs
        (`steering`). These kernels have none."""
        return []

    def chosen_ffn(self, x: jax.Array, expert_ids: jax.Array, experts: Experts) -> jax.Array:
        """x [T, D] through each of its chosen experts expert_ids [T, k] -> [T, k, D]: the chosen experts'
        weights gathered per token (reads only those; few tokens)."""
        w1, w3, w2 = self.expert_arrays(experts, x.dtype)
        xk = jnp.broadcast_to(x[:, None], expert_ids.shape + x.shape[1:])  # [T, k, D]: batched matvecs
        h = jax.nn.silu(jnp.einsum("TKD,TKDF->TKF", xk, w1[expert_ids]))
        h = h * jnp.einsum("TKD,TKDF->TKF", xk, w3[expert_ids])
        return jnp.einsum("TKF,TKFD->TKD", h, w2[expert_ids])


def cache_zeros(cfg: ModelConfig, spec: str, batch: int, slots: int, dtype, stacked: bool) -> jax.Array:
    """Zeroed keys or values of one layer with axes `spec` (B, S, K, H), or of all L stacked in front."""
    sizes = {"B": batch, "S": slots, "K": cfg.n_kv_heads, "H": cfg.head_dim}
    shape, axes = tuple(sizes[a] for a in spec), tuple(_KV_AXES[a] for a in spec)
    if stacked:
        shape, axes = (cfg.n_layers, *shape), (sh.LAYERS, *axes)
    return sh.constrain(jnp.zeros(shape, dtype), axes)


def _scale_spec(spec: str) -> str:
    """The axes of an int8 cache's scales: the keys' or values' less the head dim."""
    return spec.replace("H", "")


def routes_for(group_sizes: np.ndarray, n_tokens: int, top_k: int) -> np.ndarray:
    """Expert choices [n_tokens, k] that give expert e `group_sizes[e]` token copies (summing to n_tokens * k,
    each at most n_tokens): the copies in expert order, token t taking copies t, t + n_tokens, ..., which
    belong to distinct experts as none holds more than n_tokens."""
    copies = np.repeat(np.arange(len(group_sizes)), group_sizes)
    return copies.reshape(top_k, n_tokens).T


def per_choice(x: jax.Array, expert_ids: jax.Array, n_experts: int,
               grouped_ffn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """x [T, D] through each of its chosen experts expert_ids [T, k] -> [T, k, D], by sorting the token copies
    by expert, running `grouped_ffn(rows, group_sizes)` over them and unsorting (ids past the experts, the
    sentinel of experts held elsewhere, sort last and come back zero)."""
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)  # drops the sentinel id E
    ys = grouped_ffn(x[order // k], group_sizes)  # [T*k, D], grouped by expert
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return ys[inverse].reshape(t, k, -1)  # unsorted by a gather: a scatter into zeros wrote ys twice


def ragged_ffn(xs: jax.Array, group_sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """Rows xs [n, D] grouped by expert -> SwiGLU [n, D] with `jax.lax.ragged_dot`."""
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, group_sizes)) * jax.lax.ragged_dot(xs, w3, group_sizes)
    return jax.lax.ragged_dot(h, w2, group_sizes)


def at_index(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, T, ...] at index [B] of each row -> [B, 1, ...]."""
    return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


def _dequantized(w: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    return w.astype(dtype) if scale is None else quant.dequantize(w, scale, dtype)


def _scatter(cache: jax.Array, new: jax.Array, slots: jax.Array, spec: str) -> jax.Array:
    """cache (one layer, axes `spec`) with new [B, T, K, H] written at slots [B, T]: indexed by batch rows and
    slots, the cache's remaining axes keep their order (K before H in every layout here)."""
    batch = jnp.arange(new.shape[0])[:, None]
    index = tuple(batch if a == "B" else slots if a == "S" else slice(None) for a in spec)
    return cache.at[index].set(new.astype(cache.dtype), mode="drop")


def insert_rows(big: jax.Array, small: jax.Array, at: jax.Array, axis: int = 0) -> jax.Array:
    """`big` with the rows of `small` along `axis` written from row `at`, or, where `at` is a vector [R], row r
    to row `at[r]`."""
    if jnp.ndim(at) == 0:
        return jax.lax.dynamic_update_slice_in_dim(big, small, at, axis)
    for r in range(small.shape[axis]):
        big = jax.lax.dynamic_update_slice_in_dim(big, jax.lax.dynamic_slice_in_dim(small, r, 1, axis), at[r], axis)
    return big
