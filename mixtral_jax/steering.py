"""Weights under which chosen tokens go to chosen experts: start-up runs that take every branch of the expert
kernels.

Legend: D model dim, E experts, k experts per token, P anchor tokens.

A backend's expert kernels may branch on the routing, and a runtime may set a branch up the first time it
runs (XLA:CPU's grouped kernel has a loop for each expert and block size, and builds a loop's products on its
first run: a prompt that routes as none before did waits for that). `Backend.warm_routes` names routings
whose runs take every branch; `steer` makes them happen. Its weights differ from the model's in three small
leaves a layer: the attention's input norm scales are zero, so attention adds nothing; the FFN's are EPS, so
the experts add about EPS^2 of the residual; and each router maps the P anchors' normalised embeddings to
logits that rank the anchor's k experts first, in order, by MARGIN (least squares, exact while P <= D). So
every layer sees each token's own embedding and sends anchor p to its experts. Every other buffer is the
model's own, and what the runs compute is never read.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.distributed import fetch, place
from mixtral_jax.layers import rms_norm

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral

EPS = 2.0**-10
MARGIN = 4.0  # logits: an anchor's first expert 2 * MARGIN, its second MARGIN, ..., the others 0


class Steering(NamedTuple):
    model: Mixtral  # the model with the steering weights
    anchors: dict[tuple[int, ...], int]  # expert choices (best first) -> the token that routes to them

    def tokens(self, route: np.ndarray) -> np.ndarray:
        """Expert choices [n, k] -> the tokens [n] that every layer routes so."""
        return np.array([self.anchors[tuple(choices)] for choices in route.tolist()], np.int32)


def steer(model: Mixtral) -> Steering | None:
    """Weights that route anchor tokens to each ordered choice of k experts; None for a dense model, or where
    the choices outnumber the model dim or the vocabulary, or the router's dtype does not keep their
    order."""
    cfg = model.config
    if not cfg.is_moe:
        return None
    choices = list(itertools.permutations(range(cfg.n_experts), cfg.top_k))
    if len(choices) > min(cfg.dim, cfg.vocab_size):
        return None
    ids = np.linspace(1, cfg.vocab_size - 1, len(choices)).astype(np.int32)  # distinct, spread over the vocabulary
    with model.context():
        embedded = fetch(model.module.embed(jnp.asarray(ids[None]), model.backend))[0]  # [P, D]
    leaves = model.leaves()
    norm_dtype = _first(leaves["layers.ffn_norm.scale"]).dtype
    router_dtype = _first(leaves["layers.ffn.router"]).dtype
    scale = jnp.full((cfg.dim,), EPS, norm_dtype)
    router_in = np.asarray(rms_norm(jnp.asarray(embedded), scale, cfg.norm_eps), np.float32)  # [P, D]
    wanted = np.zeros((len(choices), cfg.n_experts))
    for row, experts in enumerate(choices):
        wanted[row, list(experts)] = MARGIN * np.arange(cfg.top_k, 0, -1)
    router = np.linalg.lstsq(router_in.astype(np.float64), wanted, rcond=None)[0].astype(router_dtype)  # [D, E]
    logits = router_in @ router.astype(np.float32)
    top = np.argsort(-logits, axis=1, kind="stable")
    ranked = np.take_along_axis(logits, top, axis=1)
    if (not np.isfinite(logits).all() or (top[:, : cfg.top_k] != np.array(choices)).any()
            or (ranked[:, : cfg.top_k] - ranked[:, 1 : cfg.top_k + 1] < MARGIN / 2).any()):
        return None
    changes = {"layers.attn_norm.scale": _like(leaves["layers.attn_norm.scale"], 0.0),
               "layers.ffn_norm.scale": _like(leaves["layers.ffn_norm.scale"], EPS),
               "layers.ffn.router": _like(leaves["layers.ffn.router"], router)}
    return Steering(model.with_leaves(changes), dict(zip(choices, ids.tolist())))


def _first(leaf):
    return leaf[0] if isinstance(leaf, tuple) else leaf


def _like(leaf, value):
    """`value` (for one layer) in every layer of a leaf held stacked [L, ...] or as a tuple of L buffers, each
    with the dtype and sharding of the buffer it stands for."""
    def put(like: jax.Array, value) -> jax.Array:
        return place(np.broadcast_to(np.asarray(value).astype(like.dtype), like.shape), like.sharding)

    if isinstance(leaf, tuple):
        return tuple(put(buffer, value) for buffer in leaf)
    return put(leaf, value)
