"""Logical axis names, the rules table that maps them onto the mesh, and mesh construction.

Modules name their axes with the constants below; only this file (and `shard_map` specs) turns names into
`PartitionSpec`s, through the rules table in `configs/sharding.toml`. Nothing in the model knows the mesh size.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import math
import re
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
    return _first_use(spmd.get_pspec(jax.P(*names)))


def _axes(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """One `PartitionSpec` entry as a tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _first_use(spec: jax.P) -> jax.P:
    """Each mesh axis splits only the first dimension that asks for it (a rule such as `embed =
    ["fsdp", "expert"]` spreads attention rows over `expert`, while an expert weight's `exp` dimension,
    which comes first, already takes that axis)."""
    used: set[str] = set()
    dims = []
    for entry in spec:
        kept = tuple(a for a in _axes(entry) if a not in used)
        used.update(kept)
        dims.append(kept[0] if len(kept) == 1 else kept or None)
    return jax.P(*dims)


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes that the logical axis `name` is split over under the enclosing rules."""
    return tuple(a for a in _axes(spmd.get_pspec(jax.P(name))[0]) if a in MESH_AXES)


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


_MESH_PART = re.compile(r"\s*([a-z]+)\s*=\s*([0-9]+)\s*")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`"data=2,expert=4"` -> sizes of all four mesh axes (missing axes are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in spec.split(","):
        match = _MESH_PART.fullmatch(part)
        if match is None or match[1] not in MESH_AXES:
            raise ConfigError(
                f"bad mesh spec {spec!r}: expected axis=size,... with axes {', '.join(MESH_AXES)}"
            )
        name, size = match[1], int(match[2])
        if name in seen:
            raise ConfigError(f"bad mesh spec {spec!r}: axis {name} given twice")
        if size < 1:
            raise ConfigError(f"bad mesh spec {spec!r}: size of {name} must be a positive integer")
        sizes[name] = size
        seen.add(name)
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) from a spec; no spec puts every device on `data`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec) if spec else {**dict.fromkeys(MESH_AXES, 1), "data": len(devices)}
    if math.prod(sizes.values()) != len(devices):
        platform = devices[0].platform if devices else "cpu"
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting to simulate N "
                "devices)" if platform == "cpu" else "")
        raise ConfigError(
            f"mesh {spec!r} has {math.prod(sizes.values())} devices but {len(devices)} are present{hint}"
        )
    return jax.make_mesh(
        tuple(sizes.values()), MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 4
    )


def as_mesh(mesh: jax.sharding.Mesh | str | None) -> jax.sharding.Mesh:
    """Our four-axis mesh from a spec string, None (the first device alone), or any `jax.sharding.Mesh` whose
    axes are some of ours (`jax.make_mesh((8,), ("expert",))`): the same devices, the missing axes of size
    1, every axis `Auto` (the logical rules place arrays; Explicit axes would type every array by mesh)."""
    if mesh is None:
        return make_mesh(None, jax.devices()[:1])
    if isinstance(mesh, str):
        return make_mesh(mesh)
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ConfigError(f"mesh axis {unknown[0]!r} is not one of {', '.join(MESH_AXES)}; name the mesh's axes "
                          "after what they split")
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    order = [a for a in MESH_AXES if a in sizes]
    devices = mesh.devices.transpose([mesh.axis_names.index(a) for a in order])
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return jax.sharding.Mesh(devices.reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def rules_for(n_kv_heads: int, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Rules:
    """The rules for a model with `n_kv_heads` on `mesh`: where the mesh axes of `kv_heads` do not divide the
    KV heads, keys and values (their projections and the cache) are replicated across those axes, as vLLM and
    MaxText do, while the query heads stay split."""
    rules = rules or load_rules()
    axes = _axes(dict(rules).get(KV_HEADS))
    if n_kv_heads % math.prod(mesh.shape[a] for a in axes) == 0:
        return rules
    return tuple((name, None if name in (KV_HEADS, ACT_KV_HEADS) else target) for name, target in rules)


def named_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> nnx.State:
    """`NamedSharding` for every variable of an (abstract) state from its logical axis metadata.

    Raises ConfigError when a mesh axis does not divide the dimension it splits, naming the axis, the
    dimension (its size and what it counts) and the weight.
    """
    with nnx.logical_axis_rules(rules or load_rules()):
        specs = nnx.get_partition_spec(state)

    def sharding(path: tuple, spec: nnx.Variable, variable: nnx.Variable) -> nnx.Variable:
        spec = _first_use(spec.get_value())
        leaf = variable.get_value()
        logical = variable.get_metadata().get("out_sharding") or ()
        for i, (dim, entry) in enumerate(zip(leaf.shape, spec)):
            axes = _axes(entry)
            if dim % math.prod(mesh.shape[a] for a in axes):
                name = ".".join(str(k) for k in (getattr(p, "key", getattr(p, "name", p)) for p in path)
                                if k != "value")
                split = ",".join(f"{a}={mesh.shape[a]}" for a in axes if mesh.shape[a] > 1)
                what = _DIMENSION_NAMES.get(logical[i] if i < len(logical) else None, "entries")
                raise ConfigError(f"the mesh axis {split} does not divide the {dim} {what} of {name} "
                                  f"{list(leaf.shape)} (dimension {i}); choose axis sizes that divide it")
        return variable.replace(value=jax.NamedSharding(mesh, spec))

    return jax.tree.map_with_path(sharding, specs, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# What a parameter dimension counts, by its logical axis, for messages.
_DIMENSION_NAMES = {VOCAB: "vocabulary entries", EMBED: "model dimensions", HEADS: "query heads",
                    KV_HEADS: "KV heads", HEAD_DIM: "head dimensions", MLP: "FFN columns", EXP: "experts",
                    LAYERS: "layers"}
