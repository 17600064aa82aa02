"""Prompts into a KV cache: bucketed shapes, the chunked prefill, and scoring (a prefill that keeps every
position's log-probabilities).

Legend: B batch, T padded prompt length, C prefill chunk, S cache slots, V vocab.

Prompts are right-padded to a bucketed length (padding has position -1 and is never cached), and the batch,
prompt and cache sizes are all rounded up to buckets (`bucket`: two per octave), so a new prompt recompiles
only when it crosses a bucket. The prefill processes C tokens at a time, so its attention scores are [C, S],
linear in the prompt length.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.backends import Backend
from mixtral_jax.backends.attention import MIN_KEY_BLOCK
from mixtral_jax.cache import KVCache
from mixtral_jax.config import ModelConfig
from mixtral_jax.distributed import fetch, place
from mixtral_jax.errors import MixtralError
from mixtral_jax.layers import Mode

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral

# A prefill chunk holds PREFILL_TOKENS tokens of a device's rows, at least MIN_CHUNK per row (`default_chunk`):
# larger chunks multiply each expert's rows in fewer, larger matmuls (docs/performance.md has the timings).
PREFILL_TOKENS = 2048
MIN_CHUNK = 256
MIN_BUCKET = 16


def bucket(n: int, multiple: int = 1) -> int:
    """`n` rounded up to one of two sizes per octave (16, 24, 32, 48, 64, 96, ...: at most half more than
    `n`, at least 16), then up to a multiple of `multiple`."""
    n = max(n, MIN_BUCKET)
    step = 1 << ((n - 1).bit_length() - 2)
    return round_up(round_up(n, step), multiple)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def default_chunk(cfg: ModelConfig, rows: int) -> int:
    """The prefill chunk length for `rows` prompts on each device; MIN_CHUNK with a sliding window, whose ring
    buffer of `window + chunk - 1` slots a longer chunk would grow (and score in one pass)."""
    return MIN_CHUNK if cfg.sliding_window is not None else max(MIN_CHUNK, PREFILL_TOKENS // rows)


def _chunk_positions(start: jax.Array, chunk: int, lengths: jax.Array) -> jax.Array:
    """Positions [B, C] of the chunk that starts at `start`; -1 past each row's length."""
    pos = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    return jnp.where(pos < lengths[:, None], pos, -1)


def fill_chunk(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, start: jax.Array, lengths: jax.Array,
               cache: KVCache, last: jax.Array, *, backend: Backend, mode: Mode) -> tuple[KVCache, jax.Array]:
    """The chunk tokens [B, C] of prompts of `lengths` [B] that starts at position `start` written into `cache`
    -> the cache, and `last` [B, V] with the logits of each row whose last prompt token is in this chunk."""
    chunk = tokens.shape[1]
    out = nnx.merge(graphdef, params)(tokens, _chunk_positions(start, chunk, lengths), mode, backend, cache,
                                      logit_index=jnp.clip(lengths - 1 - start, 0, chunk - 1))
    here = (lengths - 1 >= start) & (lengths - 1 < start + chunk)
    return out.cache, jnp.where(here[:, None], out.logits[:, 0], last)


def chunk_mode(length: int, chunk: int) -> Mode:
    """A prompt of `length` padded positions in one chunk is a PREFILL; in several, each chunk EXTENDs the cache."""
    return Mode.PREFILL if length == chunk else Mode.EXTEND


def fill_cache(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *,
               backend: Backend, cfg: ModelConfig, chunk: int) -> tuple[KVCache, jax.Array]:
    """Prompts tokens [B, T] (right-padded) written into an empty `cache` C tokens at a time (`fill_chunk`), for
    as many chunks as the longest prompt needs -> the cache and the logits [B, V] at each row's last prompt
    token (computed there only)."""
    batch, length = tokens.shape
    mode = chunk_mode(length, chunk)

    def body(i, carry):
        start = i * chunk
        return fill_chunk(graphdef, params, jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1), start, lengths,
                          *carry, backend=backend, mode=mode)

    last = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    n_chunks = jnp.minimum((jnp.max(lengths) + chunk - 1) // chunk, length // chunk)
    return jax.lax.fori_loop(0, n_chunks, body, (cache, last))


def _token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array, *,
                    backend: Backend, cfg: ModelConfig, chunk: int, slots: int) -> tuple[jax.Array, jax.Array]:
    """Tokens [B, T] -> log p(tokens[:, t + 1] | tokens[:, :t + 1]) [B, T] float32 and whether that token is the
    most likely one [B, T] bool, for t < `lengths` (the tokens the model reads; the row's next token after them
    is only predicted; 0 and False past that), one chunk at a time through the KV cache."""
    batch, length = tokens.shape
    cache = KVCache.create(cfg, backend, batch, slots, chunk=chunk)
    mode = Mode.PREFILL if length == chunk else Mode.EXTEND
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)

    def body(cache, start):
        positions = _chunk_positions(start, chunk, lengths)
        out = nnx.merge(graphdef, params)(jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1), positions,
                                          mode, backend, cache)
        logp = jax.nn.log_softmax(out.logits, axis=-1)  # [B, C, V]
        nxt = jax.lax.dynamic_slice_in_dim(targets, start, chunk, axis=1)
        picked = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
        valid = positions >= 0
        return out.cache, (jnp.where(valid, picked, 0.0), valid & (jnp.argmax(out.logits, axis=-1) == nxt))

    _, (logprobs, greedy) = jax.lax.scan(body, cache, jnp.arange(0, length, chunk, dtype=jnp.int32))
    # [T/C, B, C] -> [B, T]
    return jnp.moveaxis(logprobs, 0, 1).reshape(batch, length), jnp.moveaxis(greedy, 0, 1).reshape(batch, length)


@functools.cache
def _token_logprobs_jit(options: tuple[tuple[str, Any], ...]):
    return jax.jit(_token_logprobs, static_argnames=("graphdef", "backend", "cfg", "chunk", "slots"),
                   compiler_options=dict(options) or None)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_len: int, max_new_tokens: int = 0) -> None:
    """Raise MixtralError unless `prompts` are non-empty id lists that fit the context with the new tokens."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise MixtralError("prompts must be a non-empty list of token-id lists")
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise MixtralError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or not ids.size or not np.issubdtype(ids.dtype, np.integer):
            raise MixtralError(f"prompt {i} must be a non-empty list of token ids")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise MixtralError(f"prompt {i} has token ids outside [0, {vocab_size})")
        if len(ids) + max_new_tokens > max_len:
            raise MixtralError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                f"the model's context of {max_len} tokens"
            )


def score(model: Mixtral, ids: Sequence[int], chunk: int | None = None) -> np.ndarray:
    """log p(ids[t + 1] | ids[:t + 1]) for t < len(ids) - 1, float32, computed chunk by chunk."""
    return score_rows(model, [ids], chunk)[0][0]


def score_rows(model: Mixtral, rows: Sequence[Sequence[int]],
               chunk: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`score` of each row (of up to the model's context and one more token, which is only predicted), and
    whether each next token is the model's most likely one (bool, as long). The rows run together: the batch
    rounded up to a power of two and to the mesh's batch axes, the length to a bucket, so rows of similar
    lengths share one compiled program."""
    cfg = model.config
    check_prompts(rows, cfg.vocab_size, cfg.max_seq_len + 1)  # the last token is predicted, never read
    mesh_batch = 1 if model.mesh is None else model.mesh.shape["data"] * model.mesh.shape["fsdp"]
    batch = round_up(pow2(len(rows)), mesh_batch)
    longest = max(len(ids) for ids in rows)
    chunk = prefill_chunk(chunk, cfg, batch // mesh_batch, longest)
    tokens = np.zeros((batch, round_up(longest if len(rows) == 1 else bucket(longest), chunk)), np.int32)
    lengths = np.zeros(batch, np.int32)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)], lengths[i] = ids, len(ids) - 1
    with model.context():
        logprobs, greedy = _token_logprobs_jit(model.backend.compiler_options)(
            model.graphdef, model.params, *replicated(model, (tokens, lengths)),
            backend=model.backend, cfg=cfg, chunk=chunk, slots=cache_slots(cfg, longest - 1))
    logprobs, greedy = fetch(logprobs), fetch(greedy)
    return ([logprobs[i, : len(ids) - 1] for i, ids in enumerate(rows)],
            [greedy[i, : len(ids) - 1] for i, ids in enumerate(rows)])


def prefill_chunk(chunk: int | None, cfg: ModelConfig, rows: int, longest: int) -> int:
    """The prefill chunk for `rows` prompts a device: `chunk` (at least 1) or `default_chunk`, at most the
    bucketed longest prompt."""
    if chunk is not None and chunk < 1:
        raise MixtralError(f"chunk must be >= 1, got {chunk}")
    return min(chunk or default_chunk(cfg, rows), bucket(longest))


def cache_slots(cfg: ModelConfig, needed: int) -> int:
    """Cache positions for `needed` tokens, bucketed within the context; once they hold two of the smallest
    key blocks (`attention.MIN_KEY_BLOCK`), a multiple of it, so that a prefill attends to them in blocks
    (`attention.key_block`) even where the context clips the bucket."""
    slots = max(min(bucket(needed), cfg.max_seq_len), needed)
    return round_up(slots, MIN_KEY_BLOCK) if slots >= 2 * MIN_KEY_BLOCK else slots


def replicated(model: Mixtral, tree):
    """Host values placed whole on every device of the model's mesh; with several processes, each passes
    the same values and holds its own devices' copies."""
    if model.mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = jax.NamedSharding(model.mesh, jax.P())

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)))
        return place(np.asarray(x), sharding)

    return jax.tree.map(put, tree)
