"""The public entry points: `load` a checkpoint or `init_random`, and the model handle they return.

A handle holds one copy of the weights, in the layout its backend runs them in (`backends/`), which is
resolved once, when the handle is built, from the mesh's platform, the model and the CPU's features.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import backends, generate, loading, model, prefill, quant
from mixtral_jax import config as config_lib
from mixtral_jax import sharding as sh
from mixtral_jax.backends import Backend
from mixtral_jax.config import ModelConfig
from mixtral_jax.errors import MixtralError
from mixtral_jax.layers import Mode
from mixtral_jax.tokenizer import StreamDecoder, Tokenizer


class Mixtral:
    """A model ready to run: config, weights (placed on `mesh`, in `backend`'s layout), optional tokenizer."""

    def __init__(self, config: ModelConfig, params: nnx.State, tokenizer: Any = None,
                 mesh: jax.sharding.Mesh | None = None, backend: Backend | None = None, rules: sh.Rules | None = None):
        self.config = config
        self.graphdef = graphdef(config)
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = sh.as_mesh(mesh)
        self.backend = backend or Backend()
        self.rules = rules or sh.rules_for(config.n_kv_heads, self.mesh)

    @property
    def module(self) -> model.Transformer:
        return nnx.merge(self.graphdef, self.params)

    def context(self):
        """The mesh and logical rules this model's computations run under."""
        return sh.rules_context(self.mesh, self.rules)

    def with_options(self, **changes: Any) -> Mixtral:
        """The same weights run with config settings that leave them alone (e.g. `max_seq_len`)."""
        cfg = self.config.replace(**changes)
        if _signature(cfg) != _signature(self.config):
            raise MixtralError("with_options cannot change the parameters' shapes or dtypes")
        handle = copy.copy(self)
        handle.config, handle.graphdef = cfg, graphdef(cfg)
        return handle

    def with_backend(self, backend: Backend | str) -> Mixtral:
        """The same model run by another backend (its weights moved into that backend's layout)."""
        backend = backends.resolve(backend, self.config, self.mesh)
        if backend == self.backend:
            return self
        leaves = backend.from_checkpoint_layout(self.config, self.checkpoint_params())
        return Mixtral(self.config, _state(self.config, leaves), self.tokenizer, self.mesh, backend, self.rules)

    def with_tokenizer(self, tokenizer: Any) -> Mixtral:
        """The same model run with another tokenizer (its EOS ends rows; only ids it knows are sampled)."""
        handle = copy.copy(self)  # the weights are shared
        handle.tokenizer = tokenizer
        return handle

    def leaves(self) -> dict[str, Any]:
        """The weights as the backend holds them, by dotted path (`layers.ffn.router`; a tuple of per-layer
        buffers is one leaf)."""
        return _leaves(self.params)

    def with_leaves(self, changes: dict[str, Any]) -> Mixtral:
        """The same model with the leaves at these paths replaced (as the backend holds them: the same
        shapes, dtypes and shardings, so the compiled programs take them); the others are shared."""
        handle = copy.copy(self)
        handle.params = _state(self.config, {**self.leaves(), **changes})
        return handle

    def checkpoint_params(self) -> dict[str, jax.Array]:
        """The weights in the checkpoint layout, path -> array (`layers.ffn.w1` [L, E, D, F]); the backend's
        own arrays where its layout is that one, else a stacked copy."""
        return self.backend.to_checkpoint_layout(self.config, _leaves(self.params))

    def logits(self, ids) -> jax.Array:
        """Token ids [batch, length] -> float32 logits [batch, length, vocab]."""
        ids = jnp.asarray(np.asarray(ids, dtype=np.int32))
        if ids.ndim != 2:
            raise MixtralError(f"ids must be [batch, length], got shape {list(ids.shape)}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise MixtralError(f"token ids must be in [0, {self.config.vocab_size})")
        with self.context():
            return _forward_logits(self.graphdef, self.params, self.backend, ids)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_at_eos: bool = True) -> list[list[int]]:
        """The new token ids for each prompt (token-id lists of any lengths), ending with EOS where a row
        stopped on it. Temperature 0 is greedy; a ragged batch gives each prompt what it gets alone.
        The same arguments and seed give the same tokens."""
        return generate.generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)

    def stream(self, prompt: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               stop_at_eos: bool = True) -> Iterator[int] | Iterator[list[int | None]]:
        """`generate` as a generator: for one prompt (a list of ids) each new id, for a batch (a list of
        lists) each step's ids with None for finished rows."""
        single = len(prompt) > 0 and not isinstance(prompt[0], Sequence)
        steps = generate.stream(self, [prompt] if single else prompt, max_new_tokens, temperature, top_k, top_p,
                                seed, stop_at_eos)
        return (ids[0] for ids in steps) if single else steps

    def stream_text(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> Iterator[str]:
        """`stream` of one prompt as text: each piece the new tokens complete (the pieces join to the decoded
        text, SentencePiece's spaces and multi-byte characters included; `tokenizer.StreamDecoder`)."""
        if self.tokenizer is None:
            raise MixtralError("the model has no tokenizer: stream ids with `stream`, or load one with_tokenizer")
        decoder = StreamDecoder(self.tokenizer)
        for token in self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed):
            if piece := decoder.push(token):
                yield piece
        if rest := decoder.flush():
            yield rest

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """log p(ids[t + 1] | ids[:t + 1]) for each next token, float32 [len(ids) - 1]."""
        return prefill.score(self, ids)

    def score_batch(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """`score` of each row, run together (rows of similar lengths share one compiled program)."""
        return prefill.score_rows(self, rows)[0]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _forward_logits(graphdef: nnx.GraphDef, params: nnx.State, backend: Backend, ids: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return nnx.merge(graphdef, params)(ids, positions, Mode.TRAIN, backend).logits


@functools.cache
def graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The module graph of a model of `cfg` (its weights are the handle's); outside a mesh context."""
    return model.abstract(cfg)[0]


def resolve_config(config: ModelConfig | str) -> ModelConfig:
    return config_lib.preset(config) if isinstance(config, str) else config


def init_random(config: ModelConfig | str, seed: int = 0, dtype: str | None = None,
                mesh: jax.sharding.Mesh | str | None = None, tokenizer: Any = None,
                backend: Backend | str | None = None, training: bool = False) -> Mixtral:
    """A model with random weights, created directly in its sharding on `mesh` (a mesh, a spec string, or None:
    the first device), run by `backend` (a Backend, a name, or None: the platform's; with `training`, one that
    holds the checkpoint layout, which gradients and optimizers work on)."""
    cfg = resolve_config(config).with_dtype(dtype)
    mesh = sh.as_mesh(mesh)
    rules = sh.rules_for(cfg.n_kv_heads, mesh)
    backend = backends.resolve(backend, cfg, mesh, training)
    shardings = sh.named_shardings(model.abstract(cfg)[1], mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init() -> nnx.State:
        return nnx.state(model.Transformer(cfg, rngs=nnx.Rngs(seed)))

    with sh.rules_context(mesh, rules):
        params = _leaves(init())
    return Mixtral(cfg, _state(cfg, backend.from_checkpoint_layout(cfg, params)), tokenizer, mesh, backend, rules)


def load(path: str | os.PathLike, dtype: str | None = None, mesh: jax.sharding.Mesh | str | None = None,
         backend: Backend | str | None = None, allow_non_finite: bool = False, training: bool = False,
         quantize: str | None = None, quant_group: int | None = None, quantize_vocab: bool = False,
         kv_cache_dtype: str | None = None) -> Mixtral:
    """A model folder (`mixtral-jax convert` output), a training OUTPUT (its latest step), or a Hugging Face
    or Mistral checkpoint folder, read straight into the backend's layout, sharded over `mesh`.

    A model folder is restored by Orbax into the target sharding; from a foreign folder each device's
    slice is assembled from memory-mapped source tensors. Either way a host reads only what its devices
    hold, and a layout that holds layers or experts apart is filled slice by slice. `dtype` casts the weights
    (and sets the compute dtype); None keeps the stored dtype. `mesh`: a mesh, a spec string, or None (the
    first device); `backend`: a Backend, a name, or None (the platform's; with `training`, one that holds the
    checkpoint layout). A foreign folder's weights holding NaN or inf are refused unless `allow_non_finite`
    (a model folder's are not checked again: `convert` checks them as it writes).

    `quantize` (`int8`, `int4`; None or `none`: as stored) quantises a 16-bit checkpoint's large matrices
    slice by slice as they are read, in groups of `quant_group` for int4 (default 128; `quant.py`), and with
    `quantize_vocab` the embedding table and LM head too; a quantised checkpoint is loaded as it is and not
    quantised again. `kv_cache_dtype`: `int8` for an int8 KV cache (None: the config's, `auto`).
    """
    opened = loading.open_checkpoint(path, allow_non_finite)
    cfg, reader = opened.config.with_dtype(dtype), opened.reader
    if kv_cache_dtype is not None:
        cfg = cfg.replace(kv_cache_dtype=kv_cache_dtype)
    if quantize not in (None, "none") or quantize_vocab:
        cfg = quant.quantized_config(cfg, quantize, quant_group, path, quantize_vocab)
        reader = loading.QuantizingReader(reader, cfg)
    mesh = sh.as_mesh(mesh)
    rules = sh.rules_for(cfg.n_kv_heads, mesh)
    backend = backends.resolve(backend, cfg, mesh, training)
    targets = _targets(cfg, mesh, rules)
    leaves = backend.place(cfg, targets, reader)
    tokenizer = None if opened.tokenizer is None else Tokenizer(opened.tokenizer)
    return Mixtral(cfg, _state(cfg, leaves), tokenizer, mesh, backend, rules)


def _targets(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: sh.Rules) -> dict[str, jax.ShapeDtypeStruct]:
    """Every checkpoint-layout leaf of `cfg` as the shape, dtype and sharding to read it into."""
    abstract = model.abstract(cfg)[1]
    shardings = _leaves(sh.named_shardings(abstract, mesh, rules))
    return {path: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings[path])
            for path, a in _leaves(abstract).items()}


def _signature(cfg: ModelConfig) -> dict[str, tuple]:
    return {path: (a.shape, a.dtype) for path, a in _leaves(model.abstract(cfg)[1]).items()}


def _leaves(state: nnx.State) -> dict[str, Any]:
    """A state's leaves by dotted path (`layers.ffn.w1`); a backend's tuple of buffers stays one leaf."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, tree: Any) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", nnx.to_pure_dict(state))
    return flat


def _state(cfg: ModelConfig, leaves: dict[str, Any]) -> nnx.State:
    """The model's state with these leaves (path -> value, in any backend's layout)."""
    nested: dict[str, Any] = {}
    for path, value in leaves.items():
        *parents, leaf = path.split(".")
        functools.reduce(lambda tree, key: tree.setdefault(key, {}), parents, nested)[leaf] = value
    state = model.abstract(cfg)[1]
    nnx.replace_by_pure_dict(state, nested)
    return state

