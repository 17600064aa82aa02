"""Checkpoint folders as they are published, opened as one lazy tensor source.

Formats: Hugging Face (`config.json` with `model.safetensors` or shards plus `model.safetensors.index.json`);
Mistral's native release (`params.json` with `consolidated*.safetensors` or `consolidated.NN.pth`); and the
Hub's original `consolidated.NN.pt` set, whose MegaBlocks-stacked experts are presented under Mistral's
per-expert names (`mapping.MEGABLOCKS_ALIASES`) so that the Mistral rules apply unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from mixtral_jax import config as config_lib
from mixtral_jax.config import ModelConfig
from mixtral_jax.convert import mapping
from mixtral_jax.convert.safetensors_io import SafetensorsFile
from mixtral_jax.convert.torch_io import TorchFile
from mixtral_jax.errors import CheckpointError, ConfigError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")  # RoPE tables, recomputed
TORCH_PATTERNS = ("consolidated*.pth", "consolidated*.pt")


class TensorFile(Protocol):
    """One file of named tensors: shapes up front, data read lazily."""

    path: Path

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def get(self, name: str) -> np.ndarray: ...
    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray: ...


@dataclasses.dataclass
class Source:
    """Tensors by name across a folder's files, with the config and naming scheme they follow."""

    path: Path
    naming: str  # `hf` or `mistral`: which mapping rules apply
    config: ModelConfig
    files: dict[str, TensorFile]
    tokenizer: Path | None
    index: dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> file, from an index
    aliases: tuple[mapping.Alias, ...] = ()  # other stored forms of the tensors, for messages

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        """A lazy (memory-mapped) view of a tensor."""
        return self.files[name].get(name)

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """An in-memory copy of (rows of) a tensor; nothing of it stays mapped, so streaming keeps memory flat."""
        return self.files[name].read(name, rows)

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name))) * self.files[name].dtype(name).itemsize

    def file_of(self, name: str) -> Path:
        return self.files[name].path

    def label(self, name: str) -> str:
        """A tensor's name for messages (with its stored name when presented under another)."""
        f = self.files[name]
        return f.label(name) if isinstance(f, Aliased) else name

    def check(self) -> None:
        """Every expected tensor present with the shape the config implies, and nothing unknown left."""
        cfg, expected = self.config, set()
        for rule in mapping.rules_for(self.naming, cfg):
            for name in mapping.source_names(rule, cfg):
                expected.add(name)
                if name not in self.files:
                    stored = next(filter(None, (a.stored_name(name) for a in self.aliases)), None)
                    also = f" (looked for {stored} too)" if stored else ""
                    raise CheckpointError(f"{self._home(name)}: tensor {name} is missing{also}")
                want = expected_shape(rule, cfg)
                if self.shape(name) != want:
                    raise CheckpointError(
                        f"{self.file_of(name)}: tensor {self.label(name)} has shape {list(self.shape(name))}, "
                        f"the config implies {list(want)}"
                    )
        extra = sorted(n for n in set(self.files) - expected if not n.endswith(IGNORED_SUFFIXES))
        if extra:
            raise CheckpointError(f"{self.file_of(extra[0])}: unexpected tensor {self.label(extra[0])}")

    def _home(self, name: str) -> Path:
        """Where a tensor belongs: the file the index names, the only file, or else the folder."""
        if name in self.index:
            return self.path / self.index[name]
        paths = {f.path for f in self.files.values()}
        return paths.pop() if len(paths) == 1 else self.path


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
        cfg = config_lib.from_hf_config(config_lib.read_json(path / "config.json"), path / "config.json")
        paths, index = _hf_files(path)
        files = _index(paths)
        return Source(path, "hf", cfg.with_dtype(_stored_dtype(files, "hf")), files, tokenizer, index)
    if (path / "params.json").is_file():
        cfg = config_lib.from_params_json(config_lib.read_json(path / "params.json"), path / "params.json")
        files = _mistral_files(path, cfg)
        aliases = mapping.MEGABLOCKS_ALIASES if any(isinstance(f, Aliased) for f in files.values()) else ()
        cfg = cfg.with_dtype(_stored_dtype(files, "mistral"))
        return Source(path, "mistral", cfg, files, tokenizer, aliases=aliases)
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json or params.json)")


def _read_json(path: Path) -> dict:
    """A JSON object of the checkpoint that is no config (the shard index)."""
    try:
        return config_lib.read_json(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _hf_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files, and the file the index names for each tensor (none without an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> file name")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} named in the index is missing")
        return [path / n for n in names], weight_map
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("consolidated"))  # Mistral's copy
    if not files:
        raise CheckpointError(f"{path}: config.json but no .safetensors files")
    return files, {}


def _mistral_files(path: Path, cfg: ModelConfig) -> dict[str, TensorFile]:
    """`consolidated*.safetensors`, else `consolidated.NN.pth`/`.pt` (MegaBlocks experts split per expert)."""
    safetensors = sorted(path.glob("consolidated*.safetensors"))
    if safetensors:
        return _index(safetensors)
    pickled = sorted({p for pattern in TORCH_PATTERNS for p in path.glob(pattern)})
    if not pickled:
        raise CheckpointError(f"{path}: params.json but no consolidated*.safetensors, .pth or .pt file")
    return _index(pickled, lambda p: Aliased(TorchFile(p), mapping.MEGABLOCKS_ALIASES, cfg))


class Aliased:
    """A file whose tensors stored under other names (MegaBlocks-stacked experts included) are presented
    under the names the mapping rules read; other tensors pass through unchanged."""

    def __init__(self, file: TensorFile, aliases: tuple[mapping.Alias, ...], cfg: ModelConfig):
        self.file, self.path = file, file.path
        self._views: dict[str, tuple[str, slice, bool]] = {}  # presented -> (stored, rows, transposed)
        for alias in aliases:
            for layer in range(cfg.n_layers):
                stored = alias.stored.format(layer=layer)
                if stored not in file.keys():
                    continue
                if not alias.split_experts:
                    self._views[alias.name.format(layer=layer)] = (stored, slice(None), alias.transposed)
                    continue
                rows = file.shape(stored)[0] if file.shape(stored) else 0
                if not cfg.n_experts or rows % cfg.n_experts:
                    raise CheckpointError(
                        f"{file.path}: tensor {stored} has {rows} rows, not a multiple of the config's "
                        f"{cfg.n_experts} experts"
                    )
                per = rows // cfg.n_experts
                for e in range(cfg.n_experts):
                    rows_e = slice(e * per, (e + 1) * per)
                    self._views[alias.name.format(layer=layer, expert=e)] = (stored, rows_e, alias.transposed)
        stored_names = {stored for stored, _, _ in self._views.values()}
        self._plain = [n for n in file.keys() if n not in stored_names]

    def keys(self) -> list[str]:
        return self._plain + list(self._views)

    def label(self, name: str) -> str:
        """The presented name, with the stored one it comes from."""
        return f"{name} (stored as {self._views[name][0]})" if name in self._views else name

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._views:
            return self.file.shape(name)
        stored, rows, transposed = self._views[name]
        shape = self.file.shape(stored)
        shape = (len(range(*rows.indices(shape[0]))),) + shape[1:]
        return shape[::-1] if transposed else shape

    def dtype(self, name: str) -> np.dtype:
        return self.file.dtype(self._views[name][0] if name in self._views else name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._views:
            return self.file.get(name)
        stored, rows, transposed = self._views[name]
        w = self.file.get(stored)[rows]
        return w.T if transposed else w

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        if name not in self._views:
            return self.file.read(name, rows)
        stored, stored_rows, transposed = self._views[name]
        if transposed:  # the presented rows are stored columns: read the expert whole
            return self.file.read(stored, stored_rows).T[rows]
        start, stop, _ = stored_rows.indices(self.file.shape(stored)[0])
        lo, hi, _ = rows.indices(stop - start)
        return self.file.read(stored, slice(start + lo, start + hi))


def _index(paths: list[Path], reader: Callable[[Path], TensorFile] = SafetensorsFile) -> dict[str, TensorFile]:
    files: dict[str, TensorFile] = {}
    for p in paths:
        f = reader(p)
        for name in f.keys():
            if name in files:
                raise CheckpointError(f"{p}: tensor {name} also appears in {files[name].path.name}")
            files[name] = f
    return files


def _stored_dtype(files: dict[str, TensorFile], naming: str) -> str | None:
    """The dtype the weights are stored in (the embedding's), whatever a config file says; None if absent."""
    name = next(rule.source for rule in mapping.NAMING[naming][0] if rule.target == "embedder")
    if name not in files:
        return None
    return {"float32": "float32", "float16": "float16"}.get(np.dtype(files[name].dtype(name)).name, "bfloat16")
