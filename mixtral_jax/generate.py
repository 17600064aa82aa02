"""Generation of a batch of prompts on the decode slots (`engine.Engine`): one batched prefill into a slot per
prompt, then the compiled decode loop, run to the end (`generate`) or a few steps at a time (`stream`).

The batch is rounded up to a power of two and to a multiple of the mesh's batch axes, and the prompt, cache
and step counts to buckets (`prefill.bucket`), so a new prompt or `max_new_tokens` recompiles only when it
crosses a bucket. Row i samples with `fold_in(key(seed), i)`, so a prompt gets the same tokens whatever
else is in its batch, and in the server with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from mixtral_jax.engine import Engine
from mixtral_jax.prefill import bucket, check_prompts, pow2, prefill_chunk, round_up

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral


def engine_for(model: Mixtral, prompts: Sequence[Sequence[int]], max_new_tokens: int, chunk: int | None = None,
               steps: int = 4) -> Engine:
    """An engine with a slot for each prompt, rounded up to a power of two and to the mesh's batch, and room
    for the longest prompt and `max_new_tokens`."""
    cfg = model.config
    check_prompts(prompts, cfg.vocab_size, cfg.max_seq_len, max_new_tokens)
    mesh_batch = 1 if model.mesh is None else model.mesh.shape["data"] * model.mesh.shape["fsdp"]
    rows = round_up(pow2(len(prompts)), mesh_batch)
    longest = max(len(p) for p in prompts)
    return Engine(model, slots=rows, max_len=longest + max_new_tokens, steps=steps,
                  chunk=prefill_chunk(chunk, cfg, rows // mesh_batch, longest))


def generate(model: Mixtral, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_at_eos: bool = True,
             chunk: int | None = None) -> list[list[int]]:
    """The new ids of each prompt (ending with EOS where a row stopped on it); see `Mixtral.generate`."""
    engine = engine_for(model, prompts, max_new_tokens, chunk)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    first = engine.start(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
    rows = [[int(t)] for t in first.ids[: len(prompts)]]
    if max_new_tokens > 1:
        new = engine.step(bucket(max_new_tokens - 1)).ids  # [n, slots]; stops early once every row is done
        for i, row in enumerate(rows):
            row += [int(t) for t in new[:, i] if t >= 0]
    return rows


def stream(model: Mixtral, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_at_eos: bool = True,
           chunk: int | None = None, segment: int = 4) -> Iterator[list[int | None]]:
    """Yields each step's new id per prompt (None for a finished row) as the compiled loop produces
    them, running it `segment` steps at a time; the tokens equal `generate`'s for the same arguments."""
    engine = engine_for(model, prompts, max_new_tokens, chunk, steps=segment)
    if max_new_tokens == 0:
        return
    first = engine.start(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
    yield [int(t) for t in first.ids[: len(prompts)]]
    emitted = 1
    while emitted < max_new_tokens:
        new = engine.step().ids[:, : len(prompts)]
        for ids in new:
            if (ids < 0).all():  # every row is done
                return
            yield [int(t) if t >= 0 else None for t in ids]
            emitted += 1
