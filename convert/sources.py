"""Checkpoint folders as they are published, opened as one lazy tensor source.

Formats: Hugging Face (`config.json` with `model.safetensors` or shards plus `model.safetensors.index.json`)
and Mistral's native release (`params.json` with `consolidated*.safetensors`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mixtral_jax import config as config_lib
from mixtral_jax.config import ModelConfig
from mixtral_jax.errors import CheckpointError
from mixtral_jax.convert import mapping
from mixtral_jax.convert.safetensors_io import SafetensorsFile

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass
class Source:
    """Tensors by name across a folder's files, with the config and naming scheme they follow."""

    path: Path
    kind: str
    naming: str
    config: ModelConfig
    files: dict[str, SafetensorsFile]
    tokenizer: Path | None

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[name].get(name)

    def file_of(self, name: str) -> Path:
        return self.files[name].path

    def check(self) -> None:
        """Every expected tensor present with the shape the config implies, and nothing unknown left."""
        cfg, expected = self.config, set()
        for rule in mapping.rules_for(self.naming, cfg):
            for name in mapping.source_names(rule, cfg):
                expected.add(name)
                if name not in self.files:
                    raise CheckpointError(f"{self.path}: tensor {name} is missing")
                want = expected_shape(rule, cfg)
                if self.shape(name) != want:
                    raise CheckpointError(
                        f"{self.file_of(name)}: tensor {name} has shape {list(self.shape(name))}, "
                        f"the config implies {list(want)}"
                    )
        extra = sorted(n for n in set(self.files) - expected if not n.endswith(IGNORED_SUFFIXES))
        if extra:
            raise CheckpointError(f"{self.file_of(extra[0])}: unexpected tensor {extra[0]}")


def expected_shape(rule: mapping.Rule, cfg: ModelConfig) -> tuple[int, ...]:
    """The source shape a rule expects, in PyTorch `[out, in]` layout."""
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {
        "embedder": (v, d), "lm_head": (v, d), "final_norm.scale": (d,),
        "layers.attn.wq": (q, d), "layers.attn.wk": (kv, d), "layers.attn.wv": (kv, d),
        "layers.attn.wo": (d, q), "layers.attn_norm.scale": (d,), "layers.ffn_norm.scale": (d,),
        "layers.ffn.router": (cfg.n_experts, d), "layers.ffn.w1": (f, d), "layers.ffn.w3": (f, d),
        "layers.ffn.w2": (d, f),
    }
    return shapes[rule.target]


def open_source(path: str | Path) -> Source:
    """Detect the format of a folder and open its tensors lazily."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint folder")
    tokenizer = next((path / n for n in TOKENIZER_FILES if (path / n).is_file()), None)
    if (path / "config.json").is_file():
        cfg = config_lib.from_hf_config(_read_json(path / "config.json"))
        files = _hf_files(path)
        return Source(path, "hf", "hf", cfg, _index(files), tokenizer)
    if (path / "params.json").is_file():
        cfg = config_lib.from_params_json(_read_json(path / "params.json"))
        files = sorted(path.glob("consolidated*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: params.json but no consolidated*.safetensors file")
        dtype = SafetensorsFile(files[0])
        cfg = cfg.with_dtype(_dtype_name(dtype.dtype(dtype.keys()[0]))) if dtype.keys() else cfg
        return Source(path, "mistral", "mistral", cfg, _index(files), tokenizer)
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json or params.json)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _hf_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} named in the index is missing")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: config.json but no .safetensors files")
    return files


def _index(paths: list[Path]) -> dict[str, SafetensorsFile]:
    files: dict[str, SafetensorsFile] = {}
    for p in paths:
        f = SafetensorsFile(p)
        for name in f.keys():
            if name in files:
                raise CheckpointError(f"{p}: tensor {name} also appears in {files[name].path.name}")
            files[name] = f
    return files


def _dtype_name(dtype: np.dtype) -> str:
    return {"float32": "float32", "float16": "float16"}.get(np.dtype(dtype).name, "bfloat16")
