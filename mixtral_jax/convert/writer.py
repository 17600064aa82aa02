"""Convert a published checkpoint folder into a model folder, streaming one tensor at a time.

Each source tensor is read into memory on its own (nothing stays memory-mapped), transformed by its
mapping rule, cast, and written into its slice of the stacked Orbax array; tensors larger than
`BLOCK_BYTES` whose transform allows it (`mapping.ROW_AXIS`) go in blocks of rows. Peak memory is a few
blocks, or the largest tensor that must be whole, beyond the libraries, whatever the model's size.
Each block is checked for NaN and inf as it is read. With `quantize`, each (layer) or (layer, expert) slice
of a quantised weight (the embedding table or LM head: the whole tensor) is read whole, quantised
(`quant.quantize_slice`, as a quantising load does) and written with its scales. The output appears only
when complete (`outputs.staging`): a refused tensor leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
from flax import nnx
from tqdm import tqdm

from mixtral_jax import checkpoint, model, outputs, quant
from mixtral_jax.config import ModelConfig
from mixtral_jax.convert import mapping
from mixtral_jax.convert.sources import open_source
from mixtral_jax.errors import CheckpointError

BLOCK_BYTES = 32 << 20


def convert(source: str | os.PathLike, output: str | os.PathLike, dtype: str | None = None,
            force: bool = False, progress: bool = True, allow_non_finite: bool = False,
            quantize: str | None = None, quant_group: int | None = None, quantize_vocab: bool = False) -> Path:
    """Convert the checkpoint folder `source` into the model folder `output` (stored in `dtype`, None:
    the source's; its large matrices in `quantize`'s format, `int8` or `int4` in groups of `quant_group`,
    and with `quantize_vocab` its embedding table and LM head too, `quant.py`). Every tensor is checked
    against the config before anything is written, and its values as they are read: a NaN or inf refuses the
    conversion unless `allow_non_finite`."""
    if checkpoint.is_checkpoint(source):
        raise CheckpointError(f"{source}: already a converted model folder; load it with mixtral_jax.load")
    src = open_source(source)
    src.check()
    cfg = src.config.with_dtype(dtype)
    if quantize not in (None, "none") or quantize_vocab:
        cfg = quant.quantized_config(cfg, quantize, quant_group, source, quantize_vocab)
    rules = mapping.rules_for(src.naming, cfg)
    abstract = nnx.to_pure_dict(model.abstract(cfg)[1])
    specs = {}
    for rule in rules:
        paths = [rule.target] + ([quant.scale_path(rule.target)] if quant.is_quantized(cfg, rule.target) else [])
        for path in paths:
            leaf = _get(abstract, path)
            specs[path] = checkpoint.ArraySpec(tuple(leaf.shape), np.dtype(leaf.dtype), rule.stacked_axes)
    steps = list(plan(rules, cfg))
    total = sum(src.nbytes(name) for _, name, _ in steps)
    with outputs.staging(output, "model", force, sources=[source]) as tmp, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", disable=not progress
    ) as bar, checkpoint.ArrayWriter(tmp, specs) as writer:
        for i, (rule, name, index) in enumerate(steps):
            quantized = quant.is_quantized(cfg, rule.target)
            pieces = [(slice(None), index)] if quantized else blocks(
                rule, src.shape(name), src.nbytes(name), writer.chunks(rule.target), index)
            for rows, region in pieces:
                block = src.read(name, rows)
                if not allow_non_finite:
                    mapping.check_finite(block, src, name, "pass --allow-non-finite to convert it anyway")
                block = rule.transform(block, cfg)
                if quantized:
                    block, scale = quant.quantize_slice(cfg, rule.target, block)
                    writer.write(quant.scale_path(rule.target), region, scale)
                writer.write(rule.target, region, block)
            bar.update(src.nbytes(name))
            bar.set_postfix_str(f"{i + 1}/{len(steps)} tensors", refresh=False)
        writer.close()
        checkpoint.finish(tmp, cfg, src.tokenizer)
    return Path(output)


def plan(rules: tuple[mapping.Rule, ...], cfg: ModelConfig) -> Iterator[tuple[mapping.Rule, str, tuple[int, ...]]]:
    """(rule, source tensor, index into the target) in writing order: unstacked tensors, then layer by layer."""
    for rule in rules:
        if rule.stacked_axes == 0:
            yield rule, rule.source, ()
    for layer in range(cfg.n_layers):
        for rule in rules:
            if rule.stacked_axes == 1:
                yield rule, rule.source.format(layer=layer), (layer,)
            elif rule.stacked_axes == 2:
                for e in range(cfg.n_experts):
                    yield rule, rule.source.format(layer=layer, expert=e), (layer, e)


def blocks(rule: mapping.Rule, shape: tuple[int, ...], nbytes: int, chunks: tuple[int, ...],
           index: tuple[int, ...]) -> Iterator[tuple[slice, tuple[int | slice, ...]]]:
    """(source rows, target region) pieces of one tensor: whole when small or when its transform needs
    it whole, else blocks of about `BLOCK_BYTES` of source rows that cover whole storage chunks."""
    axis = mapping.ROW_AXIS.get(rule.transform)
    if axis is None or nbytes <= BLOCK_BYTES or len(shape) != 2:
        yield slice(None), index
        return
    chunk, row_bytes = chunks[len(index) + axis], nbytes // shape[0]
    step = chunk * max(1, BLOCK_BYTES // (chunk * row_bytes))
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        yield rows, index + (slice(None),) * axis + (rows,)


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree
