"""Conversion throughput and peak memory: a synthetic float32 Hugging Face checkpoint -> bfloat16 model folder.

    python benchmarks/convert_bench.py [--layers 4] [--shards 5] [--dir SCRATCH]

Writes a random-weight Mixtral-shaped checkpoint (hidden 1024, FFN 3584, 8 experts, vocab 32000; 4 layers
are 1.7 GB in float32) in `--shards` safetensors files, converts it in a fresh process through the command's entry point
(`mixtral-jax convert SOURCE OUTPUT --dtype bfloat16`), and reports GB/s (source bytes per second, with and
without the start-up's imports) and the process's peak resident memory against the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import save_file

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)


def hf_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Mixtral checkpoint with its shape, in file order."""
    d, f, v, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_local_experts"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "block_sparse_moe.gate.weight": (e, d)}
        for x in range(e):
            shapes |= {p + f"block_sparse_moe.experts.{x}.w1.weight": (f, d),
                       p + f"block_sparse_moe.experts.{x}.w3.weight": (f, d),
                       p + f"block_sparse_moe.experts.{x}.w2.weight": (d, f)}
    return shapes | {"model.norm.weight": (d,), "lm_head.weight": (v, d)}


def write_synthetic_hf(folder: Path, layers: int, shards: int, seed: int = 0, **shape: int) -> int:
    """A random float32 checkpoint in `shards` safetensors files plus index (`shape` overrides `SHAPE`);
    returns its size in bytes."""
    cfg = {"model_type": "mixtral", "num_hidden_layers": layers, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "max_position_embeddings": 4096, "dtype": "float32", **SHAPE, **shape}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    shapes = hf_tensor_shapes(cfg)
    total = sum(4 * int(np.prod(s)) for s in shapes.values())
    rng, weight_map, shard, size, n = np.random.default_rng(seed), {}, {}, 0, 0
    for i, (name, shape) in enumerate(shapes.items()):
        shard[name] = rng.standard_normal(shape, dtype=np.float32) * 0.02
        size += shard[name].nbytes
        if size >= total * (n + 1) / shards or i == len(shapes) - 1:
            file = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
            save_file(shard, folder / file)
            weight_map |= dict.fromkeys(shard, file)
            shard, n = {}, n + 1
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


CHILD = """
import re, sys, time
start = time.perf_counter()
from mixtral_jax.cli import main
from mixtral_jax.convert import writer  # imported by the command; here, to time start-up apart
ready, cpu = time.perf_counter(), time.process_time()
if sys.argv[1] != "-":
    main(["convert", sys.argv[1], sys.argv[2], "--dtype", sys.argv[3]])
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
print(ready - start, time.perf_counter() - ready, time.process_time() - cpu, peak)
"""


class Run(NamedTuple):
    start: float  # seconds importing
    seconds: float  # seconds converting (wall clock)
    cpu: float  # CPU seconds converting, all threads
    peak: int  # peak resident bytes (the child's own VmHWM; ru_maxrss would mix in the parent's)


def convert_in_subprocess(source: Path | str, output: Path | str = "", dtype: str = "bfloat16") -> Run:
    """A fresh process converting `source` (`"-"`: importing only), measured."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(source), str(output), dtype], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    start, seconds, cpu, peak = out.stdout.splitlines()[-1].split()
    return Run(float(start), float(seconds), float(cpu), int(peak))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix="convert_bench_"))
    try:
        size = write_synthetic_hf(scratch / "hf", args.layers, args.shards)
        base = convert_in_subprocess("-").peak
        run = convert_in_subprocess(scratch / "hf", scratch / "out")
        stored = sum(p.stat().st_size for p in (scratch / "out").rglob("*") if p.is_file())
        print(f"checkpoint      {size / 1e9:.2f} GB float32 in {args.shards} shards ({args.layers} layers)")
        print(f"converted in    {run.seconds:.1f} s  ->  {size / run.seconds / 1e9:.2f} GB/s of source "
              f"(+{run.start:.1f} s start-up: {size / (run.start + run.seconds) / 1e9:.2f} GB/s end to end)")
        print(f"CPU time        {run.cpu:.1f} s  ->  {size / run.cpu / 1e9:.2f} GB of source per CPU-second")
        print(f"peak RSS        {run.peak / 1e9:.2f} GB  =  {run.peak / size:.0%} of the checkpoint "
              f"({base / 1e9:.2f} GB of it is the imported libraries)")
        print(f"output          {stored / 1e9:.2f} GB bfloat16 (zstd)")
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
