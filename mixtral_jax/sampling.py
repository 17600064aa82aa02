"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions.

Legend: B batch, V vocab, C candidates (the k largest logits, or all V sorted).

`Sampler` is a pytree: temperature and top-p are traced values (changing them does not recompile), while
whether sampling is greedy and the top-k count shape the computation and are static.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mixtral_jax.errors import MixtralError

NEG_INF = -jnp.inf


@flax.struct.dataclass
class Sampler:
    temperature: jax.Array  # [] float32; 0 means greedy
    top_p: jax.Array | None  # [] float32 in (0, 1]; None keeps the whole distribution
    top_k: int | None = flax.struct.field(pytree_node=False, default=None)
    greedy: bool = flax.struct.field(pytree_node=False, default=True)
    n_valid: int | None = flax.struct.field(pytree_node=False, default=None)  # ids >= this are never drawn

    @classmethod
    def create(cls, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               vocab_size: int | None = None, n_valid: int | None = None) -> Sampler:
        """Checked settings; top-k of at least the vocabulary and top-p of 1 are no filter at all. `n_valid`:
        only ids below it may come out (a tokenizer smaller than the model's padded vocabulary)."""
        check_settings(temperature, top_k, top_p)
        if top_k is not None and vocab_size is not None and top_k >= vocab_size:
            top_k = None
        if n_valid is not None and vocab_size is not None and n_valid >= vocab_size:
            n_valid = None
        return cls(
            temperature=jnp.float32(temperature),
            top_p=None if top_p is None or top_p == 1 else jnp.float32(top_p),
            top_k=None if top_k is None else int(top_k),
            greedy=temperature == 0,
            n_valid=None if n_valid is None else int(n_valid),
        )


def check_settings(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise MixtralError unless temperature >= 0, top_k is an integer >= 1 and top_p is in (0, 1]."""
    if not temperature >= 0:
        raise MixtralError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise MixtralError(f"top_k must be an integer >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MixtralError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: jax.Array, sampler: Sampler) -> jax.Array:
    """Logits [B, V] -> the sampling distribution's logits [B, V]: divided by the temperature, -inf
    outside the top-k tokens and outside the smallest set of most likely tokens whose probability
    reaches top-p (the nucleus; computed after top-k and temperature). Ties in top-k go to the lower id."""
    logits = logits.astype(jnp.float32) / jnp.maximum(sampler.temperature, 1e-6)
    if sampler.top_k is None and sampler.top_p is None:
        return logits
    k = logits.shape[-1] if sampler.top_k is None else sampler.top_k
    values, ids = jax.lax.top_k(logits, k)  # [B, C] in descending order
    if sampler.top_p is not None:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely candidates
        values = jnp.where(mass_before < sampler.top_p, values, NEG_INF)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, NEG_INF).at[rows, ids].set(values)


def sample(key: jax.Array, logits: jax.Array, sampler: Sampler) -> jax.Array:
    """Logits [B, V] -> token ids [B] int32: the argmax when greedy, else a draw from `filter_logits`."""
    logits = _only_valid(logits, sampler.n_valid)
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampler), axis=-1).astype(jnp.int32)


def _only_valid(logits: jax.Array, n_valid: int | None) -> jax.Array:
    """Logits [B, V] with ids from `n_valid` on (none if None) never drawn."""
    if n_valid is None:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < n_valid, logits, NEG_INF)


@flax.struct.dataclass
class RowSettings:
    """Sampling settings per row, all traced, so that rows with different settings share one program."""

    temperature: jax.Array  # [B] float32; 0 means greedy
    top_k: jax.Array  # [B] int32; 0 keeps every token
    top_p: jax.Array  # [B] float32 in (0, 1]


def sample_rows(keys: jax.Array, logits: jax.Array, settings: RowSettings, n_valid: int | None = None) -> jax.Array:
    """Logits [B, V] -> token ids [B] int32, each row drawn with its own key [B] and settings: the argmax where
    its temperature is 0, else a draw after temperature, top-k and then top-p (as `filter_logits`)."""
    vocab = logits.shape[-1]
    logits = _only_valid(logits.astype(jnp.float32), n_valid)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(settings.temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # [B, V], ties to the lower id
    values = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(settings.top_k > 0, settings.top_k, vocab)[:, None]
    values = jnp.where(rank < k, values, NEG_INF)
    probs = jax.nn.softmax(values, axis=-1)
    values = jnp.where(jnp.cumsum(probs, axis=-1) - probs < settings.top_p[:, None], values, NEG_INF)
    drawn = jax.vmap(jax.random.categorical)(keys, values)  # [B] indices into `order`
    drawn = jnp.take_along_axis(order, drawn[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(settings.temperature > 0, drawn, greedy)
