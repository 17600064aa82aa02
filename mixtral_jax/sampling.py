"""Next-token sampling, each row with its own settings: greedy, temperature, top-k and top-p (nucleus), after
OpenAI's presence and frequency penalties and logit bias.

Legend: B rows, V vocab, K top log-probabilities reported.

Settings are traced values, so rows with different settings share one compiled program. A row's draw depends
only on its own logits, settings and key: the filters mask tokens in vocabulary order and the draw is taken
there, so whether other rows are greedy, filtered or not changes nothing about it.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.errors import MixtralError

NEG_INF = -jnp.inf


@flax.struct.dataclass
class RowSettings:
    """Sampling settings per row."""

    temperature: jax.Array  # [B] float32; 0 means greedy
    top_k: jax.Array  # [B] int32; 0 keeps every token
    top_p: jax.Array  # [B] float32 in (0, 1]; 1 keeps every token
    presence: jax.Array  # [B] float32, subtracted from the logit of each token the row has generated
    frequency: jax.Array  # [B] float32, subtracted once for each time it has generated it


PENALTY_RANGE = 2.0  # OpenAI's bound on |presence_penalty| and |frequency_penalty|
BIAS_RANGE = 100.0  # and on each logit bias


def check_settings(temperature: float, top_k: int | None = None, top_p: float | None = None,
                   presence: float = 0.0, frequency: float = 0.0) -> None:
    """Raise MixtralError unless temperature >= 0, top_k is an integer >= 1, top_p is in (0, 1] and the
    penalties are in [-2, 2]."""
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -PENALTY_RANGE <= value <= PENALTY_RANGE:
            raise MixtralError(f"{name} must be in [-2, 2], got {value}")
    if not temperature >= 0:
        raise MixtralError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise MixtralError(f"top_k must be an integer >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MixtralError(f"top_p must be in (0, 1], got {top_p}")


def row_settings(rows: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 presence: float = 0.0, frequency: float = 0.0) -> RowSettings:
    """The same checked settings for `rows` rows, as host arrays."""
    check_settings(temperature, top_k, top_p, presence, frequency)
    return RowSettings(np.full(rows, temperature, np.float32), np.full(rows, top_k or 0, np.int32),
                       np.full(rows, 1.0 if top_p is None else top_p, np.float32),
                       np.full(rows, presence, np.float32), np.full(rows, frequency, np.float32))


def checked_bias(vocab: int, bias: dict[int | str, float] | None) -> dict[int, float]:
    """A logit bias {token id: value in [-100, 100]} with its ids as ints (they may be strings, as JSON gives
    them); MixtralError for an id outside the vocabulary or a value out of range."""
    checked = {}
    for token, value in (bias or {}).items():
        try:
            token = int(token)
        except ValueError:
            raise MixtralError(f"logit_bias: {token!r} is not a token id") from None
        if not 0 <= token < vocab:
            raise MixtralError(f"logit_bias: token id {token} is not in [0, {vocab})")
        if not -BIAS_RANGE <= value <= BIAS_RANGE:
            raise MixtralError(f"logit_bias: {value} for token {token} is not in [-100, 100]")
        checked[token] = value
    return checked


def bias_row(vocab: int, bias: dict[int | str, float] | None = None) -> np.ndarray:
    """A logit bias (`checked_bias`) as float32 [1, V]."""
    row = np.zeros((1, vocab), np.float32)
    for token, value in checked_bias(vocab, bias).items():
        row[0, token] = value
    return row


def penalised(logits: jax.Array, counts: jax.Array, bias: jax.Array, settings: RowSettings) -> jax.Array:
    """Logits [B, V] less each row's penalties on the tokens it has generated, `counts` [B, V] times each, plus
    its `bias` [B, V], as OpenAI defines them: logit - count * frequency - (count > 0) * presence + bias. A row
    without either keeps its logits exactly."""
    logits = logits.astype(jnp.float32)
    seen = (counts > 0).astype(jnp.float32)
    return logits - counts * settings.frequency[:, None] - seen * settings.presence[:, None] + bias


def filter_rows(logits: jax.Array, settings: RowSettings) -> jax.Array:
    """Logits [B, V] -> each row's sampling distribution as logits [B, V]: divided by its temperature, -inf
    outside its top-k tokens and outside the smallest set of most likely tokens whose probability reaches its
    top-p (the nucleus, taken after top-k and temperature). Ties in top-k go to the lower id."""
    vocab = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / jnp.maximum(settings.temperature, 1e-6)[:, None]

    def filtered(scaled: jax.Array) -> jax.Array:
        order = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V] ids by rank
        values = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(vocab)[None, :]
        keep = rank < jnp.where(settings.top_k > 0, settings.top_k, vocab)[:, None]
        probs = jax.nn.softmax(jnp.where(keep, values, NEG_INF), axis=-1)
        keep &= jnp.cumsum(probs, axis=-1) - probs < settings.top_p[:, None]  # mass of the likelier ones
        rows = jnp.arange(scaled.shape[0])[:, None]
        return jnp.where(jnp.zeros_like(keep).at[rows, order].set(keep), scaled, NEG_INF)

    any_filter = jnp.any((settings.top_k > 0) & (settings.top_k < vocab) | (settings.top_p < 1))
    return jax.lax.cond(any_filter, filtered, lambda s: s, scaled)  # the sort only where some row filters


def sample_rows(keys: jax.Array, logits: jax.Array, settings: RowSettings, n_valid: int | None = None) -> jax.Array:
    """Logits [B, V] -> token ids [B] int32, each row drawn with its own key [B] and settings from
    `filter_rows`, or its argmax where its temperature is 0. Ids from `n_valid` on (a tokenizer smaller than
    the model's padded vocabulary) are never drawn."""
    logits = only_valid(logits.astype(jnp.float32), n_valid)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def drawn(logits: jax.Array) -> jax.Array:
        return jax.vmap(jax.random.categorical)(keys, filter_rows(logits, settings)).astype(jnp.int32)

    sampling = settings.temperature > 0
    ids = jax.lax.cond(jnp.any(sampling), drawn, lambda _: greedy, logits)  # all greedy: no draw at all
    return jnp.where(sampling, ids, greedy)


def top_logprobs(logits: jax.Array, ids: jax.Array, k: int,
                 n_valid: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's log-probabilities (before any sampling setting) of `ids` [B] -> [B], and the `k` likeliest
    ids [B, K] with theirs [B, K]."""
    logp = jax.nn.log_softmax(only_valid(logits.astype(jnp.float32), n_valid), axis=-1)
    best, best_ids = jax.lax.top_k(logp, k)
    return jnp.take_along_axis(logp, ids[:, None], axis=-1)[:, 0], best_ids.astype(jnp.int32), best


def only_valid(logits: jax.Array, n_valid: int | None) -> jax.Array:
    """Logits [B, V] with ids from `n_valid` on (none if None) at -inf."""
    if n_valid is None:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < n_valid, logits, NEG_INF)
