"""Text files -> one token stream -> fixed `[B, L + 1]` batches, a pure function of seed and position.

Each file becomes `BOS ids EOS`; the files are concatenated in the order given. The stream is cut into
windows of `L + 1` tokens that overlap by one (window i starts at token i * L), and each epoch visits them in
a permutation drawn from `(seed, epoch)`. Batch number p holds windows p*B .. p*B + B - 1 of that endless
sequence, so a run that restores its position continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from mixtral_jax.errors import DataError


class TextTokenizer(Protocol):
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


def tokenize_files(paths: Sequence[str | os.PathLike], tokenizer: TextTokenizer) -> np.ndarray:
    """The int32 token stream of text files, each wrapped in BOS ... EOS."""
    if not paths:
        raise DataError("no data files given")
    pieces = []
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        pieces.append(np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int32))
    return np.concatenate(pieces)


class Batches:
    """Deterministic batches of `batch_size` windows of `seq_len + 1` tokens from a token stream."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the data has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self._epoch: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> float:
        return self.n_windows / self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._epoch[1]

    def batch(self, position: int) -> np.ndarray:
        """Batch number `position` (0-based): int32 [B, L + 1]."""
        rows = []
        for index in range(position * self.batch_size, (position + 1) * self.batch_size):
            epoch, within = divmod(index, self.n_windows)
            start = int(self._order(epoch)[within]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        return np.stack(rows)
