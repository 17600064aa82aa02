"""Model configuration: a frozen dataclass, presets from `configs/models`, foreign config readers."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import tomllib
from typing import Any, Mapping

from mixtral_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("auto", "reference", "grouped", "decode")
GROUPED_KERNELS = ("auto", "blocked", "ragged_dot", "megablox")  # the grouped path's matmuls (`moe.grouped`)
LAYOUTS = ("auto", "stacked", "split")  # the layer weights' runtime layout for inference (`layout.py`)
ATTENTION_IMPLS = ("auto", "xla", "dot_product")  # how tokens attend to each other (`layers.self_attention`)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the numeric settings the model runs with.

    `n_experts == 0` means a dense SwiGLU MLP (Mistral 7B). `dtype` is the compute dtype and
    `param_dtype` the storage dtype; router, norms, attention softmax and logits are always float32.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    n_experts: int = 8
    top_k: int = 2
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768
    sliding_window: int | None = None
    tie_embeddings: bool = False
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    bos_id: int = 1
    eos_id: int = 2
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    moe_impl: str = "auto"
    grouped_kernel: str = "auto"
    layout: str = "auto"
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.n_experts and not 0 < self.top_k <= self.n_experts:
            raise ConfigError(f"config: top_k must be in [1, {self.n_experts}], got {self.top_k}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config: sliding_window must be positive or null, got {self.sliding_window}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"config: {name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"config: moe_impl must be one of {', '.join(MOE_IMPLS)}, got {self.moe_impl!r}")
        if self.grouped_kernel not in GROUPED_KERNELS:
            raise ConfigError(f"config: grouped_kernel must be one of {', '.join(GROUPED_KERNELS)}, "
                              f"got {self.grouped_kernel!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"config: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"config: attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                              f"got {self.attention_impl!r}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_dtype(self, dtype: str | None) -> ModelConfig:
        """The same model stored and computed in `dtype` (None keeps both)."""
        return self if dtype is None else self.replace(dtype=dtype, param_dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config: unknown keys {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def preset_names() -> list[str]:
    files = importlib.resources.files("mixtral_jax.configs.models").iterdir()
    return sorted(p.name[: -len(".toml")] for p in files if p.name.endswith(".toml"))


def preset(name: str) -> ModelConfig:
    """A named preset from `configs/models/NAME.toml`."""
    if name not in preset_names():
        raise ConfigError(f"unknown config {name!r}; presets: {', '.join(preset_names())}")
    text = importlib.resources.files("mixtral_jax.configs.models").joinpath(f"{name}.toml").read_text()
    return ModelConfig.from_dict(tomllib.loads(text))


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """A Hugging Face `config.json` (model_type mixtral or mistral), old and new rope layouts."""
    model_type = hf.get("model_type", "mixtral")
    if model_type not in ("mixtral", "mistral"):
        raise ConfigError(f"config.json: model_type {model_type!r} is not mixtral or mistral")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        theta = 1e6 if model_type == "mixtral" else 1e4
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ConfigError("config.json: only default RoPE is supported (no rope scaling)")
    try:
        n_heads = hf["num_attention_heads"]
        moe = model_type == "mixtral"
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            ffn_dim=hf["intermediate_size"],
            n_experts=hf.get("num_local_experts", 8) if moe else 0,
            top_k=hf.get("num_experts_per_tok", 2) if moe else 0,
            rope_theta=float(theta),
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            max_seq_len=hf.get("max_position_embeddings", 32768),
            sliding_window=hf.get("sliding_window"),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02) if moe else 0.0,
            bos_id=_first(hf.get("bos_token_id"), 1),
            eos_id=_first(hf.get("eos_token_id"), 2),
            dtype=_hf_dtype(hf),
            param_dtype=_hf_dtype(hf),
        )
    except KeyError as e:
        raise ConfigError(f"config.json: missing key {e.args[0]!r}") from None


def from_params_json(params: Mapping[str, Any]) -> ModelConfig:
    """Mistral's `params.json`; without `rope_theta` a MoE model means Mixtral's 1e6."""
    moe = params.get("moe") or {}
    try:
        n_heads = params["n_heads"]
        return ModelConfig(
            vocab_size=params["vocab_size"],
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads", n_heads),
            head_dim=params.get("head_dim") or params["dim"] // n_heads,
            ffn_dim=params["hidden_dim"],
            n_experts=moe.get("num_experts", 0),
            top_k=moe.get("num_experts_per_tok", 0),
            rope_theta=float(params.get("rope_theta", 1e6 if moe else 1e4)),
            norm_eps=params.get("norm_eps", 1e-5),
            max_seq_len=params.get("max_seq_len", 32768),
            sliding_window=params.get("sliding_window"),
        )
    except KeyError as e:
        raise ConfigError(f"params.json: missing key {e.args[0]!r}") from None


def _first(value: int | list[int] | None, default: int) -> int:
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def _hf_dtype(hf: Mapping[str, Any]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    return name if name in DTYPES else "bfloat16"
