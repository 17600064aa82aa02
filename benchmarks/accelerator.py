"""Decode and prefill on whatever device JAX has, against that device's own ceilings, per backend.

Run: python -m benchmarks.accelerator [--quick] [--weights none,int8,int4] [--json FILE]

A Mixtral-shaped random model (8 experts, top-2) sized to the device: about 4.7B parameters where the device
holds 40 GiB or more, 1.5B where it holds 12 GiB or more, else (a CPU, or `--quick`) a few million. For the
platform's backend and the reference (`backends/`: the kernels side by side: on a GPU cuDNN's fused
attention against XLA's, on a TPU megablox against `ragged_dot`, on a CPU the split layout against the
reference), in bfloat16 and with int8 and int4 weights (attention and experts, `quant.py`):
- decode tokens/s at batch 1, 8 and 64 (128-token prompts, `--new` tokens), and as a fraction of the limit:
  the bytes one decode step must read (`common.decode_step_bytes`) over the measured copy bandwidth of the
  device (bytes read plus written by a large array copy);
- prefill tokens/s of a 2,048-token prompt, and as a fraction of the limit: the FLOPs per prompt token
  (`common.prefill_flops_per_token`) at the measured bfloat16 matmul peak.
Prints a Markdown table (and writes JSON rows with `--json`); paste the table into RESULTS.md with the date,
commit and device. Finishes in a few minutes on one GPU; `--quick` runs in seconds on a CPU (the tests do).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks import common

GIB = 1 << 30
PRESETS = {  # (minimum device GiB, config)
    "4.7B": (40, dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128,
                      ffn_dim=5632, n_experts=8, top_k=2, max_seq_len=4096)),
    "1.5B": (12, dict(vocab_size=32000, dim=1024, n_layers=16, n_heads=8, n_kv_heads=2, head_dim=128,
                      ffn_dim=3584, n_experts=8, top_k=2, max_seq_len=4096)),
    "tiny": (0, dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                     n_experts=8, top_k=2, max_seq_len=512, quant_group=64)),
}


def device_gib() -> float:
    """Memory of the first device in GiB (0 where JAX does not say: CPUs)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 0) / GIB


def copy_bandwidth(n_bytes: int) -> float:
    """Bytes read plus written per second by a copy of an `n_bytes` array on the device."""
    x = jnp.ones(n_bytes // 2, jnp.bfloat16)
    copy = jax.jit(lambda x: x + jnp.zeros((), x.dtype))
    return 2 * n_bytes / common.median_time(lambda: copy(x).block_until_ready(), reps=7)


def matmul_peak(n: int) -> float:
    """FLOP/s of an n x n x n bfloat16 product accumulated in float32."""
    a = jnp.ones((n, n), jnp.bfloat16)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2 * n**3 / common.median_time(lambda: dot(a, a).block_until_ready(), reps=7)


def seconds(fn, reps: int) -> float:
    fn()  # compiles
    return common.median_time(fn, reps=reps, warmup=0)


FORMATS = ("none", "int8", "int4")


def run(quick: bool = False, new: int = 32, formats: tuple[str, ...] = FORMATS) -> tuple[str, list[dict]]:
    import mixtral_jax
    from mixtral_jax import backends
    from mixtral_jax.config import ModelConfig

    gib = 0.0 if quick else device_gib()
    name, (_, preset) = next((n, p) for n, p in PRESETS.items() if gib >= p[0])
    cfg = ModelConfig(**preset, dtype="bfloat16", param_dtype="bfloat16")
    batches, prompt, prefill_len, reps = ((1,), 16, 64, 1) if quick else ((1, 8, 64), 128, 2048, 3)
    bandwidth = copy_bandwidth((64 if quick else 1024) << 20)
    peak = matmul_peak(512 if quick else 8192)
    device = jax.devices()[0]
    header = (f"{device.device_kind} ({device.platform}, {gib:.0f} GiB); JAX {jax.__version__}; model {name}; "
              f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, bfloat16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    platform = mixtral_jax.init_random(cfg.replace(n_layers=1), seed=0).backend
    rows = []
    for backend in dict.fromkeys([platform, backends.Backend()]):
        for fmt in formats:
            model = mixtral_jax.init_random(cfg.replace(quantize=fmt), seed=0, backend=backend)
            row = {"backend": backend.describe(), "weights": "bfloat16" if fmt == "none" else fmt}
            for batch in batches:
                ids = [[(7 * i + b) % (cfg.vocab_size - 3) + 3 for i in range(prompt)] for b in range(batch)]
                one = seconds(lambda: model.generate(ids, 1, stop_at_eos=False), reps)
                many = seconds(lambda: model.generate(ids, new, stop_at_eos=False), reps)
                tok_s = batch * (new - 1) / max(many - one, 1e-9)
                limit = batch * bandwidth / common.decode_step_bytes(cfg, batch, prompt + new // 2, 2, 2,
                                                                      quantize=fmt)
                row[f"decode b{batch} tok/s"], row[f"decode b{batch} of limit"] = tok_s, tok_s / limit
            long = [[(11 * i) % (cfg.vocab_size - 3) + 3 for i in range(prefill_len)]]
            tok_s = prefill_len / seconds(lambda: model.generate(long, 1, stop_at_eos=False), reps)
            limit = peak / common.prefill_flops_per_token(cfg, prefill_len, all_logits=False)
            row["prefill tok/s"], row["prefill of limit"] = tok_s, tok_s / limit
            rows.append(row)
            print(json.dumps(row), flush=True)
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and small batches (CPU, tests)")
    parser.add_argument("--new", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("--weights", default="none,int8,int4",
                        help="weight formats measured: none (bfloat16), int8, int4 (default all three)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    start = time.perf_counter()
    header, rows = run(args.quick, args.new, tuple(args.weights.split(",")))
    print(header)
    print(common.table(list(rows[0]), [list(r.values()) for r in rows]))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
