"""The runtime layout of the layer weights for inference: stacked (scanned) or split into whole buffers.

Legend: L layers, E experts.

XLA:CPU copies any slice of an array before a matmul reads it, so on CPU a scan over stacked [L, ...]
weights and experts picked out of [E, D, F] copy every weight a step reads: a decode step moves each byte
three times instead of once. The split layout holds each layer's weights, and each expert's, in buffers of
their own (the expert matrices and their int8 scales become tuples of E arrays): the layers run unrolled
and every matmul reads its weights where they lie. Stacked stays the public format (checkpoints, training,
export, quantisation, expert parallelism); a model handle makes its split copy once, for inference.
"""

from __future__ import annotations

import jax
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.errors import MixtralError

EXPERT_WEIGHTS = ("w1", "w3", "w2")
SPLIT_FROM_BYTES = 64 << 20  # `auto` splits layer weights from this size on (twice a large L3 cache)


def use_split(cfg: ModelConfig, mesh: jax.sharding.Mesh | None, layer_bytes: int) -> bool:
    """`layout` auto: split on one CPU device once the layer weights (`layer_bytes`) outgrow the caches
    (smaller ones are copied cheaply, and the unrolled program takes longer to compile); stacked on
    accelerators and on meshes of several devices (expert parallelism needs the experts stacked)."""
    devices = 1 if mesh is None else mesh.devices.size
    if cfg.layout == "split" and devices > 1:
        raise MixtralError("layout 'split' runs on a single device; use 'stacked' or 'auto' on a mesh")
    if cfg.layout == "auto":
        return (devices == 1 and layer_bytes >= SPLIT_FROM_BYTES
                and (jax.devices() if mesh is None else mesh.devices.flat)[0].platform == "cpu")
    return cfg.layout == "split"


def split(cfg: ModelConfig, layers: nnx.State) -> tuple[nnx.State, ...]:
    """Stacked layer weights (leaves [L, ...]) -> one state per layer, each leaf its own buffer; a MoE
    model's expert leaves ([E, ...] in a layer) become tuples of E buffers."""

    def is_expert(path: tuple) -> bool:
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return cfg.is_moe and keys[0] == "ffn" and keys[-1] in EXPERT_WEIGHTS

    def leaf(path: tuple, x: jax.Array) -> tuple:
        parts = _unstack(x)
        return tuple(_unstack(p) for p in parts) if is_expert(path) else parts

    per_leaf = jax.tree_util.tree_map_with_path(leaf, layers)  # each leaf: L parts
    return tuple(jax.tree.map(lambda parts, i=i: parts[i], per_leaf, is_leaf=lambda v: isinstance(v, tuple))
                 for i in range(cfg.n_layers))


@jax.jit
def _unstack(x: jax.Array) -> tuple[jax.Array, ...]:
    """[N, ...] -> N arrays [...] in buffers of their own."""
    return tuple(x[i] for i in range(x.shape[0]))
