"""Passkey retrieval (Mohtashami and Jaggi, 2023): a random 5-digit key stated once inside repeated filler text,
at a chosen fraction of the prompt's depth, then asked for; the greedy answer's first number is compared.

A prompt is assembled from token ids (the instruction, filler, the key's sentence, filler, the question), so its
length is exact in the model's own tokenizer: every prompt of one length is as long as the others, and they all
run through one compiled program.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from tqdm import tqdm

from mixtral_jax.errors import MixtralError
from mixtral_jax.evals import plots, store

if TYPE_CHECKING:
    from mixtral_jax.api import Mixtral
    from mixtral_jax.tokenizer import Tokenizer

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # a 5-digit key takes at most 6 pieces (a space and a piece a digit) in Mixtral's vocabulary


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]
    key: int
    depth: float
    needle_at: int  # the index of the key sentence's first token in `ids`


def depths(n: int) -> list[float]:
    """`n` depths spread evenly from the start (0) to the end (1) of the filler; one is the middle."""
    return [0.5] if n == 1 else [round(float(d), 4) for d in np.linspace(0.0, 1.0, n)]


def prompt_length(length: int, max_seq_len: int) -> int:
    """The prompt tokens of a `length`-token test: `length`, less what the answer needs at the context's end."""
    if length > max_seq_len:
        raise MixtralError(f"length {length} is beyond the model's context of {max_seq_len} tokens")
    return min(length, max_seq_len - ANSWER_TOKENS)


def make_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int) -> Prompt:
    """A prompt of exactly `length` tokens (BOS included) whose key sentence starts `depth` of the way through
    the filler, at the nearest boundary between filler repeats (depth 1: right before the question)."""
    head = tokenizer.encode(INSTRUCTION)
    needle = _pieces(tokenizer, NEEDLE.format(key=key))
    tail = _pieces(tokenizer, QUESTION)
    unit = _pieces(tokenizer, FILLER)
    room = length - len(head) - len(needle) - len(tail)
    if room < len(unit):
        raise MixtralError(f"length {length} is too short for a passkey prompt (it needs at least "
                           f"{length - room + len(unit)} tokens)")
    filler = (unit * (room // len(unit) + 1))[:room]
    at = room if depth >= 1 else min(round(depth * room / len(unit)), room // len(unit)) * len(unit)
    ids = head + filler[:at] + needle + filler[at:] + tail
    return Prompt(ids, key, depth, len(head) + at)


def _pieces(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, bos=False)


def keys(seed: int, length: int, n: int) -> list[int]:
    """`n` random 5-digit keys for the tests of `length`: the same for a seed whatever else runs."""
    return [int(k) for k in np.random.default_rng([seed, length]).integers(10_000, 100_000, n)]


def answer_key(answer: str) -> int | None:
    """The first number in an answer, None where it holds none."""
    match = re.search(r"\d+", answer)
    return int(match[0]) if match else None


def run_length(model: Mixtral, tokenizer: Tokenizer, length: int, n_depths: int, trials: int, seed: int,
               batch_size: int, progress: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Every trial of one length (`n_depths` depths x `trials` keys), answered greedily `batch_size` prompts at
    a time -> a record per trial: length, depth, key, answer, correct."""
    n_prompt = prompt_length(length, model.config.max_seq_len)
    prompts = [make_prompt(tokenizer, n_prompt, depth, key)
               for depth in depths(n_depths) for key in keys(seed, length, trials)]
    records = []
    size = min(batch_size, len(prompts))
    for start in range(0, len(prompts), size):
        batch = prompts[start: start + size]
        # Rows of one batch are all as long: padding the last batch keeps its program the same.
        rows = [p.ids for p in batch] + [batch[0].ids] * (size - len(batch))
        answers = model.generate(rows, ANSWER_TOKENS, temperature=0.0)
        for p, new in zip(batch, answers):
            text = tokenizer.decode(new)
            records.append(dict(length=length, depth=p.depth, key=p.key, answer=text,
                                correct=answer_key(text) == p.key))
        progress(len(batch))
    return records


def accuracy(records: Sequence[dict]) -> dict[tuple[int, float], float]:
    """(length, depth) -> the fraction of its trials answered correctly."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for r in records:
        cells.setdefault((r["length"], r["depth"]), []).append(bool(r["correct"]))
    return {cell: sum(hits) / len(hits) for cell, hits in sorted(cells.items())}


def evaluate(model: Mixtral, tokenizer: Tokenizer, lengths: Sequence[int], n_depths: int, trials: int, seed: int,
             batch_size: int, output: str | os.PathLike, force: bool = False, title: str = "") -> dict:
    """Every length's trials, written to OUTPUT/passkey.json after each length (a rerun skips the lengths
    already there unless `force`), then the heat map OUTPUT/passkey.png -> the results."""
    for length in lengths:  # every length checked before the first is run
        make_prompt(tokenizer, prompt_length(length, model.config.max_seq_len), 0.0, 10_000)
    path = Path(output) / "passkey.json"
    settings = dict(depths=n_depths, trials=trials, seed=seed, answer_tokens=ANSWER_TOKENS)
    results = store.read(path, settings, force)
    results.setdefault("trials", [])
    done = {r["length"] for r in results["trials"]}
    todo = [length for length in lengths if length not in done]
    with tqdm(total=len(todo) * n_depths * trials, desc="passkey", unit="prompt", disable=not todo) as bar:
        for length in todo:
            results["trials"] += run_length(model, tokenizer, length, n_depths, trials, seed, batch_size, bar.update)
            store.write(path, results)
    if jax.process_index() == 0:
        plots.passkey_heatmap(accuracy(results["trials"]), Path(output) / "passkey.png", title)
    return results
