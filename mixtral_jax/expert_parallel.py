"""Expert parallelism: the MoE dispatch on a mesh, as a `shard_map` that gathers and then reduces.

Legend: T tokens (batch and length flattened), D model dim, E experts, F expert FFN dim, k experts per token.

Each device holds E/ep experts with F/tp of their FFN columns (ep, tp: the sizes of the mesh axes that the
rules map `exp` and `mlp` to) and sees the tokens of its data shard, replicated over the expert and tensor
axes like every activation. It runs the single-device dispatch (`moe.choose`) on its local experts only:
token copies routed elsewhere get the sentinel id E/ep, which every strategy treats as weight zero, so no
token is dropped and no capacity is needed. The partial sums [T, D] are then added over the expert and
tensor axes with one `psum`: per MoE layer each device all-reduces T_local x D float32 values
(docs/parallelism.md has the bytes). Only collectives with a CPU lowering are used.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from mixtral_jax import sharding as sh
from mixtral_jax.backends import Backend, Experts


def active() -> bool:
    """Whether the MoE block runs expert-parallel: inside a mesh whose expert or tensor axes are split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    return math.prod(mesh.shape[a] for a in sh.mesh_axes(sh.EXP) + sh.mesh_axes(sh.MLP)) > 1


def dispatch(choose: Callable[[int, int, int], Callable[..., jax.Array]], backend: Backend,
             x, weights, expert_ids, experts: Experts) -> jax.Array:
    """The `moe` dispatch signature (x [T, D], weights/expert ids [T, k], stacked experts) -> [T, D] float32,
    run with experts split over the mesh; `choose(tokens, k, experts)` picks the local single-device
    strategy."""
    mesh = jax.sharding.get_abstract_mesh()
    exp_axes, mlp_axes = sh.mesh_axes(sh.EXP), sh.mesh_axes(sh.MLP)
    token_axes = _token_axes(mesh, x.shape[0], exp_axes + mlp_axes)
    n_local = experts.w1.shape[0] // math.prod(mesh.shape[a] for a in exp_axes)
    tokens = jax.P(token_axes, None)
    up = jax.P(exp_axes or None, None, mlp_axes or None)
    down = jax.P(exp_axes or None, mlp_axes or None, None)
    # w2's scales split their groups along F as w2 splits its rows; one scale per channel spans all of F
    grouped = experts.scales is not None and experts.scales[2].shape[1] > 1
    scale_specs = None if experts.scales is None else (up, up, down if grouped else jax.P(exp_axes or None))
    expert_specs = Experts(up, up, down, scale_specs)

    def local(x, weights, expert_ids, experts):
        first = jax.lax.axis_index(exp_axes) * n_local if exp_axes else 0
        mine = (expert_ids >= first) & (expert_ids < first + n_local)
        local_ids = jnp.where(mine, expert_ids - first, n_local)  # sentinel n_local: not here
        local_weights = jnp.where(mine, weights, 0.0)
        strategy = choose(x.shape[0], expert_ids.shape[1], n_local)
        y = strategy(backend, x, local_weights, local_ids, experts)  # [T_local, D] partial sums
        return jax.lax.psum(y, exp_axes + mlp_axes)

    # check_vma=False: the single-device strategies carry loop state that starts from constants, which the
    # varying-axes type check rejects; the one collective above makes the output replicated as out_specs say.
    return jax.shard_map(
        local, in_specs=(tokens, tokens, tokens, expert_specs), out_specs=tokens, check_vma=False
    )(x, weights, expert_ids, experts)


def _token_axes(mesh, n_tokens: int, taken: tuple[str, ...]) -> tuple[str, ...]:
    """The batch mesh axes that split the tokens: those of the `batch` rule whose product divides the
    token count (a batch too small for the data axis is computed on each of its devices)."""
    axes: list[str] = []
    for axis in sh.mesh_axes(sh.BATCH):
        if axis not in taken and n_tokens % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]) == 0:
            axes.append(axis)
    return tuple(axes)
