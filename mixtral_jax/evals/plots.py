"""The pictures of the evaluations: the passkey accuracy heat map and the perplexity curve (matplotlib, the
`eval` extra), written as small PNGs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mixtral_jax.evals.store import need
from mixtral_jax.outputs import replace_atomically


def _pyplot():
    need("matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or opened
    import matplotlib.pyplot as plt

    return plt


def passkey_heatmap(accuracy: dict[tuple[int, float], float], path: str | os.PathLike, title: str) -> Path:
    """A length x depth grid of accuracy (green 100%, red 0%), each cell labelled with its percentage."""
    plt = _pyplot()
    lengths = sorted({length for length, _ in accuracy})
    depths = sorted({depth for _, depth in accuracy})
    grid = [[accuracy.get((length, depth), float("nan")) for length in lengths] for depth in depths]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(lengths), 1.0 + 0.45 * len(depths)), dpi=80)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the key")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, plt, path)


def perplexity_curve(contexts: Sequence[int], perplexities: Sequence[float], path: str | os.PathLike,
                     title: str) -> Path:
    """Perplexity against context length, the length axis log-scaled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=80)
    ax.plot(contexts, perplexities, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(contexts), [_tokens(n) for n in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _save(fig, plt, path: str | os.PathLike) -> Path:
    path = Path(path)
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
