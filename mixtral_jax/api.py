"""The public entry points: `load` a checkpoint or `init_random`, and the model handle they return."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import config as config_lib
from mixtral_jax import layout, quant
from mixtral_jax import sharding as sh
from mixtral_jax.config import ModelConfig
from mixtral_jax.errors import MixtralError
from mixtral_jax.model import Transformer


class Mixtral:
    """A model ready to run: config, parameters (placed on `mesh`), optional tokenizer."""

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State,
                 tokenizer: Any = None, mesh: jax.sharding.Mesh | None = None, rules: sh.Rules | None = None):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = rules or sh.load_rules()

    def with_options(self, **changes: Any) -> Mixtral:
        """The same weights run with other settings that leave parameters alone (e.g. `moe_impl`)."""
        cfg = self.config.replace(**changes)
        if (cfg.param_dtype, cfg.n_layers, cfg.dim) != (self.config.param_dtype, self.config.n_layers, self.config.dim):
            raise MixtralError("with_options cannot change the parameters' shapes or dtype")
        quantized = cfg.is_moe and "scales" in self.params["layers"]["ffn"]
        graphdef = quant.graphdef(cfg) if quantized else abstract_model(cfg)[0]
        model = Mixtral(cfg, graphdef, self.params, self.tokenizer, self.mesh, self.rules)
        if cfg.layout == self.config.layout and "split" in self.__dict__:
            model.split = self.split  # share the split copy rather than make another
        return model

    def with_tokenizer(self, tokenizer: Any) -> Mixtral:
        """The same model run with another tokenizer (its EOS ends rows; only ids it knows are sampled)."""
        model = copy.copy(self)  # the weights, and their split copy once made, are shared
        model.tokenizer = tokenizer
        return model

    def context(self):
        """The mesh and logical rules this model's computations run under."""
        return sh.rules_context(self.mesh, self.rules)

    @property
    def module(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)

    @functools.cached_property
    def split(self) -> layout.Split | None:
        """The weights in the split runtime layout where `config.layout` picks it (`layout.py`), made on
        first use and kept with the handle (a second copy of the layer weights and LM head); None: stacked."""
        layers = self.params["layers"]
        if not layout.use_split(self.config, self.mesh, sum(x.nbytes for x in jax.tree.leaves(layers))):
            return None
        with self.context():
            return layout.split(self.config, self.params)

    def logits(self, ids) -> jax.Array:
        """Token ids [batch, length] -> float32 logits [batch, length, vocab]."""
        ids = jnp.asarray(np.asarray(ids, dtype=np.int32))
        if ids.ndim != 2:
            raise MixtralError(f"ids must be [batch, length], got shape {list(ids.shape)}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise MixtralError(f"token ids must be in [0, {self.config.vocab_size})")
        with self.context():
            return _forward_logits(self.graphdef, self.params, self.split, ids)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_at_eos: bool = True) -> list[list[int]]:
        """The new token ids for each prompt (token-id lists of any lengths), ending with EOS where a row
        stopped on it. Temperature 0 is greedy; a ragged batch gives each prompt what it gets alone.
        The same arguments and seed give the same tokens."""
        from mixtral_jax import generate

        return generate.generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)

    def stream(self, prompt: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               stop_at_eos: bool = True) -> Iterator[int] | Iterator[list[int | None]]:
        """`generate` as a generator: for one prompt (a list of ids) each new id, for a batch (a list of
        lists) each step's ids with None for finished rows."""
        from mixtral_jax import generate

        single = len(prompt) > 0 and not isinstance(prompt[0], Sequence)
        steps = generate.stream(self, [prompt] if single else prompt, max_new_tokens, temperature, top_k, top_p,
                                seed, stop_at_eos)
        return (ids[0] for ids in steps) if single else steps

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """log p(ids[t + 1] | ids[:t + 1]) for each next token, float32 [len(ids) - 1]."""
        from mixtral_jax import generate

        return generate.score(self, ids)


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef: nnx.GraphDef, params: nnx.State, split, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(ids, split=split).logits


def resolve_config(config: ModelConfig | str) -> ModelConfig:
    return config_lib.preset(config) if isinstance(config, str) else config


def default_mesh(mesh: jax.sharding.Mesh | str | None) -> jax.sharding.Mesh:
    """A mesh from a mesh, a spec string, or None (the first device alone)."""
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    return sh.make_mesh(mesh) if mesh else sh.make_mesh(None, jax.devices()[:1])


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and parameter shapes (with logical axis metadata) without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def init_random(config: ModelConfig | str, seed: int = 0, dtype: str | None = None,
                mesh: jax.sharding.Mesh | str | None = None, tokenizer: Any = None) -> Mixtral:
    """A model with random weights, created directly in its sharding on `mesh`."""
    cfg = resolve_config(config).with_dtype(dtype)
    mesh = default_mesh(mesh)
    graphdef, abstract = abstract_model(cfg)
    shardings = sh.named_shardings(abstract, mesh)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init() -> nnx.State:
        return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

    with sh.rules_context(mesh):
        params = init()
    return Mixtral(cfg, graphdef, params, tokenizer, mesh)


def load(path: str | os.PathLike, dtype: str | None = None, mesh: jax.sharding.Mesh | str | None = None,
         allow_non_finite: bool = False) -> Mixtral:
    """A model folder (`mixtral-jax convert` output), a training OUTPUT (its latest step), or a Hugging Face
    or Mistral checkpoint folder, read straight into arrays sharded over `mesh`.

    A model folder is restored by Orbax into the target sharding; from a foreign folder each device's
    slice is assembled from memory-mapped source tensors. Either way a host reads only what its devices
    hold. `dtype` casts the weights (and sets the compute dtype); None keeps the stored dtype. A foreign
    folder's weights holding NaN or inf are refused unless `allow_non_finite` (a model folder's are not
    checked again: `convert` checks them as it writes).
    """
    from mixtral_jax import checkpoint, trained

    if trained.is_training_output(path):
        return trained.load_trained(path, dtype, mesh)
    if checkpoint.is_checkpoint(path):
        cfg = checkpoint.read_config(path).with_dtype(dtype)
        mesh = default_mesh(mesh)
        graphdef, abstract = abstract_model(cfg)
        params = checkpoint.restore(path, abstract, mesh)
        return Mixtral(cfg, graphdef, params, _tokenizer(checkpoint.tokenizer_path(path)), mesh)

    from mixtral_jax.convert import mapping
    from mixtral_jax.convert.sources import open_source

    source = open_source(Path(path))
    source.check()
    cfg = source.config.with_dtype(dtype)
    mesh = default_mesh(mesh)
    graphdef, abstract = abstract_model(cfg)
    shardings = nnx.to_pure_dict(sh.named_shardings(abstract, mesh))
    rules = {rule.target: rule for rule in mapping.rules_for(source.naming, cfg)}

    def place(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        rule = rules[".".join(str(p.key) for p in path)]
        sharding = _get(shardings, path)
        return jax.make_array_from_callback(
            leaf.shape, sharding,
            lambda index: mapping.assemble(rule, source, cfg, index, leaf.dtype, allow_non_finite),
        )

    pure = jax.tree_util.tree_map_with_path(place, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, pure)
    return Mixtral(cfg, graphdef, abstract, _tokenizer(source.tokenizer), mesh)


def _get(tree: dict, path: tuple) -> Any:
    for p in path:
        tree = tree[p.key]
    return tree


def _tokenizer(path: Path | None):
    if path is None:
        return None
    from mixtral_jax.tokenizer import Tokenizer

    return Tokenizer(path)
