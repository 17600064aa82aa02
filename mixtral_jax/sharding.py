"""Logical axis names, the rules table that maps them onto the mesh, and mesh construction.

Modules name their axes with the constants below; only this file (and `shard_map` specs) turns names into
`PartitionSpec`s, through the rules table in `configs/sharding.toml`. Nothing in the model knows the mesh size.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import math
import tomllib
from typing import Iterator, Sequence

import jax
from flax import nnx
from flax.core import spmd

from mixtral_jax.errors import ConfigError

# Parameter axes.
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, EXP, LAYERS = (
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "exp", "layers",
)
# Activation and cache axes.
BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_VOCAB, ACT_EXP, CACHE_LENGTH = (
    "batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_vocab", "act_exp", "cache_length",
)
MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def load_rules(name: str = "default") -> Rules:
    """The rules table `name` from `configs/sharding.toml`."""
    text = importlib.resources.files("mixtral_jax.configs").joinpath("sharding.toml").read_text()
    tables = tomllib.loads(text)
    if name not in tables:
        raise ConfigError(f"unknown sharding rules {name!r}; known: {', '.join(tables)}")
    return tuple((axis, tuple(mesh_axes) or None) for axis, mesh_axes in tables[name].items())


def logical_spec(names: Sequence[str | None]) -> jax.P:
    """`PartitionSpec` for logical axis names under the rules of the enclosing `rules_context`."""
    return spmd.get_pspec(jax.P(*names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


@contextlib.contextmanager
def rules_context(mesh: jax.sharding.Mesh | None, rules: Rules | None = None) -> Iterator[None]:
    """Run model code on `mesh` (None: one device) with the logical `rules`."""
    with nnx.logical_axis_rules(rules or load_rules()):
        if mesh is None:
            yield
        else:
            with jax.set_mesh(mesh):
                yield


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`"data=2,expert=4"` -> sizes of all four mesh axes (missing axes are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"bad mesh spec {spec!r}: expected axis=size with axes {', '.join(MESH_AXES)}")
        if name in seen:
            raise ConfigError(f"bad mesh spec {spec!r}: axis {name} given twice")
        if not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"bad mesh spec {spec!r}: size of {name} must be a positive integer")
        sizes[name] = int(value)
        seen.add(name)
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) from a spec; no spec puts every device on `data`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec) if spec else {**dict.fromkeys(MESH_AXES, 1), "data": len(devices)}
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(
            f"mesh {spec!r} has {math.prod(sizes.values())} devices but {len(devices)} are present"
        )
    return jax.make_mesh(
        tuple(sizes.values()), MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 4
    )


def named_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> nnx.State:
    """`NamedSharding` for every variable of an (abstract) state from its logical axis metadata."""
    with nnx.logical_axis_rules(rules or load_rules()):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda spec: jax.NamedSharding(mesh, spec), specs)
