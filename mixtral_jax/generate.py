"""Generation: a chunked prefill into a preallocated KV cache, then the decode loop as one `lax.while_loop`.

Legend: B batch, T padded prompt length, C prefill chunk, S cache slots, N new-token buffer, V vocab.

Prompts are right-padded to a bucketed length (padding has position -1 and is never cached), each row
decodes from its own length, and the batch, prompt, cache and output sizes are all rounded up to buckets
(`bucket`: two per octave), so a new prompt or `max_new_tokens` recompiles only when it crosses a bucket.
The prefill processes C tokens at a time, so its attention scores are [C, S], linear in the prompt
length. The decode loop stops at the step limit `stop`, a traced value: `generate` runs it once to the
end, `stream` re-enters the same compiled loop a few steps at a time. The compiled programs take the
model's backend as a static argument and are compiled with its compiler options (`programs`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.backends import Backend
from mixtral_jax.backends.attention import MIN_KEY_BLOCK
from mixtral_jax.cache import KVCache
from mixtral_jax.config import ModelConfig
from mixtral_jax.distributed import fetch
from mixtral_jax.errors import MixtralError
from mixtral_jax.layers import Mode
from mixtral_jax.sampling import Sampler, sample

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral

# A prefill chunk holds PREFILL_TOKENS tokens of a device's rows, at least MIN_CHUNK per row (`default_chunk`):
# larger chunks multiply each expert's rows in fewer, larger matmuls (docs/performance.md has the timings).
PREFILL_TOKENS = 2048
MIN_CHUNK = 256
MIN_BUCKET = 16


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries; created by `prefill`, advanced by `decode`."""

    cache: KVCache
    tokens: jax.Array  # [B] int32, each row's latest token (the next step's input)
    positions: jax.Array  # [B] int32, its position
    out: jax.Array  # [B, N] int32, the new tokens; -1 after a row is done
    step: jax.Array  # [] int32, new tokens produced so far
    done: jax.Array  # [B] bool
    limit: jax.Array  # [] int32, max_new_tokens
    eos: jax.Array  # [] int32, the id that ends a row; -1 never does
    key: jax.Array  # PRNG key; step i samples with fold_in(key, i)


def bucket(n: int, multiple: int = 1) -> int:
    """`n` rounded up to one of two sizes per octave (16, 24, 32, 48, 64, 96, ...: at most half more than
    `n`, at least 16), then up to a multiple of `multiple`."""
    n = max(n, MIN_BUCKET)
    step = 1 << ((n - 1).bit_length() - 2)
    return _round_up(_round_up(n, step), multiple)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def default_chunk(cfg: ModelConfig, rows: int) -> int:
    """The prefill chunk length for `rows` prompts on each device; MIN_CHUNK with a sliding window, whose ring
    buffer of `window + chunk - 1` slots a longer chunk would grow (and score in one pass)."""
    return MIN_CHUNK if cfg.sliding_window is not None else max(MIN_CHUNK, PREFILL_TOKENS // rows)


def _chunk_positions(start: jax.Array, chunk: int, lengths: jax.Array) -> jax.Array:
    """Positions [B, C] of the chunk that starts at `start`; -1 past each row's length."""
    pos = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    return jnp.where(pos < lengths[:, None], pos, -1)


def fill_cache(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array, cache: KVCache, *,
               backend: Backend, cfg: ModelConfig, chunk: int) -> tuple[KVCache, jax.Array]:
    """Prompts tokens [B, T] (right-padded) written into an empty `cache` C tokens at a time, for as many chunks
    as the longest prompt needs (where T is one chunk that pass is a PREFILL, else every chunk EXTENDs the
    cache) -> the cache and the logits [B, V] at each row's last prompt token (computed there only)."""
    batch, length = tokens.shape
    mode = Mode.PREFILL if length == chunk else Mode.EXTEND

    def body(i, carry):
        cache, last = carry
        start = i * chunk
        out = nnx.merge(graphdef, params)(
            jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1), _chunk_positions(start, chunk, lengths),
            mode, backend, cache, logit_index=jnp.clip(lengths - 1 - start, 0, chunk - 1))
        here = (lengths - 1 >= start) & (lengths - 1 < start + chunk)
        return out.cache, jnp.where(here[:, None], out.logits[:, 0], last)

    last = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    n_chunks = jnp.minimum((jnp.max(lengths) + chunk - 1) // chunk, length // chunk)
    return jax.lax.fori_loop(0, n_chunks, body, (cache, last))


def _prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array, limit: jax.Array,
             eos: jax.Array, key: jax.Array, sampler: Sampler, *, backend: Backend, cfg: ModelConfig, chunk: int,
             slots: int, n_out: int) -> DecodeState:
    """Prompts tokens [B, T] (right-padded; rows of length 0 are batch padding) -> the state after the
    first new token (`fill_cache`, then a sample)."""
    batch = tokens.shape[0]
    cache, last = fill_cache(graphdef, params, tokens, lengths, KVCache.create(cfg, backend, batch, slots, chunk=chunk),
                             backend=backend, cfg=cfg, chunk=chunk)
    padding = lengths == 0
    first = jnp.where(padding, -1, sample(jax.random.fold_in(key, 0), last, sampler))
    return DecodeState(
        cache=cache,
        tokens=jnp.maximum(first, 0),
        positions=lengths,
        out=jnp.full((batch, n_out), -1, jnp.int32).at[:, 0].set(first),
        step=jnp.int32(1),
        done=padding | (first == eos) | (limit <= 1),
        limit=limit,
        eos=eos,
        key=key,
    )


def _decode(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, stop: jax.Array, sampler: Sampler, *,
            backend: Backend) -> DecodeState:
    """Decode one token per row per step until step `stop`, the limit, or every row is done."""

    def running(s: DecodeState) -> jax.Array:
        return (s.step < stop) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        positions = jnp.where(s.done, -1, s.positions)  # finished rows write nothing to the cache
        out = nnx.merge(graphdef, params)(s.tokens[:, None], positions[:, None], Mode.DECODE, backend, s.cache)
        new = sample(jax.random.fold_in(s.key, s.step), out.logits[:, 0], sampler)
        new = jnp.where(s.done, -1, new)
        return s.replace(
            cache=out.cache,
            tokens=jnp.where(s.done, s.tokens, new),
            positions=s.positions + 1,
            out=s.out.at[:, s.step].set(new),
            step=s.step + 1,
            done=s.done | (new == s.eos) | (s.step + 1 >= s.limit),
        )

    return jax.lax.while_loop(running, step, state)


def _token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array, *,
                    backend: Backend, cfg: ModelConfig, chunk: int, slots: int) -> jax.Array:
    """Tokens [B, T] -> log p(tokens[:, t + 1] | tokens[:, :t + 1]) [B, T] float32 (0 past each row's end),
    one chunk at a time through the KV cache."""
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
        valid = (positions >= 0) & (positions < lengths[:, None] - 1)
        return out.cache, jnp.where(valid, picked, 0.0)

    _, logprobs = jax.lax.scan(body, cache, jnp.arange(0, length, chunk, dtype=jnp.int32))
    return jnp.moveaxis(logprobs, 0, 1).reshape(batch, length)  # [T/C, B, C] -> [B, T]


class Programs(NamedTuple):
    """The compiled entry points for one backend's compiler options."""

    prefill: Callable[..., DecodeState]
    decode: Callable[..., DecodeState]
    token_logprobs: Callable[..., jax.Array]


@functools.cache
def _programs(options: tuple[tuple[str, Any], ...]) -> Programs:
    options = dict(options) or None
    return Programs(
        prefill=jax.jit(_prefill, static_argnames=("graphdef", "backend", "cfg", "chunk", "slots", "n_out"),
                        compiler_options=options),
        decode=jax.jit(_decode, static_argnames=("graphdef", "backend"), donate_argnames="state",
                       compiler_options=options),
        token_logprobs=jax.jit(_token_logprobs, static_argnames=("graphdef", "backend", "cfg", "chunk", "slots"),
                               compiler_options=options),
    )


def programs(backend: Backend) -> Programs:
    """prefill, decode and token_logprobs jitted with `backend`'s compiler options (one set per options)."""
    return _programs(backend.compiler_options)


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


def generate(model: Mixtral, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_at_eos: bool = True,
             chunk: int | None = None) -> list[list[int]]:
    """The new ids of each prompt (ending with EOS where a row stopped on it); see `Mixtral.generate`."""
    run = _Run(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, chunk)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    run.prefill()
    out = fetch(run.decode(max_new_tokens).out)[: len(prompts)]
    return [row[row >= 0].tolist() for row in out]


def stream(model: Mixtral, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_at_eos: bool = True,
           chunk: int | None = None, segment: int = 4) -> Iterator[list[int | None]]:
    """Yields each step's new id per prompt (None for a finished row) as the compiled loop produces
    them, running it `segment` steps at a time; the tokens equal `generate`'s for the same arguments."""
    run = _Run(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, chunk)
    if max_new_tokens:
        run.prefill()
    emitted = 0
    while emitted < max_new_tokens:
        out, step, done = fetch(run.state.out), int(fetch(run.state.step)), fetch(run.state.done)
        for i in range(emitted, step):
            yield [int(t) if t >= 0 else None for t in out[: len(prompts), i]]
        emitted = step
        if step >= max_new_tokens or done.all():
            return
        run.decode(min(step + segment, max_new_tokens))


def score(model: Mixtral, ids: Sequence[int], chunk: int | None = None) -> np.ndarray:
    """log p(ids[t + 1] | ids[:t + 1]) for t < len(ids) - 1, float32, computed chunk by chunk."""
    cfg = model.config
    check_prompts([ids], cfg.vocab_size, cfg.max_seq_len)
    chunk = prefill_chunk(chunk, cfg, 1, len(ids))
    tokens = np.zeros((1, _round_up(len(ids), chunk)), np.int32)
    tokens[0, : len(ids)] = ids
    with model.context():
        logprobs = programs(model.backend).token_logprobs(
            model.graphdef, model.params, *replicated(model, (tokens, np.int32([len(ids)]))),
            backend=model.backend, cfg=cfg, chunk=chunk, slots=cache_slots(cfg, len(ids)))
    return fetch(logprobs)[0, : len(ids) - 1]


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
    return _round_up(slots, MIN_KEY_BLOCK) if slots >= 2 * MIN_KEY_BLOCK else slots


def replicated(model: Mixtral, tree):
    """Host values placed whole on every device of the model's mesh; with several processes, each passes
    the same values and holds its own devices' copies."""
    if model.mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = jax.NamedSharding(model.mesh, jax.P())

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


class _Run:
    """One batch being generated: checked arguments, bucketed arrays, and the decode state."""

    def __init__(self, model: Mixtral, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos,
                 chunk):
        cfg = model.config
        check_prompts(prompts, cfg.vocab_size, cfg.max_seq_len, max_new_tokens)
        tokenizer = model.tokenizer
        sampler = Sampler.create(temperature, top_k, top_p, cfg.vocab_size,
                                 None if tokenizer is None else tokenizer.vocab_size)
        self.model = model
        lengths = [len(p) for p in prompts]
        mesh_batch = 1 if model.mesh is None else model.mesh.shape["data"] * model.mesh.shape["fsdp"]
        rows = _round_up(_pow2(len(prompts)), mesh_batch)
        chunk = prefill_chunk(chunk, cfg, rows // mesh_batch, max(lengths))
        tokens = np.zeros((rows, bucket(max(lengths), chunk)), np.int32)
        lens = np.zeros(tokens.shape[0], np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, : lengths[i]], lens[i] = prompt, lengths[i]
        eos = tokenizer.eos_id if tokenizer is not None else cfg.eos_id
        self.args = replicated(model, (tokens, lens, np.int32(max_new_tokens), np.int32(eos if stop_at_eos else -1),
                                        jax.random.key(seed), sampler))
        self.static = dict(cfg=cfg, chunk=chunk, slots=cache_slots(cfg, max(lengths) + max_new_tokens),
                           n_out=bucket(max_new_tokens))
        self.state: DecodeState | None = None

    def prefill(self) -> DecodeState:
        model = self.model
        with model.context():
            self.state = programs(model.backend).prefill(model.graphdef, model.params, *self.args,
                                                         backend=model.backend, **self.static)
        return self.state

    def decode(self, stop: int) -> DecodeState:
        """Advance to step `stop` (or until every row is done)."""
        model = self.model
        with model.context():
            stop = replicated(model, np.int32(stop))
            self.state = programs(model.backend).decode(model.graphdef, model.params, self.state, stop,
                                                        self.args[-1], backend=model.backend)
        return self.state
