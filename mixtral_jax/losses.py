"""Training losses: masked next-token cross-entropy, the router load-balancing loss, the router z-loss.

Legend: L layers, B batch, T length, E experts, V vocab, k experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of `targets` [B, T] under `logits` [B, T, V] over tokens where `mask` is 1."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]  # [B, T]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array) -> jax.Array:
    """Switch Transformer's balance loss as transformers computes it for Mixtral, padding excluded.

    With f_e the fraction of top-k assignments that go to expert e and P_e the mean router probability of e,
    both pooled over all layers and unmasked tokens: `E * sum_e f_e * P_e` (f sums to k, so a uniform router
    gives k). Returned without the coefficient; the caller scales it once.
    router_logits [L, B, T, E] float32, mask [B, T].
    """
    n_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [L, B, T, E]
    _, chosen = jax.lax.top_k(probs, top_k)  # [L, B, T, k]
    assigned = jnp.sum(jax.nn.one_hot(chosen, n_experts, dtype=jnp.float32), axis=-2)  # [L, B, T, E]
    weight = jnp.broadcast_to(mask.astype(jnp.float32), router_logits.shape[:-1])  # [L, B, T]
    rows = jnp.maximum(jnp.sum(weight), 1.0)
    tokens_per_expert = jnp.einsum("LBTE,LBT->E", assigned, weight) / rows
    prob_per_expert = jnp.einsum("LBTE,LBT->E", probs, weight) / rows
    return n_experts * jnp.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """ST-MoE's z-loss: mean over layers and unmasked tokens of logsumexp(router logits)^2."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2  # [L, B, T]
    weight = jnp.broadcast_to(mask.astype(jnp.float32), z.shape)
    return jnp.sum(z * weight) / jnp.maximum(jnp.sum(weight), 1.0)
