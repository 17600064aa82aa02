"""Sampling: the filtered distributions are exact, draws follow them, a row's draw is its own, settings are
checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.errors import MixtralError
from mixtral_jax.sampling import filter_rows, row_settings, sample_rows, top_logprobs

PROBS = np.array([0.05, 0.4, 0.02, 0.25, 0.13, 0.1, 0.03, 0.02])  # by rank: ids 1, 3, 4, 5, 0, 6, then 2 and 7
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]  # [1, V]
DRAWS = 40_000
# A frequency estimated from n draws has standard deviation sqrt(p(1-p)/n) <= 0.0025 at n = 40000;
# 0.01 is four of them, for the largest deviation over the 8 tokens.
FREQ_TOL = 0.01


def _settings(temperature=0.0, top_k=None, top_p=None):
    return jax.tree.map(jnp.asarray, row_settings(1, temperature, top_k, top_p))


def _probs(settings):
    return np.asarray(jax.nn.softmax(filter_rows(LOGITS, settings), axis=-1))[0]


def _frequencies(settings, seed=0):
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    draws = jax.jit(jax.vmap(lambda k: sample_rows(k[None], LOGITS, settings)[0]))(keys)
    return np.bincount(np.asarray(draws), minlength=PROBS.size) / DRAWS


def _normalised(p):
    return p / p.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_rescales_logits(temperature):
    expected = _normalised(PROBS ** (1 / temperature))
    assert np.abs(_probs(_settings(temperature)) - expected).max() <= 1e-6


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_keeps_exactly_the_k_most_likely(k):
    kept = np.argsort(-PROBS, kind="stable")[:k]
    expected = np.zeros_like(PROBS)
    expected[kept] = PROBS[kept]
    probs = _probs(_settings(1.0, top_k=k))
    assert (probs > 0).sum() == k
    assert np.abs(probs - _normalised(expected)).max() <= 1e-6


@pytest.mark.parametrize("top_p, nucleus", [(0.3, [1]), (0.6, [1, 3]), (0.7, [1, 3, 4]), (0.9, [1, 3, 4, 5, 0])])
def test_top_p_keeps_the_minimal_nucleus(top_p, nucleus):
    expected = np.zeros_like(PROBS)
    expected[nucleus] = PROBS[nucleus]
    probs = _probs(_settings(1.0, top_p=top_p))
    assert np.abs(probs - _normalised(expected)).max() <= 1e-6


def test_top_p_applies_after_top_k_and_temperature():
    # T=0.5 squares the probabilities: 0.16, 0.0625, 0.0169, ... ; top-3 then keeps the mass 0.2394 of which
    # the top token alone has 0.668 (< 0.7), so top-p 0.7 keeps two tokens.
    tempered = PROBS**2
    expected = np.zeros_like(PROBS)
    expected[[1, 3]] = tempered[[1, 3]]
    probs = _probs(_settings(0.5, top_k=3, top_p=0.7))
    assert np.abs(probs - _normalised(expected)).max() <= 1e-6


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                      dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=5, top_p=0.9)])
def test_draws_follow_the_filtered_distribution(settings):
    settings = _settings(**settings)
    expected, freq = _probs(settings), _frequencies(settings)
    assert np.abs(freq - expected).max() <= FREQ_TOL
    assert freq[expected == 0].sum() == 0  # filtered-out tokens are never drawn


def test_greedy_is_argmax_and_ignores_the_key():
    logits = jax.random.normal(jax.random.key(1), (4, 50))
    settings = jax.tree.map(jnp.asarray, row_settings(4, 0.0, top_k=3, top_p=0.5))
    for seed in range(3):
        ids = sample_rows(jax.random.split(jax.random.key(seed), 4), logits, settings)
        assert np.array_equal(np.asarray(ids), np.asarray(logits.argmax(-1)))


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    """Row 0 (temperature 1, no filter) draws the same token whether its neighbours are greedy, filtered by top-k
    and top-p (the sort runs), or absent; ids from n_valid on are never drawn."""
    logits = jax.random.normal(jax.random.key(2), (3, 50))
    keys = jax.random.split(jax.random.key(5), 3)

    def draws(neighbours):
        settings = jax.tree.map(lambda *f: jnp.concatenate(f), row_settings(1, 1.0), *neighbours)
        n = settings.temperature.shape[0]
        return int(sample_rows(keys[:n], logits[:n], settings, n_valid=40)[0])

    alone = draws([])
    assert alone == draws([row_settings(2, 0.0)]) == draws([row_settings(2, 0.7, top_k=5, top_p=0.8)])
    ids = jax.vmap(lambda k: sample_rows(k[None], logits[:1], _settings(1.0), n_valid=40))(
        jax.random.split(jax.random.key(0), 2000))
    assert int(ids.max()) < 40


def test_top_logprobs_are_the_unfiltered_distributions():
    logprob, ids, best = top_logprobs(LOGITS, jnp.asarray([4]), 3)
    assert np.allclose(np.exp(np.asarray(logprob)), PROBS[4], atol=1e-6)
    assert np.asarray(ids).tolist() == [[1, 3, 4]] and np.allclose(np.exp(np.asarray(best)), PROBS[[1, 3, 4]])


def test_same_key_same_draws():
    settings = _settings(1.0, top_p=0.9)
    assert np.array_equal(_frequencies(settings, seed=3), _frequencies(settings, seed=3))
    assert not np.array_equal(_frequencies(settings, seed=3), _frequencies(settings, seed=4))


@pytest.mark.parametrize("settings", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=0),
                                      dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_settings_are_errors(settings):
    with pytest.raises(MixtralError):
        row_settings(1, **{"temperature": 1.0, **settings})
