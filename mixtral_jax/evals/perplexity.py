"""Perplexity against context length: the same evaluation tokens scored with a growing amount of preceding text.

Each document (BOS, then its tokens) is cut into segments of the longest context; for a context length L the
window is a segment's last L tokens, and what is averaged is the negative log-likelihood of the segment's last
`eval_tokens` tokens, so every context length predicts exactly the same tokens and only what precedes them grows.
"""

from __future__ import annotations

import math
import os
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


def segments(documents: Sequence[Sequence[int]], longest: int) -> list[list[int]]:
    """Each document's consecutive, non-overlapping `longest`-token segments (a shorter tail is left out)."""
    found = [list(doc[i: i + longest]) for doc in documents for i in range(0, len(doc) - longest + 1, longest)]
    if not found:
        most = max((len(doc) for doc in documents), default=0)
        raise MixtralError(f"no document has {longest} tokens, the longest context asked for (the longest has "
                           f"{most}): give longer --file texts or lower --contexts")
    return found


def check_contexts(contexts: Sequence[int], eval_tokens: int, max_seq_len: int) -> None:
    """Raise MixtralError unless every context fits the model and holds more than the evaluated tokens."""
    for length in contexts:
        if length > max_seq_len:
            raise MixtralError(f"context {length} is beyond the model's context of {max_seq_len} tokens")
        if length <= eval_tokens:
            raise MixtralError(f"context {length} must be longer than the {eval_tokens} evaluated tokens "
                               "(lower --eval-tokens)")


def window_nll(model: Mixtral, windows: Sequence[Sequence[int]], eval_tokens: int, batch_size: int,
               progress: Callable[[int], None] = lambda n: None) -> float:
    """The mean negative log-likelihood (nats per token) of the last `eval_tokens` tokens of each window, the
    windows (all of one length) scored `batch_size` at a time."""
    total = 0.0
    size = min(batch_size, len(windows))
    for start in range(0, len(windows), size):
        batch = list(windows[start: start + size])
        # A short last batch is padded with its first window, so every batch of a length is one program.
        logprobs = model.score_batch(batch + [batch[0]] * (size - len(batch)))[: len(batch)]
        total -= sum(float(np.sum(lp[-eval_tokens:], dtype=np.float64)) for lp in logprobs)
        progress(len(batch))
    return total / (len(windows) * eval_tokens)


def run_context(model: Mixtral, segs: Sequence[Sequence[int]], length: int, eval_tokens: int, batch_size: int,
                progress: Callable[[int], None] = lambda n: None) -> dict:
    """The record of one context length: its windows, evaluated tokens, nll and perplexity."""
    nll = window_nll(model, [seg[-length:] for seg in segs], eval_tokens, batch_size, progress)
    return dict(context=length, windows=len(segs), eval_tokens=eval_tokens, nll=nll, perplexity=math.exp(nll))


def evaluate(model: Mixtral, documents: Sequence[Sequence[int]], contexts: Sequence[int], eval_tokens: int,
             batch_size: int, output: str | os.PathLike, force: bool = False, sources: Sequence[str] = (),
             title: str = "") -> dict:
    """Every context length's record, written to OUTPUT/perplexity.json after each (a rerun skips the lengths
    already there unless `force`), then the curve OUTPUT/perplexity.png -> the results."""
    contexts = sorted(contexts)
    check_contexts(contexts, eval_tokens, model.config.max_seq_len)
    segs = segments(documents, contexts[-1])
    path = Path(output) / "perplexity.json"
    settings = dict(files=list(sources), longest_context=contexts[-1], eval_tokens=eval_tokens)
    results = store.read(path, settings, force)
    results.setdefault("contexts", [])
    done = {r["context"] for r in results["contexts"]}
    todo = [length for length in contexts if length not in done]
    with tqdm(total=len(todo) * len(segs), desc="perplexity", unit="window", disable=not todo) as bar:
        for length in todo:
            results["contexts"].append(run_context(model, segs, length, eval_tokens, batch_size, bar.update))
            results["contexts"].sort(key=lambda r: r["context"])
            store.write(path, results)
    if jax.process_index() == 0:
        plots.perplexity_curve([r["context"] for r in results["contexts"]],
                               [r["perplexity"] for r in results["contexts"]], Path(output) / "perplexity.png", title)
    return results
