"""Model configuration: a frozen dataclass, presets from `configs/models`, foreign config readers."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from mixtral_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("none", "int8", "int4")  # the large matrices' storage (`quant.py`)
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the backend's choice (the compute dtype, or wider)
# Keys of configs written by earlier versions that named runtime choices, which backends make now
# (`backends/`): read and ignored.
RUNTIME_KEYS = ("moe_impl", "grouped_kernel", "layout", "attention_impl")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the numeric settings the model runs with.

    `n_experts == 0` means a dense SwiGLU MLP (Mistral 7B). `dtype` is the compute dtype and
    `param_dtype` the storage dtype; router, norms, attention softmax and logits are always float32.
    `quantize`: the attention projections and experts (or MLP) are stored in int8 (a float32 scale per
    output channel) or int4 (a float32 scale per `quant_group` entries along the contracted axes), `quant.py`;
    with `quantize_vocab`, the embedding table and LM head too.
    `kv_cache_dtype = "int8"`: the KV cache holds int8 keys and values with a float32 scale per token and KV
    head.
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
    quantize: str = "none"
    quant_group: int = 128
    quantize_vocab: bool = False
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(vars(self), "config")

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
    def from_dict(cls, data: Any, source: str | os.PathLike = "config") -> ModelConfig:
        """A config from the keys of a JSON or TOML file; problems are reported against `source`."""
        data = {k: v for k, v in _object(data, source).items() if k not in RUNTIME_KEYS}
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{source}: unknown keys {', '.join(unknown)}")
        missing = [name for name, f in _FIELDS.items() if f.default is dataclasses.MISSING and name not in data]
        if missing:
            raise ConfigError(f"{source}: missing key {missing[0]!r}")
        return _build(source, data)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        return cls.from_dict(read_json(path), path)


_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
_POSITIVE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "rope_theta",
             "norm_eps", "max_seq_len", "sliding_window", "quant_group")
_NON_NEGATIVE = ("n_experts", "top_k", "router_aux_loss_coef", "router_z_loss_coef", "bos_id", "eos_id")
_CHOICES = {"dtype": DTYPES, "param_dtype": DTYPES, "quantize": QUANTIZE, "kv_cache_dtype": KV_CACHE_DTYPES}
# A field's annotation -> what its value must be, and the test. A bool is an int to Python but never a count
# here, and a float must be finite: the model computes with these and shapes its arrays by them.
_TYPES = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "int | None": ("an integer or null", lambda v: v is None or isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number",
              lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def _field_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` as the field `name` (a phrase to follow the field's name), or None."""
    if name in _CHOICES:
        if isinstance(value, str) and value in _CHOICES[name]:
            return None
        return f"must be one of {', '.join(_CHOICES[name])}, got {_show(value)}"
    what, test = _TYPES[_FIELDS[name].type]
    if not test(value):
        return f"must be {what}, got {_show(value)}"
    if value is None:
        return None
    if name in _POSITIVE and value <= 0:
        return f"must be positive{' or null' if name == 'sliding_window' else ''}, got {_show(value)}"
    if name in _NON_NEGATIVE and value < 0:
        return f"must not be negative, got {_show(value)}"
    return None


def _check(values: Mapping[str, Any], source: str | os.PathLike, keys: Mapping[str, str] | None = None) -> None:
    """Raise a ConfigError `SOURCE: KEY ...` for the first problem of a config's field values; `keys` maps
    fields to the names a foreign file gives them."""
    keys = keys or {}

    def key(name: str) -> str:
        return keys.get(name, name)

    for name in _FIELDS:
        problem = _field_problem(name, values[name])
        if problem:
            raise ConfigError(f"{source}: {key(name)} {problem}")
    v = values
    if v["n_heads"] % v["n_kv_heads"]:
        raise ConfigError(f"{source}: {key('n_heads')} ({v['n_heads']}) must be a multiple of "
                          f"{key('n_kv_heads')} ({v['n_kv_heads']})")
    if v["n_experts"] and not 0 < v["top_k"] <= v["n_experts"]:
        raise ConfigError(f"{source}: {key('top_k')} must be in [1, {v['n_experts']}], got {v['top_k']}")
    if v["quantize"] == "int4":
        _check_group(v, source, key("quant_group"))
    if v["quantize_vocab"] and v["quantize"] == "none":
        raise ConfigError(f"{source}: {key('quantize_vocab')} needs {key('quantize')} int8 or int4")
    for name in ("bos_id", "eos_id"):
        if v[name] >= v["vocab_size"]:
            raise ConfigError(f"{source}: {key(name)} ({v[name]}) must be below {key('vocab_size')} "
                              f"({v['vocab_size']})")


def _check_group(v: Mapping[str, Any], source: str | os.PathLike, key: str) -> None:
    """int4's group must divide each quantised weight's contracted entries: the model dim (wq, wk, wv, w1,
    w3, and the embedder's rows and LM head's columns), the FFN dim (w2), and heads x head dim (wo), there in
    whole heads or parts of one."""
    g, h = v["quant_group"], v["head_dim"]
    contracted = {"the model dim": v["dim"], "the FFN dim": v["ffn_dim"], "heads x head dim": v["n_heads"] * h}
    for what, n in contracted.items():
        if n % g:
            raise ConfigError(f"{source}: {key} ({g}) does not divide {what} ({n})")
    if h % g and g % h:
        raise ConfigError(f"{source}: {key} ({g}) must divide the head dim ({h}) or be a multiple of it")


def _build(source: str | os.PathLike, values: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> ModelConfig:
    """A ModelConfig of `values` read from `source`, checked first so that problems name the file and its keys."""
    defaults = {name: f.default for name, f in _FIELDS.items() if f.default is not dataclasses.MISSING}
    _check({**defaults, **values}, source, keys)
    return ModelConfig(**values)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in the file `path`; a ConfigError naming the file when it is unreadable, not JSON or
    not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    return _object(data, path)


def _object(data: Any, source: str | os.PathLike, key: str | None = None) -> dict[str, Any]:
    """`data` if it is a JSON object (a dict), else a ConfigError naming `source` (and the `key` holding it)."""
    if isinstance(data, dict):
        return data
    where = f"{key} must be" if key else "expected"
    raise ConfigError(f"{source}: {where} a JSON object, got {_json_kind(data)}")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return next((kind for t, kind in kinds.items() if isinstance(value, t)), type(value).__name__)


def _show(value: Any) -> str:
    """A value as the JSON file would spell it (`"4096"`, `null`, `true`)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def stacked_axes(cfg: ModelConfig, path: str) -> int:
    """How many leading axes of the checkpoint-layout parameter `path` (dotted, `layers.ffn.w1`) index layers
    and experts: 2 for expert weights and their scales ([L, E, ...]), 1 for other layer weights ([L, ...]),
    else 0. Parameter paths are a public API: checkpoints hold them."""
    if not path.startswith("layers."):
        return 0
    return 2 if cfg.is_moe and path.startswith("layers.ffn.") and path.rsplit(".", 1)[-1] in ("w1", "w3", "w2") else 1


def preset_names() -> list[str]:
    files = importlib.resources.files("mixtral_jax.configs.models").iterdir()
    return sorted(p.name[: -len(".toml")] for p in files if p.name.endswith(".toml"))


def preset(name: str) -> ModelConfig:
    """A named preset from `configs/models/NAME.toml`."""
    if name not in preset_names():
        raise ConfigError(f"unknown config {name!r}; presets: {', '.join(preset_names())}")
    file = importlib.resources.files("mixtral_jax.configs.models").joinpath(f"{name}.toml")
    return ModelConfig.from_dict(tomllib.loads(file.read_text()), str(file))


# ModelConfig field -> its key in a Hugging Face `config.json`, and in Mistral's `params.json`.
_HF_KEYS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "ffn_dim": "intermediate_size", "n_experts": "num_local_experts", "top_k": "num_experts_per_tok",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "max_seq_len": "max_position_embeddings",
    "sliding_window": "sliding_window", "tie_embeddings": "tie_word_embeddings",
    "router_aux_loss_coef": "router_aux_loss_coef", "bos_id": "bos_token_id", "eos_id": "eos_token_id",
}
_PARAMS_KEYS = {
    "vocab_size": "vocab_size", "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads",
    "n_kv_heads": "n_kv_heads", "head_dim": "head_dim", "ffn_dim": "hidden_dim", "n_experts": "moe.num_experts",
    "top_k": "moe.num_experts_per_tok", "rope_theta": "rope_theta", "norm_eps": "norm_eps",
    "max_seq_len": "max_seq_len", "sliding_window": "sliding_window",
}
_REQUIRED = object()


class _Reader:
    """The fields of a foreign config file, each checked as it is read so that a problem names the file's key.

    An absent or null key takes the default given; without one it is an error.
    """

    def __init__(self, data: Any, source: str | os.PathLike, keys: Mapping[str, str]):
        self.data, self.source, self.keys = _object(data, source), source, keys

    def __call__(self, name: str, default: Any = _REQUIRED, key: str | None = None) -> Any:
        """The field `name`, stored under `key` (default: its key in `keys`; `moe.num_experts` is a key of the
        object under `moe`)."""
        key = key or self.keys[name]
        *outer, last = key.split(".")
        data = self.data
        for part in outer:
            data = _object(data.get(part) or {}, self.source, part)
        value = data.get(last)
        if value is None and default is not _REQUIRED:
            return default
        if last not in data:
            raise ConfigError(f"{self.source}: missing key {key!r}")
        return self.check(name, key, value)

    def check(self, name: str, key: str, value: Any) -> Any:
        problem = _field_problem(name, value)
        if problem:
            raise ConfigError(f"{self.source}: {key} {problem}")
        return value

    def build(self, **values: Any) -> ModelConfig:
        return _build(self.source, values, self.keys)


def from_hf_config(hf: Mapping[str, Any], source: str | os.PathLike = "config.json") -> ModelConfig:
    """A Hugging Face `config.json` (model_type mixtral or mistral), old and new rope layouts; problems are
    reported against `source`."""
    read = _Reader(hf, source, _HF_KEYS)
    model_type = read.data.get("model_type", "mixtral")
    if model_type not in ("mixtral", "mistral"):
        raise ConfigError(f"{source}: model_type {_show(model_type)} is not mixtral or mistral")
    rope = _object(read.data.get("rope_parameters") or {}, source, "rope_parameters")
    if rope.get("rope_type", "default") != "default" or read.data.get("rope_scaling"):
        raise ConfigError(f"{source}: only default RoPE is supported (no rope scaling)")
    moe = model_type == "mixtral"
    theta = read("rope_theta", None, "rope_parameters.rope_theta")
    if theta is None:
        theta = read("rope_theta", 1e6 if moe else 1e4)
    dim, n_heads = read("dim"), read("n_heads")
    return read.build(
        vocab_size=read("vocab_size"),
        dim=dim,
        n_layers=read("n_layers"),
        n_heads=n_heads,
        n_kv_heads=read("n_kv_heads", n_heads),
        head_dim=read("head_dim", dim // n_heads),
        ffn_dim=read("ffn_dim"),
        n_experts=read("n_experts", 8) if moe else 0,
        top_k=read("top_k", 2) if moe else 0,
        rope_theta=float(theta),
        norm_eps=read("norm_eps", 1e-5),
        max_seq_len=read("max_seq_len", 32768),
        sliding_window=read("sliding_window", None),
        tie_embeddings=read("tie_embeddings", False),
        router_aux_loss_coef=read("router_aux_loss_coef", 0.02) if moe else 0.0,
        bos_id=_first_id(read, "bos_id", 1),
        eos_id=_first_id(read, "eos_id", 2),
        dtype=_hf_dtype(read.data),
        param_dtype=_hf_dtype(read.data),
    )


def from_params_json(params: Mapping[str, Any], source: str | os.PathLike = "params.json") -> ModelConfig:
    """Mistral's `params.json`; without `rope_theta` a MoE model means Mixtral's 1e6. Problems are reported
    against `source`."""
    read = _Reader(params, source, _PARAMS_KEYS)
    moe = bool(_object(read.data.get("moe") or {}, source, "moe"))
    dim, n_heads = read("dim"), read("n_heads")
    return read.build(
        vocab_size=read("vocab_size"),
        dim=dim,
        n_layers=read("n_layers"),
        n_heads=n_heads,
        n_kv_heads=read("n_kv_heads", n_heads),
        head_dim=read("head_dim", dim // n_heads),
        ffn_dim=read("ffn_dim"),
        n_experts=read("n_experts", 0),
        top_k=read("top_k", 0),
        rope_theta=float(read("rope_theta", 1e6 if moe else 1e4)),
        norm_eps=read("norm_eps", 1e-5),
        max_seq_len=read("max_seq_len", 32768),
        sliding_window=read("sliding_window", None),
    )


def _first_id(read: _Reader, name: str, default: int) -> int:
    """A token id, which a Hugging Face config may give as a list of ids (the first counts)."""
    key = read.keys[name]
    ids = read.data.get(key)
    if isinstance(ids, list):
        return read.check(name, key, ids[0]) if ids else default
    return read(name, default)


def _hf_dtype(hf: Mapping[str, Any]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    return name if name in DTYPES else "bfloat16"
