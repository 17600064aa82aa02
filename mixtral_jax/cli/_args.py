"""Argument types of the commands: each refuses, at parse time, a value no command could use.

argparse turns an `ArgumentTypeError` into one usage-error line (`argument --steps: must be ...`) and exit 2,
so a bad option never reaches a load or a compile.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

SEED_LIMIT = 2**32  # a PRNG seed is 32 bits (jax.random.key keeps the low 32 bits of larger ints)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(parse: Callable[[str], float], low: float, above: bool = False) -> Callable[[str], float]:
    """A type that parses with `parse` and refuses values below `low` (or at it too, when `above`)."""

    def convert(text: str) -> float:
        value = parse(text)
        if value < low or above and value == low:
            raise argparse.ArgumentTypeError(f"must be {'greater than' if above else 'at least'} {low:g}, got {text}")
        return value

    return convert


positive_int = _bounded(_int, 1)
non_negative_int = _bounded(_int, 0)
positive_float = _bounded(_float, 0, above=True)
non_negative_float = _bounded(_float, 0)


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, {SEED_LIMIT - 1}], got {text}")
    return value


def probability(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def path(text: str) -> str:
    """A file or folder name: never empty (an empty --checkpoint must not mean "the default")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text
