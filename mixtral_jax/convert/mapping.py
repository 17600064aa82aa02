"""Foreign tensor names -> this project's parameter paths, as declarative tables.

A rule's source pattern may hold `{layer}` and `{expert}`; the target parameter then has those as its
leading axes ([L, ...] and [L, E, ...]). Transforms turn one source tensor (PyTorch `[out, in]` layout)
into one slice of the target in einsum layout.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from mixtral_jax.config import ModelConfig
from mixtral_jax.errors import CheckpointError

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...
    def file_of(self, name: str) -> Path: ...
    def label(self, name: str) -> str: ...


def check_finite(w: np.ndarray, source: TensorSource, name: str, opt_out: str) -> None:
    """Refuse NaN or inf in `w`, the values (all or a block) of source tensor `name`, naming it and its file;
    `opt_out` tells the user how to accept them anyway. Integer and bool tensors hold neither."""
    if w.dtype.kind not in "biu" and not np.isfinite(w).all():
        raise CheckpointError(
            f"{source.file_of(name)}: tensor {source.label(name)} holds NaN or inf values ({opt_out})"
        )


def identity(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return w


def transpose(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return w.T


def q_in(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """[N*H, D] -> [D, N, H]."""
    return w.T.reshape(cfg.dim, cfg.n_heads, cfg.head_dim)


def kv_in(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """[K*H, D] -> [D, K, H]."""
    return w.T.reshape(cfg.dim, cfg.n_kv_heads, cfg.head_dim)


def o_out(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """[D, N*H] -> [N, H, D]."""
    return w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.dim)


def interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from RoPE's interleaved pair order (Mistral) to half-split order (ours, HF)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def half_to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half`."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def mistral_q_in(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return q_in(interleaved_to_half(w, cfg.n_heads), cfg)


def mistral_k_in(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return kv_in(interleaved_to_half(w, cfg.n_kv_heads), cfg)


# Where a block of a source tensor's rows lands in the transformed tensor (its axis there), for the
# transforms that can work a block at a time; the others need whole tensors.
ROW_AXIS: dict[Transform, int] = {identity: 0, transpose: 1}


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str
    target: str
    transform: Transform = identity

    @property
    def stacked_axes(self) -> int:
        return ("{layer}" in self.source) + ("{expert}" in self.source)


HF_RULES = (
    Rule("model.embed_tokens.weight", "embedder"),
    Rule("model.layers.{layer}.self_attn.q_proj.weight", "layers.attn.wq", q_in),
    Rule("model.layers.{layer}.self_attn.k_proj.weight", "layers.attn.wk", kv_in),
    Rule("model.layers.{layer}.self_attn.v_proj.weight", "layers.attn.wv", kv_in),
    Rule("model.layers.{layer}.self_attn.o_proj.weight", "layers.attn.wo", o_out),
    Rule("model.layers.{layer}.input_layernorm.weight", "layers.attn_norm.scale"),
    Rule("model.layers.{layer}.post_attention_layernorm.weight", "layers.ffn_norm.scale"),
    Rule("model.norm.weight", "final_norm.scale"),
    Rule("lm_head.weight", "lm_head", transpose),
)
HF_MOE_RULES = (
    Rule("model.layers.{layer}.block_sparse_moe.gate.weight", "layers.ffn.router", transpose),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight", "layers.ffn.w1", transpose),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight", "layers.ffn.w3", transpose),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight", "layers.ffn.w2", transpose),
)
HF_DENSE_RULES = (
    Rule("model.layers.{layer}.mlp.gate_proj.weight", "layers.ffn.w1", transpose),
    Rule("model.layers.{layer}.mlp.up_proj.weight", "layers.ffn.w3", transpose),
    Rule("model.layers.{layer}.mlp.down_proj.weight", "layers.ffn.w2", transpose),
)
MISTRAL_RULES = (
    Rule("tok_embeddings.weight", "embedder"),
    Rule("layers.{layer}.attention.wq.weight", "layers.attn.wq", mistral_q_in),
    Rule("layers.{layer}.attention.wk.weight", "layers.attn.wk", mistral_k_in),
    Rule("layers.{layer}.attention.wv.weight", "layers.attn.wv", kv_in),
    Rule("layers.{layer}.attention.wo.weight", "layers.attn.wo", o_out),
    Rule("layers.{layer}.attention_norm.weight", "layers.attn_norm.scale"),
    Rule("layers.{layer}.ffn_norm.weight", "layers.ffn_norm.scale"),
    Rule("norm.weight", "final_norm.scale"),
    Rule("output.weight", "lm_head", transpose),
)
MISTRAL_MOE_RULES = (
    Rule("layers.{layer}.feed_forward.gate.weight", "layers.ffn.router", transpose),
    Rule("layers.{layer}.feed_forward.experts.{expert}.w1.weight", "layers.ffn.w1", transpose),
    Rule("layers.{layer}.feed_forward.experts.{expert}.w3.weight", "layers.ffn.w3", transpose),
    Rule("layers.{layer}.feed_forward.experts.{expert}.w2.weight", "layers.ffn.w2", transpose),
)
MISTRAL_DENSE_RULES = (
    Rule("layers.{layer}.feed_forward.w1.weight", "layers.ffn.w1", transpose),
    Rule("layers.{layer}.feed_forward.w3.weight", "layers.ffn.w3", transpose),
    Rule("layers.{layer}.feed_forward.w2.weight", "layers.ffn.w2", transpose),
)


@dataclasses.dataclass(frozen=True)
class Alias:
    """A tensor published under another name, presented under the name a rule reads.

    With `split_experts` the stored tensor stacks every expert's rows MegaBlocks-style ([E*F, D]) and is
    presented as one tensor per expert (`{expert}` in `name`); `transposed` marks experts stored as the
    transpose of the presented layout.
    """

    stored: str
    name: str
    split_experts: bool = False
    transposed: bool = False

    def stored_name(self, name: str) -> str | None:
        """The stored tensor that presents `name`, if this alias covers it."""
        pattern = re.escape(self.name).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"\d+")
        match = re.fullmatch(pattern, name)
        return self.stored.format(layer=match["layer"]) if match else None


# The Hub's original `consolidated.NN.pt` release of Mixtral, under Mistral's per-expert names.
MEGABLOCKS_ALIASES = (
    Alias("layers.{layer}.block_sparse_moe.gate.weight", "layers.{layer}.feed_forward.gate.weight"),
    Alias("layers.{layer}.block_sparse_moe.w1", "layers.{layer}.feed_forward.experts.{expert}.w1.weight", True),
    Alias("layers.{layer}.block_sparse_moe.w3", "layers.{layer}.feed_forward.experts.{expert}.w3.weight", True),
    Alias("layers.{layer}.block_sparse_moe.w2", "layers.{layer}.feed_forward.experts.{expert}.w2.weight", True,
          transposed=True),
)
NAMING = {
    "hf": (HF_RULES, HF_MOE_RULES, HF_DENSE_RULES),
    "mistral": (MISTRAL_RULES, MISTRAL_MOE_RULES, MISTRAL_DENSE_RULES),
}


def rules_for(naming: str, cfg: ModelConfig) -> tuple[Rule, ...]:
    """The rules of a naming scheme (`hf` or `mistral`) for this architecture, one per parameter."""
    common, moe, dense = NAMING[naming]
    rules = common + (moe if cfg.is_moe else dense)
    if cfg.tie_embeddings:
        rules = tuple(r for r in rules if r.target != "lm_head")
    return rules


def source_names(rule: Rule, cfg: ModelConfig) -> Iterator[str]:
    """Every source tensor name a rule reads."""
    for layer in range(cfg.n_layers) if "{layer}" in rule.source else [None]:
        for expert in range(cfg.n_experts) if "{expert}" in rule.source else [None]:
            yield rule.source.format(layer=layer, expert=expert)


def assemble(rule: Rule, source: TensorSource, cfg: ModelConfig, index: tuple[slice, ...], dtype,
             allow_non_finite: bool = False) -> np.ndarray:
    """The slice `index` of a rule's target parameter, reading only the source tensors it covers; the
    values read are refused if any is NaN or inf, unless `allow_non_finite`."""
    n_stacked = rule.stacked_axes
    stacked, rest = index[:n_stacked], index[n_stacked:]
    counts = (cfg.n_layers, cfg.n_experts)[:n_stacked]
    ranges = [range(*s.indices(n)) for s, n in zip(stacked, counts)]

    def one(layer: int | None = None, expert: int | None = None) -> np.ndarray:
        name = rule.source.format(layer=layer, expert=expert)
        w = rule.transform(source.get(name), cfg)[rest]
        if not allow_non_finite:
            check_finite(w, source, name, "load it with allow_non_finite=True, or convert it with "
                                          "--allow-non-finite, to use it anyway")
        return np.asarray(w, dtype=dtype)

    if n_stacked == 0:
        return one()
    if n_stacked == 1:
        return np.stack([one(layer) for layer in ranges[0]])
    return np.stack([np.stack([one(layer, e) for e in ranges[1]]) for layer in ranges[0]])
