"""The TPU backend: the reference, with megablox's Pallas grouped matmul for the experts.

Legend: n rows grouped by expert, D model dim, E experts.

`jax.experimental.pallas.ops.tpu.megablox` multiplies the rows of each expert by its weights only, tiled for
the MXU (MaxText's defaults). Attention runs as the reference's XLA ops; a Pallas attention kernel is not
used yet.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mixtral_jax.backends import reference
from mixtral_jax.backends.reference import Experts

# megablox tiles (rows, contracted, out); each is cut to its dimension where that is less.
MEGABLOX_TILES = (512, 1024, 1024)


@dataclasses.dataclass(frozen=True)
class TpuBackend(reference.Backend):
    """TPU. `interpret`: run the Pallas kernels in the interpreter (on other platforms, for tests)."""

    interpret: bool = False
    name: ClassVar[str] = "tpu"

    def describe(self) -> str:
        return "tpu (megablox" + (", interpreted)" if self.interpret else ")")

    def grouped_ffn(self, xs: jax.Array, group_sizes: jax.Array, experts: Experts) -> jax.Array:
        return megablox_ffn(xs, group_sizes, *self.expert_arrays(experts, xs.dtype), interpret=self.interpret)


def megablox_ffn(xs: jax.Array, group_sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                 interpret: bool) -> jax.Array:
    """`reference.ragged_ffn` with megablox's `gmm`. Rows are padded to a multiple of the row tile; gmm leaves
    rows past the groups unwritten, so they are zeroed on the way out, and on the way in for the gradient that
    comes back through them."""
    from jax.experimental.pallas.ops.tpu.megablox import ops

    n = xs.shape[0]
    tm = min(MEGABLOX_TILES[0], -(-n // 8) * 8)
    grouped_rows = (jnp.arange(n + -n % tm) < jnp.sum(group_sizes))[:, None]  # [n padded, 1]
    xs = jnp.where(grouped_rows, jnp.pad(xs, ((0, -n % tm), (0, 0))), 0)

    def gmm(a, w):  # a [n padded, in], w [E, in, out] -> [n padded, out] in a's dtype, as ragged_dot
        tiling = (tm, min(MEGABLOX_TILES[1], w.shape[1]), min(MEGABLOX_TILES[2], w.shape[2]))
        return ops.gmm(a, w.astype(a.dtype), group_sizes, a.dtype, tiling, None, None, False, interpret)

    h = jax.nn.silu(gmm(xs, w1)) * gmm(xs, w3)
    return jnp.where(grouped_rows, gmm(h, w2), 0)[:n]
