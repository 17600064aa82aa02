"""mixtral-jax against transformers' `MixtralForCausalLM` on one random-weight checkpoint, in alternation.

Run: python -m benchmarks.vs_transformers [--batch 1 8] [--rounds 3] [--dtype float32] [--prompt P] [--new N]
     [--int8]

For each batch size both libraries generate greedily from P-token prompts (default 128): a 1-token call
(the prefill and first token) and an N-token call (default 64), alternating ours, theirs, ours, ...
Prefill tokens/s is batch x P / t(1 token); decode tokens/s is batch x (N - 1) / (t(N) - t(1)). Compile is
our first 1-token plus first N-token call minus the steady ones (JAX compiles prefill and decode loop there).
Limits: decode at measured read bandwidth / bytes one step must read (`common.decode_step_bytes`),
prefill at measured matmul peak / FLOPs per prompt token (`common.prefill_flops_per_token`).
Torch gets as many threads as XLA:CPU uses (one per core). `--int8` quantises our attention and
expert weights as they load (`load(..., quantize="int8")`; transformers keeps `--dtype`), and the limits
count those at one byte.
"""

from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

from benchmarks import common


def bench_batch(ours, theirs, batch: int, rounds: int, prompt: int, new: int) -> dict[str, float]:
    import torch

    ids = np.random.default_rng(batch).integers(3, ours.config.vocab_size, (batch, prompt))
    prompts = ids.tolist()
    x = torch.tensor(ids)

    def hf(n: int):
        with torch.inference_mode():
            return theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)

    start = time.perf_counter()
    ours.generate(prompts, 1, stop_at_eos=False)
    ours.generate(prompts, new, stop_at_eos=False)
    first = time.perf_counter() - start
    fns = {
        "ours_1": lambda: ours.generate(prompts, 1, stop_at_eos=False),
        "theirs_1": lambda: hf(1),
        "ours_n": lambda: ours.generate(prompts, new, stop_at_eos=False),
        "theirs_n": lambda: hf(new),
    }
    t = common.alternate(fns, rounds=rounds, warmup=0)
    out = {"compile_s": first - t["ours_1"] - t["ours_n"]}
    for who in ("ours", "theirs"):
        out[f"{who}_prefill"] = batch * prompt / t[f"{who}_1"]
        out[f"{who}_decode"] = batch * (new - 1) / (t[f"{who}_n"] - t[f"{who}_1"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt", type=int, default=common.PROMPT, help="prompt tokens")
    parser.add_argument("--new", type=int, default=common.NEW, help="new tokens")
    parser.add_argument("--int8", action="store_true", help="our attention and expert weights in int8")
    args = parser.parse_args()

    import torch
    from transformers import MixtralForCausalLM

    import mixtral_jax

    torch.set_num_threads(os.cpu_count())
    folder = common.make_checkpoint()
    ours = mixtral_jax.load(folder, dtype=args.dtype, quantize="int8" if args.int8 else None)
    theirs = MixtralForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    bandwidth = common.memory_bandwidth()["read"]
    peak = common.matmul_peak(dtype=args.dtype)
    cfg = ours.config
    weight_bytes = jnp.dtype(args.dtype).itemsize
    print(common.machine(), "|", ours.backend.describe())
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s")
    rows = []
    for batch in args.batch:
        r = bench_batch(ours, theirs, batch, args.rounds, args.prompt, args.new)
        step_bytes = common.decode_step_bytes(cfg, batch, args.prompt + args.new // 2, weight_bytes, weight_bytes,
                                              quantize="int8" if args.int8 else "none")
        decode_limit = batch * bandwidth / step_bytes
        prefill_limit = peak / common.prefill_flops_per_token(cfg, args.prompt, all_logits=False)
        rows.append([
            batch, r["ours_prefill"], r["theirs_prefill"], r["ours_prefill"] / r["theirs_prefill"],
            r["ours_prefill"] / prefill_limit, r["ours_decode"], r["theirs_decode"],
            r["ours_decode"] / r["theirs_decode"], f"{step_bytes / 1e6:.0f} MB",
            r["ours_decode"] / decode_limit, r["compile_s"],
        ])
        print(rows[-1], flush=True)
    print(common.table(
        ["batch", "prefill tok/s ours", "transformers", "x", "of peak", "decode tok/s ours", "transformers",
         "x", "bytes/step", "of bandwidth", "compile s"], rows))


if __name__ == "__main__":
    main()
