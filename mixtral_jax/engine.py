"""Decode slots that requests share: each prompt is prefilled into a free slot and joins the running batch,
which decodes a few steps per host round trip; a slot is free again once its request ends (EOS, its token
limit, or a cancel).

Legend: B slots, S cache positions, T padded prompt length, C prefill chunk, V vocab, n steps per round.

Every slot has its own position, token limit, sampling settings and PRNG key (its i-th token is drawn with
`fold_in(key(seed), i)`), so what a request produces does not depend on what else is running. The programs
take the slot count, the cache length, the prompt bucket and the chunk as static values: a server that
compiles them for its buckets at start-up never compiles again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.backends import Backend
from mixtral_jax.cache import KVCache
from mixtral_jax.config import ModelConfig
from mixtral_jax.distributed import fetch
from mixtral_jax.errors import MixtralError
from mixtral_jax.generate import (
    bucket,
    cache_slots,
    check_prompts,
    default_chunk,
    fill_cache,
    prefill_chunk,
    replicated,
)
from mixtral_jax.layers import Mode
from mixtral_jax.sampling import RowSettings, check_settings, sample_rows

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral


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


def _empty(*, backend: Backend, cfg: ModelConfig, slots: int, max_len: int, cache_chunk: int) -> Slots:
    zeros = jnp.zeros((slots,), jnp.int32)
    return Slots(
        cache=KVCache.create(cfg, backend, slots, max_len, chunk=cache_chunk), tokens=zeros, positions=zeros,
        generated=zeros, limit=zeros, eos=zeros - 1, done=jnp.ones((slots,), bool),
        keys=jax.random.split(jax.random.key(0), slots),
        settings=RowSettings(jnp.zeros((slots,), jnp.float32), zeros, jnp.ones((slots,), jnp.float32)))


def _admit(graphdef: nnx.GraphDef, params: nnx.State, state: Slots, tokens: jax.Array, length: jax.Array,
           at: jax.Array, limit: jax.Array, eos: jax.Array, key: jax.Array, settings: RowSettings, *,
           backend: Backend, cfg: ModelConfig, chunk: int, cache_chunk: int,
           n_valid: int | None) -> tuple[Slots, jax.Array]:
    """The prompt tokens [1, T] (right-padded to `length`) prefilled into slot `at`, and its first new token."""
    row = KVCache.create(cfg, backend, 1, state.cache.slots, chunk=cache_chunk)
    row, last = fill_cache(graphdef, params, tokens, length, row, backend=backend, cfg=cfg, chunk=chunk)
    first = sample_rows(jax.random.fold_in(key, 0)[None], last, settings, n_valid)[0]
    cache = KVCache(kv=backend.insert_rows(state.cache.kv, row.kv, at),
                    pos=jax.lax.dynamic_update_slice_in_dim(state.cache.pos, row.pos, at, 0))

    def put(field: jax.Array, value: jax.Array) -> jax.Array:
        return field.at[at].set(value)

    state = state.replace(
        cache=cache, tokens=put(state.tokens, first), positions=put(state.positions, length[0]),
        generated=put(state.generated, 1), limit=put(state.limit, limit), eos=put(state.eos, eos),
        done=put(state.done, (first == eos) | (limit <= 1)), keys=put(state.keys, key),
        settings=jax.tree.map(lambda field, value: field.at[at].set(value[0]), state.settings, settings))
    return state, first


def _decode(graphdef: nnx.GraphDef, params: nnx.State, state: Slots, *, backend: Backend, n: int,
            n_valid: int | None) -> tuple[Slots, jax.Array]:
    """`n` decode steps over every slot -> the state and the new tokens [n, B] (-1 where a slot is done)."""

    def step(s: Slots, _) -> tuple[Slots, jax.Array]:
        positions = jnp.where(s.done, -1, s.positions)  # done slots write nothing to the cache
        out = nnx.merge(graphdef, params)(s.tokens[:, None], positions[:, None], Mode.DECODE, backend, s.cache)
        keys = jax.vmap(jax.random.fold_in)(s.keys, s.generated)
        new = jnp.where(s.done, -1, sample_rows(keys, out.logits[:, 0], s.settings, n_valid))
        running = ~s.done
        generated = s.generated + running
        return s.replace(
            cache=out.cache, tokens=jnp.where(running, new, s.tokens), positions=s.positions + running,
            generated=generated, done=s.done | (new == s.eos) | (generated >= s.limit)), new

    return jax.lax.scan(step, state, None, length=n)


def _cancel(state: Slots, at: jax.Array) -> Slots:
    return state.replace(done=state.done.at[at].set(True))


class Programs(NamedTuple):
    empty: Callable[..., Slots]
    admit: Callable[..., tuple[Slots, jax.Array]]
    decode: Callable[..., tuple[Slots, jax.Array]]
    cancel: Callable[..., Slots]


@functools.cache
def _programs(options: tuple[tuple[str, Any], ...]) -> Programs:
    options = dict(options) or None
    return Programs(
        empty=jax.jit(_empty, static_argnames=("backend", "cfg", "slots", "max_len", "cache_chunk"),
                      compiler_options=options),
        admit=jax.jit(_admit, static_argnames=("graphdef", "backend", "cfg", "chunk", "cache_chunk", "n_valid"),
                      donate_argnames="state", compiler_options=options),
        decode=jax.jit(_decode, static_argnames=("graphdef", "backend", "n", "n_valid"), donate_argnames="state",
                       compiler_options=options),
        cancel=jax.jit(_cancel, donate_argnames="state"),
    )


class Engine:
    """`slots` decode slots of `max_len` positions each over `model`'s mesh.

    `admit` prefills a prompt into a free slot and returns its slot and first token; `step` runs `steps`
    decode steps over every slot and returns the new tokens [steps, slots] (-1 where a slot produced none);
    `finished` says which slots ended (EOS or limit) and frees them; `cancel` ends a slot at once."""

    def __init__(self, model: Mixtral, slots: int = 8, max_len: int | None = None, steps: int = 4):
        cfg = model.config
        if slots < 1 or steps < 1:
            raise MixtralError(f"slots and steps must be >= 1, got {slots} and {steps}")
        self.model, self.steps, self.n_slots = model, steps, slots
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.cache_chunk = default_chunk(cfg, 1)
        tokenizer = model.tokenizer
        self.n_valid = None if tokenizer is None or tokenizer.vocab_size >= cfg.vocab_size else tokenizer.vocab_size
        self.eos = tokenizer.eos_id if tokenizer is not None else cfg.eos_id
        self.busy: set[int] = set()  # slots running a request
        with model.context():
            self.state = self._programs.empty(backend=model.backend, cfg=cfg, slots=slots,
                                              max_len=cache_slots(cfg, self.max_len), cache_chunk=self.cache_chunk)

    @property
    def _programs(self) -> Programs:
        return _programs(self.model.backend.compiler_options)

    def free(self) -> list[int]:
        return [i for i in range(self.n_slots) if i not in self.busy]

    def admit(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
              top_p: float | None = None, seed: int = 0, stop_at_eos: bool = True) -> tuple[int, int]:
        """Prefill `prompt` into a free slot -> (slot, first new token)."""
        model, cfg = self.model, self.model.config
        check_prompts([prompt], cfg.vocab_size, self.max_len, max_new_tokens)
        check_settings(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise MixtralError("max_new_tokens must be >= 1 for a slot")
        free = self.free()
        if not free:
            raise MixtralError(f"all {self.n_slots} slots are busy")
        at = free[0]
        chunk = prefill_chunk(None, cfg, 1, len(prompt))
        tokens = np.zeros((1, bucket(len(prompt), chunk)), np.int32)
        tokens[0, : len(prompt)] = prompt
        settings = RowSettings(np.float32([temperature]), np.int32([top_k or 0]), np.float32([top_p or 1.0]))
        args = replicated(model, (tokens, np.int32([len(prompt)]), np.int32(at), np.int32(max_new_tokens),
                                   np.int32(self.eos if stop_at_eos else -1), jax.random.key(seed), settings))
        with model.context():
            self.state, first = self._programs.admit(
                model.graphdef, model.params, self.state, *args, backend=model.backend, cfg=cfg, chunk=chunk,
                cache_chunk=self.cache_chunk, n_valid=self.n_valid)
        self.busy.add(at)
        return at, int(fetch(first))

    def compile_all(self) -> int:
        """Compile the prefill of every prompt bucket, the decode round and the cancel, by running each once in
        a free slot (after this, requests never compile) -> the number of prompt buckets."""
        lengths, n = [], 1
        while n < self.max_len:
            lengths.append(min(bucket(n), self.max_len - 1))
            n = bucket(n) + 1
        for n in lengths:
            slot, _ = self.admit([0] * n, 1)
            self.cancel(slot)
        self.step()
        return len(lengths)

    def step(self) -> np.ndarray:
        """`steps` decode steps over every slot -> the new tokens [steps, slots], -1 where none."""
        model = self.model
        with model.context():
            self.state, new = self._programs.decode(model.graphdef, model.params, self.state, backend=model.backend,
                                                    n=self.steps, n_valid=self.n_valid)
        return fetch(new)

    def finished(self) -> list[int]:
        """The busy slots whose request ended (EOS or its limit); they are free from now on."""
        done = fetch(self.state.done)
        ended = [i for i in self.busy if done[i]]
        self.busy.difference_update(ended)
        return ended

    def cancel(self, slot: int) -> None:
        """End the request in `slot` now and free it."""
        model = self.model
        with model.context():
            self.state = self._programs.cancel(self.state, replicated(model, np.int32(slot)))
        self.busy.discard(slot)
