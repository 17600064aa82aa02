"""Training losses against transformers and direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import mixtral_jax
from mixtral_jax import losses, train

L, B, T, E, K = 3, 2, 7, 6, 2


def _router_logits(seed=0):
    return np.random.default_rng(seed).normal(size=(L, B, T, E)).astype(np.float32) * 2


def _mask():
    mask = np.ones((B, T), np.float32)
    mask[1, 4:] = 0  # right padding
    return mask


def test_load_balancing_loss_equals_transformers_with_padding_mask():
    logits, mask = _router_logits(), _mask()
    ours = losses.load_balancing_loss(jnp.asarray(logits), K, jnp.asarray(mask))
    gate = tuple(torch.from_numpy(logits[i].reshape(B * T, E)) for i in range(L))
    theirs = load_balancing_loss_func(gate, E, K, torch.from_numpy(mask))
    assert abs(float(ours) - float(theirs)) < 1e-6


def test_load_balancing_loss_equals_direct_count():
    logits, mask = _router_logits(1), _mask()
    counts, prob_sums, rows = np.zeros(E), np.zeros(E), 0
    for layer in range(L):
        for b in range(B):
            for t in range(T):
                if not mask[b, t]:
                    continue
                p = np.exp(logits[layer, b, t] - logits[layer, b, t].max())
                p /= p.sum()
                for e in np.argsort(-p)[:K]:
                    counts[e] += 1
                prob_sums += p
                rows += 1
    direct = E * np.sum(counts / rows * prob_sums / rows)
    ours = losses.load_balancing_loss(jnp.asarray(logits), K, jnp.asarray(mask))
    assert abs(float(ours) - direct) < 1e-5


def test_load_balancing_loss_ignores_padded_tokens():
    logits, mask = _router_logits(2), _mask()
    garbage = logits.copy()
    garbage[:, 1, 4:] = 50.0 * np.arange(E)  # padding routed very unevenly
    a = losses.load_balancing_loss(jnp.asarray(logits), K, jnp.asarray(mask))
    b = losses.load_balancing_loss(jnp.asarray(garbage), K, jnp.asarray(mask))
    assert abs(float(a) - float(b)) < 1e-6


def test_load_balancing_loss_of_uniform_router_is_top_k():
    loss = losses.load_balancing_loss(jnp.zeros((L, B, T, E)), K, jnp.ones((B, T)))
    assert abs(float(loss) - K) < 1e-6


def test_cross_entropy_ignores_masked_targets():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(B, T, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(B, T))
    mask = _mask()
    logp = jax.nn.log_softmax(logits, axis=-1)
    direct = -sum(logp[b, t, targets[b, t]] for b in range(B) for t in range(T) if mask[b, t]) / mask.sum()
    ours = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    assert abs(float(ours) - float(direct)) < 1e-5


def test_router_z_loss_equals_direct_computation():
    logits, mask = _router_logits(4), _mask()
    lse = np.log(np.exp(logits).sum(-1)) ** 2  # [L, B, T]
    direct = (lse * mask).sum() / (mask.sum() * L)
    assert abs(float(losses.router_z_loss(jnp.asarray(logits), jnp.asarray(mask))) - direct) < 1e-4


def test_total_loss_adds_the_aux_coefficient_once():
    cfg = mixtral_jax.preset("tiny").replace(vocab_size=64, router_aux_loss_coef=0.02, router_z_loss_coef=0.001)
    model = mixtral_jax.init_random(cfg, seed=0, dtype="float32")
    batch = jnp.asarray(np.random.default_rng(5).integers(0, 64, size=(2, 9)), jnp.int32)
    total, parts = train.loss_fn(model.params, model.graphdef, model.backend, batch)
    expected = parts["loss"] + 0.02 * parts["aux_loss"] + 0.001 * parts["z_loss"]
    assert abs(float(total) - float(expected)) < 1e-6
    assert 1.5 < float(parts["aux_loss"]) < 4.0  # near top_k = 2 for a random router, not scaled by 0.02
