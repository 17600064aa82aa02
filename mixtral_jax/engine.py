"""Decode slots: prompts are prefilled into slots, and every slot decodes together, a few steps per host
round trip, until its request ends (EOS, its token limit, or a cancel). `generate` fills all slots at once
and decodes them to the end; the server admits each request into a free slot as one frees up, its prompt
prefilled a chunk at a time between decode rounds.

Legend: B slots, S cache positions, T padded prompt length, C prefill chunk, V vocab, n steps per round,
K top log-probabilities reported per token.

Every slot has its own position, token limit, sampling settings (penalties and logit bias included) and PRNG
key (its i-th new token is drawn with `fold_in(key, i)`), so what a request produces does not depend on what
else is running. The programs take the slot count, the cache length, the chunk and the steps per round as
static values: a server that compiles them for its prompt buckets at start-up never compiles again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import moe
from mixtral_jax.backends import Backend
from mixtral_jax.backends.reference import insert_rows
from mixtral_jax.cache import KVCache
from mixtral_jax.config import ModelConfig
from mixtral_jax.distributed import fetch, place
from mixtral_jax.errors import MixtralError
from mixtral_jax.layers import Mode
from mixtral_jax.prefill import (
    MIN_BUCKET,
    bucket,
    cache_slots,
    check_prompts,
    chunk_mode,
    default_chunk,
    fill_cache,
    fill_chunk,
    pow2,
    replicated,
)
from mixtral_jax.sampling import RowSettings, bias_row, penalised, row_settings, sample_rows, top_logprobs
from mixtral_jax.steering import Steering, steer

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral


# Short prompts waiting for slots are prefilled GROUP at a time, each padded to `group_len` tokens: a batched
# prefill multiplies each expert's rows, and powers of two keep the programs to compile few.
GROUP = 4


def group_len(n: int) -> int:
    """The padded length of an `n`-token prompt prefilled in a group: a power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, pow2(n))


@flax.struct.dataclass
class Slots:
    """Everything the slots carry between rounds."""

    cache: KVCache  # B rows of S positions
    tokens: jax.Array  # [B] int32, each slot's latest token (its next step's input)
    positions: jax.Array  # [B] int32, that token's position
    generated: jax.Array  # [B] int32, new tokens so far
    limit: jax.Array  # [B] int32, the request's max_new_tokens
    eos: jax.Array  # [B] int32, the id that ends the request; -1 none does
    done: jax.Array  # [B] bool; a free slot is done
    keys: jax.Array  # [B] PRNG keys
    settings: RowSettings
    logprobs: jax.Array  # [B] bool, the request wants log-probabilities
    counts: jax.Array  # [B, V] int32, how often the slot has generated each token (for its penalties)
    bias: jax.Array  # [B, V] float32, the request's logit bias

    def penalising(self) -> jax.Array:
        """Whether some slot has penalties or a logit bias (a scalar): while none has, sampling reads the logits
        as they are."""
        s = self.settings
        return jnp.any(s.presence != 0) | jnp.any(s.frequency != 0) | jnp.any(self.bias != 0)

    def sampled(self, rows: jax.Array | None, logits: jax.Array, keys: jax.Array, n_valid: int | None,
                pending: jax.Array | None = None) -> jax.Array:
        """Tokens [R] of slots `rows` [R] (None: every slot) drawn from their logits [R, V] with `keys` [R], after
        their penalties and logit bias; `pending` [n, R]: tokens generated since `counts` was updated (-1
        none)."""
        pick = (lambda field: field) if rows is None else (lambda field: field[rows])
        settings = jax.tree.map(pick, self.settings)

        def adjusted(logits: jax.Array) -> jax.Array:
            counts = pick(self.counts) + (0 if pending is None else one_hot_counts(pending, self.counts.shape[1]))
            return penalised(logits, counts, pick(self.bias), settings)

        logits = jax.lax.cond(self.penalising(), adjusted, lambda x: x.astype(jnp.float32), logits)
        return sample_rows(keys, logits, settings, n_valid)

    def counted(self, rows: jax.Array | None, ids: jax.Array) -> jax.Array:
        """`counts` with new tokens `ids` [n, R] (-1 none) of slots `rows` [R] (None: every slot) added."""
        new = one_hot_counts(ids, self.counts.shape[1])
        return self.counts + new if rows is None else self.counts.at[rows].add(new)


def one_hot_counts(ids: jax.Array, vocab: int) -> jax.Array:
    """How often each token is among `ids` [n, R] (-1 none) -> [R, V] int32."""
    return jnp.sum(ids[..., None] == jnp.arange(vocab), axis=0, dtype=jnp.int32)


class Tokens(NamedTuple):
    """New tokens [..., B] (-1 where a slot produced none) and, where asked for, the model's log-probabilities:
    of each token [..., B], and the K likeliest ids [..., B, K] with theirs."""

    ids: jax.Array | np.ndarray
    logprob: jax.Array | np.ndarray | None = None
    top_ids: jax.Array | np.ndarray | None = None
    top_logprob: jax.Array | np.ndarray | None = None

    def take(self, index) -> Tokens:
        """Every field indexed along its first axis (a step of a round's tokens, or a row range)."""
        return Tokens(*(None if x is None else x[index] for x in self))


def _tokens(logits: jax.Array, ids: jax.Array, n_logprobs: int, n_valid: int | None,
            wanted: jax.Array | None = None) -> Tokens:
    """`ids` [B] drawn from `logits` [B, V], with their log-probabilities when `n_logprobs` > 0: computed only
    where some row is `wanted` [B] (zeros otherwise), or always without it."""
    if not n_logprobs:
        return Tokens(ids)
    if wanted is None:
        return Tokens(ids, *top_logprobs(logits, ids, n_logprobs, n_valid))
    rows = ids.shape[0]

    def nothing(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, n_logprobs), jnp.int32),
                jnp.zeros((rows, n_logprobs), jnp.float32))

    return Tokens(ids, *jax.lax.cond(jnp.any(wanted), lambda x: top_logprobs(x, ids, n_logprobs, n_valid), nothing,
                                     logits))


def _first(state: Slots, rows: jax.Array, last: jax.Array, *, n_valid: int | None,
           n_logprobs: int) -> tuple[Slots, Tokens]:
    """Slots `rows` [R] whose prompts end with logits `last` [R, V]: their first new token drawn (key i=0)."""
    first = state.sampled(rows, last, jax.vmap(jax.random.fold_in)(state.keys[rows], jnp.zeros_like(rows)), n_valid)
    state = state.replace(tokens=state.tokens.at[rows].set(first), generated=state.generated.at[rows].set(1),
                          counts=state.counted(rows, first[None]),
                          done=state.done.at[rows].set((first == state.eos[rows]) | (state.limit[rows] <= 1)))
    return state, _tokens(last, first, n_logprobs, n_valid)


def _empty(*, backend: Backend, cfg: ModelConfig, slots: int, max_len: int, chunk: int) -> Slots:
    zeros, no_penalty = jnp.zeros((slots,), jnp.int32), jnp.zeros((slots,), jnp.float32)
    return Slots(
        cache=KVCache.create(cfg, backend, slots, max_len, chunk=chunk), tokens=zeros, positions=zeros,
        generated=zeros, limit=zeros, eos=zeros - 1, done=jnp.ones((slots,), bool),
        keys=jax.random.split(jax.random.key(0), slots),
        settings=RowSettings(jnp.zeros((slots,), jnp.float32), zeros, jnp.ones((slots,), jnp.float32), no_penalty,
                             no_penalty),
        logprobs=jnp.zeros((slots,), bool), **_no_counts(cfg, slots))


def _no_counts(cfg: ModelConfig, slots: int) -> dict[str, jax.Array]:
    """Slots' `counts` and `bias` with nothing generated and no bias."""
    return dict(counts=jnp.zeros((slots, cfg.vocab_size), jnp.int32),
                bias=jnp.zeros((slots, cfg.vocab_size), jnp.float32))


def _start(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array, limit: jax.Array,
           eos: jax.Array, seed: jax.Array, settings: RowSettings, *, backend: Backend, cfg: ModelConfig, chunk: int,
           max_len: int, n_valid: int | None, n_logprobs: int) -> tuple[Slots, Tokens]:
    """Every slot's prompt, tokens [B, T] (right-padded; a row of length 0 is an empty slot), prefilled together
    -> the slots and their first tokens [B]; row r samples with `fold_in(key(seed), r)`."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(tokens.shape[0]))
    cache = KVCache.create(cfg, backend, tokens.shape[0], max_len, chunk=chunk)
    cache, last = fill_cache(graphdef, params, tokens, lengths, cache, backend=backend, cfg=cfg, chunk=chunk)
    empty = lengths == 0
    state = Slots(cache=cache, tokens=jnp.zeros_like(lengths), positions=lengths, generated=jnp.zeros_like(lengths),
                  limit=limit, eos=eos, done=empty, keys=keys, settings=settings, logprobs=jnp.zeros_like(empty),
                  **_no_counts(cfg, tokens.shape[0]))
    state, first = _first(state, jnp.arange(tokens.shape[0]), last, n_valid=n_valid, n_logprobs=n_logprobs)
    state = state.replace(done=state.done | empty)
    return state, first._replace(ids=jnp.where(empty, -1, first.ids))


def _new_row(*, backend: Backend, cfg: ModelConfig, max_len: int, chunk: int) -> tuple[KVCache, jax.Array]:
    """An empty one-row cache and its last-token logits [1, V], for a prompt prefilled chunk by chunk
    (`prefill.fill_chunk`)."""
    return KVCache.create(cfg, backend, 1, max_len, chunk=chunk), jnp.zeros((1, cfg.vocab_size), jnp.float32)


def _insert(state: Slots, rows: KVCache, last: jax.Array, at: jax.Array, length: jax.Array, limit: jax.Array,
            eos: jax.Array, seed: jax.Array, settings: RowSettings, logprobs: jax.Array, bias: jax.Array, *,
            backend: Backend, n_valid: int | None, n_logprobs: int) -> tuple[Slots, Tokens]:
    """Prefilled prompts' rows [R] into slots `at` [R], which start decoding -> their first tokens [R]; each
    samples with `fold_in(key(seed), 0)`, as row 0 of `_start`."""
    key = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(seed)
    cache = KVCache(kv=backend.insert_rows(state.cache.kv, rows.kv, at), pos=insert_rows(state.cache.pos, rows.pos, at))

    def put(field: jax.Array, value: jax.Array) -> jax.Array:
        return field.at[at].set(value)

    state = state.replace(
        cache=cache, positions=put(state.positions, length), limit=put(state.limit, limit), eos=put(state.eos, eos),
        keys=put(state.keys, key), logprobs=put(state.logprobs, logprobs), bias=put(state.bias, bias),
        counts=put(state.counts, 0), settings=jax.tree.map(put, state.settings, settings))
    return _first(state, at, last, n_valid=n_valid, n_logprobs=n_logprobs)


def _admit_rows(graphdef: nnx.GraphDef, params: nnx.State, state: Slots, tokens: jax.Array, lengths: jax.Array,
                at: jax.Array, limit: jax.Array, eos: jax.Array, seed: jax.Array, settings: RowSettings,
                logprobs: jax.Array, bias: jax.Array, *, backend: Backend, cfg: ModelConfig, cache_chunk: int,
                n_valid: int | None, n_logprobs: int) -> tuple[Slots, Tokens]:
    """Prompts tokens [R, T] that fit one chunk prefilled together into slots `at` [R] -> their first tokens."""
    rows = KVCache.create(cfg, backend, tokens.shape[0], state.cache.slots, chunk=cache_chunk)
    rows, last = fill_cache(graphdef, params, tokens, lengths, rows, backend=backend, cfg=cfg, chunk=tokens.shape[1])
    return _insert(state, rows, last, at, lengths, limit, eos, seed, settings, logprobs, bias, backend=backend,
                   n_valid=n_valid, n_logprobs=n_logprobs)


def _decode(graphdef: nnx.GraphDef, params: nnx.State, state: Slots, *, backend: Backend, n: int,
            n_valid: int | None, n_logprobs: int) -> tuple[Slots, Tokens]:
    """Up to `n` decode steps over every slot, fewer once all are done -> the state and the new tokens [n, B]."""
    slots = state.tokens.shape[0]
    blank = _tokens(jnp.zeros((slots, 1 + n_logprobs), jnp.float32), jnp.full((slots,), -1, jnp.int32), n_logprobs,
                    None)
    out = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), blank)

    def running(carry: tuple[jax.Array, Slots, Tokens]) -> jax.Array:
        i, s, _ = carry
        return (i < n) & ~jnp.all(s.done)

    def step(carry: tuple[jax.Array, Slots, Tokens]) -> tuple[jax.Array, Slots, Tokens]:
        i, s, out = carry
        positions = jnp.where(s.done, -1, s.positions)  # done slots write nothing to the cache
        result = nnx.merge(graphdef, params)(s.tokens[:, None], positions[:, None], Mode.DECODE, backend, s.cache)
        logits = result.logits[:, 0]
        keys = jax.vmap(jax.random.fold_in)(s.keys, s.generated)
        new = jnp.where(s.done, -1, s.sampled(None, logits, keys, n_valid, out.ids))
        running = ~s.done
        generated = s.generated + running
        s = s.replace(cache=result.cache, tokens=jnp.where(running, new, s.tokens), positions=s.positions + running,
                      generated=generated, done=s.done | (new == s.eos) | (generated >= s.limit))
        emitted = _tokens(logits, new, n_logprobs, n_valid, s.logprobs & running)
        return i + 1, s, jax.tree.map(lambda buf, x: buf.at[i].set(x), out, emitted)

    _, state, out = jax.lax.while_loop(running, step, (jnp.int32(0), state, out))
    # the round's tokens are counted once it ends (penalised sampling adds those of its earlier steps): an update
    # of the counts in the loop's carry cost XLA:CPU milliseconds a step
    return state.replace(counts=state.counted(None, out.ids)), out


def _cancel(state: Slots, at: jax.Array) -> Slots:
    return state.replace(done=state.done.at[at].set(True))


class Programs(NamedTuple):
    """The compiled entry points for one backend's compiler options."""

    empty: Callable[..., Slots]
    start: Callable[..., tuple[Slots, Tokens]]
    new_row: Callable[..., tuple[KVCache, jax.Array]]
    fill_row: Callable[..., tuple[KVCache, jax.Array]]
    insert: Callable[..., tuple[Slots, Tokens]]
    admit_rows: Callable[..., tuple[Slots, Tokens]]
    decode: Callable[..., tuple[Slots, Tokens]]
    cancel: Callable[..., Slots]


@functools.cache
def _programs(options: tuple[tuple[str, Any], ...]) -> Programs:
    options = dict(options) or None
    model = ("graphdef", "backend")
    return Programs(
        empty=jax.jit(_empty, static_argnames=("backend", "cfg", "slots", "max_len", "chunk"),
                      compiler_options=options),
        start=jax.jit(_start, static_argnames=(*model, "cfg", "chunk", "max_len", "n_valid", "n_logprobs"),
                      compiler_options=options),
        new_row=jax.jit(_new_row, static_argnames=("backend", "cfg", "max_len", "chunk"), compiler_options=options),
        fill_row=jax.jit(fill_chunk, static_argnames=(*model, "mode"), donate_argnames=("cache", "last"),
                         compiler_options=options),
        insert=jax.jit(_insert, static_argnames=("backend", "n_valid", "n_logprobs"), donate_argnames="state",
                       compiler_options=options),
        admit_rows=jax.jit(_admit_rows, static_argnames=(*model, "cfg", "cache_chunk", "n_valid", "n_logprobs"),
                           donate_argnames="state", compiler_options=options),
        decode=jax.jit(_decode, static_argnames=(*model, "n", "n_valid", "n_logprobs"), donate_argnames="state",
                       compiler_options=options),
        cancel=jax.jit(_cancel, donate_argnames="state"),
    )


def programs(backend: Backend) -> Programs:
    """The engine's programs jitted with `backend`'s compiler options (one set per options)."""
    return _programs(backend.compiler_options)


@dataclasses.dataclass
class _Admission:
    """A prompt being prefilled into its slot a chunk at a time."""

    slot: int
    prompt: np.ndarray  # [n] int32
    chunk: int  # its prefill chunk: the prompt's bucket, at most the engine's chunk
    request: tuple  # limit, eos, seed, settings, logprobs [1], bias [1, V]: as `_insert` takes them, one row
    row: Any = None  # (row cache, last logits) once its first chunk ran
    done_chunks: int = 0

    def padded(self, length: int) -> np.ndarray:
        """The prompt right-padded to `length` tokens [1, length]."""
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : self.prompt.size] = self.prompt
        return tokens


class Engine:
    """`slots` decode slots of `max_len` tokens each (prompt and completion) over `model`'s mesh.

    `admit` queues a prompt for a free slot and `prefill` advances the queued prompts by about one chunk of
    tokens, returning the first token of each that completes; `step` runs up to `steps` decode steps over
    every slot; `finished` says which slots ended (EOS or limit) and frees them; `cancel` ends a slot at once.
    `start` fills every slot at once (one batched prefill: `generate`). With `logprobs` K > 0 every token
    comes with its log-probability and the K likeliest alternatives."""

    def __init__(self, model: Mixtral, slots: int = 8, max_len: int | None = None, steps: int = 4,
                 chunk: int | None = None, logprobs: int = 0):
        cfg = model.config
        if slots < 1 or steps < 1:
            raise MixtralError(f"slots and steps must be >= 1, got {slots} and {steps}")
        if chunk is not None and chunk < 1:
            raise MixtralError(f"chunk must be >= 1, got {chunk}")
        if not 0 <= logprobs <= cfg.vocab_size:
            raise MixtralError(f"logprobs must be in [0, {cfg.vocab_size}], got {logprobs}")
        self.model, self.steps, self.n_slots, self.n_logprobs = model, steps, slots, logprobs
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.chunk = chunk or default_chunk(cfg, 1)  # prompts are admitted one by one (or a group of short ones)
        tokenizer = model.tokenizer
        self.n_valid = None if tokenizer is None or tokenizer.vocab_size >= cfg.vocab_size else tokenizer.vocab_size
        self.eos = tokenizer.eos_id if tokenizer is not None else cfg.eos_id
        self.group = min(GROUP, slots)  # short prompts prefilled together
        self.busy: set[int] = set()  # slots holding a request, prefilling or decoding
        self.pending: list[_Admission] = []  # prompts being prefilled, oldest first
        self.state: Slots | None = None

    @property
    def _programs(self) -> Programs:
        return programs(self.model.backend)

    @property
    def cache_len(self) -> int:
        """Cache positions per slot: `max_len` bucketed (`prefill.cache_slots`)."""
        return cache_slots(self.model.config, self.max_len)

    def _static(self) -> dict:
        return dict(n_valid=self.n_valid, n_logprobs=self.n_logprobs)

    def free(self) -> list[int]:
        return [i for i in range(self.n_slots) if i not in self.busy]

    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
              top_k: int | None = None, top_p: float | None = None, seed: int = 0,
              stop_at_eos: bool = True) -> Tokens:
        """Every prompt (at most one per slot) prefilled into slots 0, 1, ... together; row i samples with
        `fold_in(key(seed), i)` -> the first tokens [slots] (-1 for the slots left empty)."""
        args, static = self._start_args(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
        model = self.model
        with model.context():
            self.state, first = self._programs.start(model.graphdef, model.params, *args, **static)
        self.busy.update(range(len(prompts)))
        return jax.tree.map(fetch, first)

    def lower_start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[jax.stages.Lowered, tuple]:
        """The program `start` runs for `prompts` (greedy), lowered, and its arguments: `.compile()(params,
        *args)` runs it."""
        args, static = self._start_args(prompts, max_new_tokens, 0.0, None, None, 0, True)
        with self.model.context():
            return self._programs.start.lower(self.model.graphdef, self.model.params, *args, **static), args

    def _start_args(self, prompts, max_new_tokens, temperature, top_k, top_p, seed,
                    stop_at_eos) -> tuple[tuple, dict]:
        model, cfg = self.model, self.model.config
        check_prompts(prompts, cfg.vocab_size, self.max_len, max_new_tokens)
        if len(prompts) > self.n_slots or self.busy:
            raise MixtralError(f"start needs {len(prompts)} idle slots of {self.n_slots}")
        if max_new_tokens < 1:
            raise MixtralError("max_new_tokens must be >= 1 for a slot")
        settings = row_settings(self.n_slots, temperature, top_k, top_p)
        lengths = np.zeros(self.n_slots, np.int32)
        lengths[: len(prompts)] = [len(p) for p in prompts]
        chunk = min(self.chunk, bucket(int(lengths.max())))
        tokens = np.zeros((self.n_slots, bucket(int(lengths.max()), chunk)), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = prompt
        args = replicated(model, (tokens, lengths, np.full(self.n_slots, max_new_tokens, np.int32),
                                  np.full(self.n_slots, self.eos if stop_at_eos else -1, np.int32), np.uint32(seed),
                                  settings))
        return args, dict(backend=model.backend, cfg=cfg, chunk=chunk, max_len=self.cache_len, **self._static())

    def admit(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
              top_p: float | None = None, seed: int = 0, stop_at_eos: bool = True, logprobs: bool = False,
              presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
              logit_bias: dict[int, float] | None = None) -> int:
        """Queue `prompt` for the first free slot (it samples with `fold_in(key(seed), 0)`, as row 0 of
        `start`; with `logprobs`, its tokens come with their log-probabilities; the penalties and logit bias
        are OpenAI's, `sampling.penalised`) -> the slot; `prefill` runs it."""
        cfg = self.model.config
        check_prompts([prompt], cfg.vocab_size, self.max_len, max_new_tokens)
        settings = row_settings(1, temperature, top_k, top_p, presence_penalty, frequency_penalty)
        bias = bias_row(cfg.vocab_size, logit_bias)
        if max_new_tokens < 1:
            raise MixtralError("max_new_tokens must be >= 1 for a slot")
        free = self.free()
        if not free:
            raise MixtralError(f"all {self.n_slots} slots are busy")
        request = (np.int32([max_new_tokens]), np.int32([self.eos if stop_at_eos else -1]), np.uint32([seed]),
                   settings, np.bool_([logprobs]), bias)
        self.pending.append(_Admission(free[0], np.asarray(prompt, np.int32), min(self.chunk, bucket(len(prompt))),
                                       request))
        self.busy.add(free[0])
        return free[0]

    def prefill(self, budget: int | None = None,
                ready: Callable[[int, Tokens], None] | None = None) -> list[tuple[int, Tokens]]:
        """Advance the queued prompts, oldest first, until `budget` tokens (default: one chunk) have been
        prefilled -> (slot, its first token [1]) for each prompt that completed, also handed to `ready` as soon
        as it is known. Short prompts at the head of the queue are prefilled `group` at a time (`_group`); a
        longer one a chunk at a time, into a one-row cache that joins the slots when complete."""
        model, budget = self.model, budget or self.chunk
        completed = []

        def complete(slot: int, first: Tokens) -> None:
            completed.append((slot, first))
            if ready is not None:
                ready(slot, first)

        with model.context():
            if self.state is None and self.pending:
                self.state = self._programs.empty(backend=model.backend, cfg=model.config, slots=self.n_slots,
                                                  max_len=self.cache_len, chunk=self.chunk)
            while self.pending and budget > 0:
                group = self._group()
                if group:
                    for slot, first in self._admit_group(group):
                        complete(slot, first)
                    budget -= self.group * group_len(max(job.prompt.size for job in group))
                    continue
                job = self.pending[0]
                if job.row is None:
                    job.row = self._programs.new_row(backend=model.backend, cfg=model.config, max_len=self.cache_len,
                                                     chunk=self.chunk)
                start, padded = job.done_chunks * job.chunk, bucket(job.prompt.size, job.chunk)
                tokens, start_at, length = replicated(model, (job.padded(padded)[:, start : start + job.chunk],
                                                              np.int32(start), np.int32([job.prompt.size])))
                job.row = self._programs.fill_row(model.graphdef, model.params, tokens, start_at, length, *job.row,
                                                  backend=model.backend, mode=chunk_mode(padded, job.chunk))
                job.done_chunks += 1
                budget -= job.chunk
                if start + job.chunk < job.prompt.size:
                    continue
                self.pending.pop(0)
                self.state, first = self._programs.insert(
                    self.state, *job.row, *replicated(model, (np.int32([job.slot]), np.int32([job.prompt.size]),
                                                              *job.request)), backend=model.backend, **self._static())
                complete(job.slot, jax.tree.map(fetch, first))
        return completed

    def _group(self) -> list[_Admission]:
        """The queued prompts at the head that `_admit_group` takes in one program: `group` not yet started
        whose `group_len` times `group` fits a chunk, or none (fewer would pay for whole padding rows, whose
        attention costs as much as a prompt's)."""
        group = []
        for job in self.pending[: self.group]:
            if job.row is not None or group_len(job.prompt.size) * self.group > self.chunk:
                break
            group.append(job)
        return group if len(group) == self.group > 1 else []

    def _admit_group(self, group: list[_Admission]) -> list[tuple[int, Tokens]]:
        """`group`'s prompts prefilled together into their slots, each padded to the longest one's `group_len`
        -> (slot, first token [1]) of each."""
        model = self.model
        length = group_len(max(job.prompt.size for job in group))
        tokens = np.concatenate([job.padded(length) for job in group])
        requests = jax.tree.map(lambda *parts: np.concatenate(parts), *(job.request for job in group))  # [group]
        args = replicated(model, (tokens, np.int32([job.prompt.size for job in group]),
                                  np.int32([job.slot for job in group]), *requests))
        self.state, first = self._programs.admit_rows(model.graphdef, model.params, self.state, *args,
                                                      backend=model.backend, cfg=model.config, cache_chunk=self.chunk,
                                                      **self._static())
        del self.pending[: len(group)]
        first = jax.tree.map(fetch, first)
        return [(job.slot, first.take(slice(i, i + 1)))
                for i, job in enumerate(group)]

    def step(self, n: int | None = None) -> Tokens:
        """Up to `n` (default `steps`) decode steps over every slot -> the new tokens [n, slots], -1 where
        none (every slot, once all are done)."""
        model, layouts = self.model, jax.tree.map(lambda x: x.sharding, self.state)
        with model.context():
            self.state, new = self._programs.decode(model.graphdef, model.params, self.state, backend=model.backend,
                                                    n=n or self.steps, **self._static())
            # the loop may hand fields back laid out as its carry was (the slot positions, the per-slot fields
            # on a mesh, the token counts as the logits): the state keeps the layout the other programs leave
            # and were compiled for
            self.state = jax.tree.map(lambda x, layout: x if x.sharding == layout else jax.device_put(x, layout),
                                      self.state, layouts)
        return jax.tree.map(fetch, new)

    def decoding(self) -> bool:
        """Whether some slot is decoding (busy and prefilled)."""
        return len(self.busy) > len(self.pending)

    def finished(self) -> list[int]:
        """The decoding slots whose request ended (EOS or its limit); they are free from now on."""
        if self.state is None:
            return []
        done = fetch(self.state.done)
        prefilling = {job.slot for job in self.pending}
        ended = [i for i in self.busy if done[i] and i not in prefilling]
        self.busy.difference_update(ended)
        return ended

    def cancel(self, slot: int) -> None:
        """End the request in `slot` now (or drop its queued prompt) and free it."""
        queued = [job for job in self.pending if job.slot == slot]
        if queued:
            self.pending.remove(queued[0])
        elif self.state is not None:
            model = self.model
            with model.context():
                self.state = self._programs.cancel(self.state, replicated(model, np.int32(slot)))
        self.busy.discard(slot)

    def reset(self) -> None:
        """Free every slot and forget the state (after a failed program, whose donated state is gone)."""
        self.busy.clear()
        self.pending.clear()
        self.state = None

    def compile_all(self) -> int:
        """Compile the prefill of every prompt bucket (alone, in a group, and the chunks of a longer prompt), the
        decode round (of `steps` steps, and of one) and the cancel, by running each in free slots: after
        this, requests never compile. Each program runs once for every routing that the backend's expert
        kernels need to take all their branches (`Backend.warm_routes`, made to happen by `steering`), so
        that no request waits for a branch's first run either -> the number of prefill programs."""
        lengths, n = [], 1
        while n <= self.chunk and n < self.max_len:
            lengths.append([min(bucket(n), self.max_len - 1)])
            n = bucket(n) + 1
        if self.max_len - 1 > self.chunk:
            lengths.append([min(2 * self.chunk, self.max_len - 1)])
        n = MIN_BUCKET
        while self.group > 1 and n * self.group <= self.chunk and n // 2 < self.max_len - 1:
            lengths.append([min(n, self.max_len - 1)] * self.group)
            n *= 2
        model = self.model
        branches = any(moe.warm_routes(model.backend, model.config, n, n) for n in (self.n_slots, self.chunk))
        steering = steer(model) if branches else None  # kernels without branches run once, as they are
        if steering is not None:
            self.model = steering.model
        try:
            for group in lengths:
                for prompts in self._warm_prompts(steering, group):
                    slots = [self.admit(prompt.tolist(), 1) for prompt in prompts]
                    while self.pending:
                        self.prefill()
                    for slot in slots:
                        self.cancel(slot)
            self._warm_decode(steering)
        finally:
            self.model = model
        return len(lengths)

    def _warm_prompts(self, steering: Steering | None, lengths: list[int]) -> list[list[np.ndarray]]:
        """Prompts of `lengths` tokens [n] to prefill together, a set for each routing the expert kernels need
        in the program (each chunk's) that runs them; one set of zeros without `steering`."""
        zeros = [[np.zeros(n, np.int32) for n in lengths]]
        if steering is None:
            return zeros
        cfg, backend = self.model.config, self.model.backend
        if len(lengths) > 1:  # a group: one program over `group` rows of the longest one's group_len
            routes = moe.warm_routes(backend, cfg, len(lengths) * group_len(max(lengths)), sum(lengths))
            return [np.split(steering.tokens(route), np.cumsum(lengths)[:-1]) for route in routes] or zeros
        (length,) = lengths
        chunk = min(self.chunk, bucket(length))
        valid = [min(chunk, length - start) for start in range(0, length, chunk)]  # each chunk's tokens
        routes = [moe.warm_routes(backend, cfg, chunk, n) for n in valid]
        runs = max(len(r) for r in routes)
        if not runs:
            return zeros
        return [[np.concatenate([steering.tokens(r[i % len(r)]) if r else np.zeros(n, np.int32)
                                 for r, n in zip(routes, valid)])] for i in range(runs)]

    def _warm_decode(self, steering: Steering | None) -> None:
        """The decode rounds (of `steps` steps, and of one), with every slot decoding; with `steering`, once
        for each routing the expert kernels need, as the round's first step (its input tokens)."""
        cfg = self.model.config
        routes = [] if steering is None else moe.warm_routes(self.model.backend, cfg, self.n_slots, self.n_slots)
        if not routes:
            self.step()
            self.step(1)
            return
        for n in (self.steps, 1):
            generated = self.max_len
            for route in routes:
                if generated + n >= self.max_len - 1:  # every slot afresh, room for this round
                    for slot in list(self.busy):
                        self.cancel(slot)
                    for _ in range(self.n_slots):
                        self.admit([1], self.max_len - 1, stop_at_eos=False)
                    while self.pending:
                        self.prefill()
                    generated = 1
                self.state = self.state.replace(tokens=place(steering.tokens(route), self.state.tokens.sharding))
                self.step(n)
                generated += n
            for slot in list(self.busy):
                self.cancel(slot)
