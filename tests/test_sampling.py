"""Sampling: the filtered distributions are exact, draws follow them, settings are checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.errors import MixtralError
from mixtral_jax.sampling import Sampler, filter_logits, sample

PROBS = np.array([0.05, 0.4, 0.02, 0.25, 0.13, 0.1, 0.03, 0.02])  # by rank: ids 1, 3, 4, 5, 0, 6, then 2 and 7
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]  # [1, V]
DRAWS = 40_000
# A frequency estimated from n draws has standard deviation sqrt(p(1-p)/n) <= 0.0025 at n = 40000;
# 0.01 is four of them, for the largest deviation over the 8 tokens.
FREQ_TOL = 0.01


def _probs(sampler):
    return np.asarray(jax.nn.softmax(filter_logits(LOGITS, sampler), axis=-1))[0]


def _frequencies(sampler, seed=0):
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    draws = jax.jit(jax.vmap(lambda k: sample(k, LOGITS, sampler)[0]))(keys)
    return np.bincount(np.asarray(draws), minlength=PROBS.size) / DRAWS


def _normalised(p):
    return p / p.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_rescales_logits(temperature):
    expected = _normalised(PROBS ** (1 / temperature))
    assert np.abs(_probs(Sampler.create(temperature)) - expected).max() <= 1e-6


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_keeps_exactly_the_k_most_likely(k):
    kept = np.argsort(-PROBS, kind="stable")[:k]
    expected = np.zeros_like(PROBS)
    expected[kept] = PROBS[kept]
    probs = _probs(Sampler.create(1.0, top_k=k))
    assert (probs > 0).sum() == k
    assert np.abs(probs - _normalised(expected)).max() <= 1e-6


@pytest.mark.parametrize("top_p, nucleus", [(0.3, [1]), (0.6, [1, 3]), (0.7, [1, 3, 4]), (0.9, [1, 3, 4, 5, 0])])
def test_top_p_keeps_the_minimal_nucleus(top_p, nucleus):
    expected = np.zeros_like(PROBS)
    expected[nucleus] = PROBS[nucleus]
    probs = _probs(Sampler.create(1.0, top_p=top_p))
    assert np.abs(probs - _normalised(expected)).max() <= 1e-6


def test_top_p_applies_after_top_k_and_temperature():
    # T=0.5 squares the probabilities: 0.16, 0.0625, 0.0169, ... ; top-3 then keeps the mass 0.2394 of which
    # the top token alone has 0.668 (< 0.7), so top-p 0.7 keeps two tokens.
    tempered = PROBS**2
    expected = np.zeros_like(PROBS)
    expected[[1, 3]] = tempered[[1, 3]]
    probs = _probs(Sampler.create(0.5, top_k=3, top_p=0.7))
    assert np.abs(probs - _normalised(expected)).max() <= 1e-6


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                      dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=5, top_p=0.9)])
def test_draws_follow_the_filtered_distribution(settings):
    sampler = Sampler.create(**settings)
    expected, freq = _probs(sampler), _frequencies(sampler)
    assert np.abs(freq - expected).max() <= FREQ_TOL
    assert freq[expected == 0].sum() == 0  # filtered-out tokens are never drawn


def test_greedy_is_argmax_and_ignores_the_key():
    logits = jax.random.normal(jax.random.key(1), (4, 50))
    for seed in range(3):
        ids = sample(jax.random.key(seed), logits, Sampler.create(0.0, top_k=3, top_p=0.5))
        assert np.array_equal(np.asarray(ids), np.asarray(logits.argmax(-1)))


def test_same_key_same_draws():
    sampler = Sampler.create(1.0, top_p=0.9)
    assert np.array_equal(_frequencies(sampler, seed=3), _frequencies(sampler, seed=3))
    assert not np.array_equal(_frequencies(sampler, seed=3), _frequencies(sampler, seed=4))


@pytest.mark.parametrize("settings", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=0),
                                      dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_settings_are_errors(settings):
    with pytest.raises(MixtralError):
        Sampler.create(**{"temperature": 1.0, **settings})
