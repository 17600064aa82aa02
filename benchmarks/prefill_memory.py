"""Prefill memory against prompt length: the chunked prefill over the KV cache grows linearly.

A small Mixtral (the `tiny` preset with `max_seq_len` 32768, float32, batch 1) prefills prompts of about 1k,
8k and 32k tokens (1000, 8000 and 32000, with room for 24 new tokens: 1024, 8192 and 32768 cache slots),
exactly as `Mixtral.generate` lays them out. For each length it reports

- XLA's memory analysis of the compiled prefill: temporaries, and arguments + outputs (weights, prompt,
  KV cache) - with the default chunks (`prefill.default_chunk`: 2048 tokens at batch 1), and for contrast
  in one chunk (the whole prompt at once), compiled only, never run;
- the peak resident memory added by running the chunked prefill, in a fresh process per length (Linux
  VmHWM, reset after compilation through /proc/self/clear_refs).

Run from the repository root: `python -m benchmarks.prefill_memory` (add `--no-run` for the compiled
figures only). Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

LENGTHS = (1000, 8000, 32000)
NEW_TOKENS = 24
MIB = 2**20


def _setup(length: int, one_chunk: bool = False):
    """The model, and the prefill `generate` runs for a `length`-token prompt (`Engine.start`), lowered, with
    its arguments."""
    import mixtral_jax
    from mixtral_jax import generate as gen
    from mixtral_jax.prefill import bucket

    cfg = mixtral_jax.preset("tiny").replace(max_seq_len=32768)
    model = mixtral_jax.init_random(cfg, dtype="float32")
    prompt = [1] + [(7 * i) % 31990 + 3 for i in range(length - 1)]
    engine = gen.engine_for(model, [prompt], NEW_TOKENS, chunk=bucket(length) if one_chunk else None)
    lowered, args = engine.lower_start([prompt], NEW_TOKENS)
    return model, engine, lowered, args


def compiled_bytes(length: int, one_chunk: bool = False) -> dict:
    """XLA's memory analysis of the prefill for a `length`-token prompt (compiled, not run)."""
    _, engine, lowered, args = _setup(length, one_chunk)
    m = lowered.compile().memory_analysis()
    return {"slots": engine.cache_len, "chunk": args[0].shape[1] if one_chunk else engine.chunk,
            "temp": m.temp_size_in_bytes,
            "args_outputs": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes}


def measured_rss(length: int) -> dict:
    """Run the chunked prefill once compiled; the peak RSS it adds and its time (this process)."""
    import jax

    model, _, lowered, args = _setup(length)
    with model.context():
        compiled = lowered.compile()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current RSS
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        jax.block_until_ready(compiled(model.params, *args)[0].cache)
        seconds = time.perf_counter() - start
    return {"rss_added": (_status_kib("VmHWM") - before) * 1024, "seconds": seconds}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--no-run", action="store_true", help="compiled figures only")
    parser.add_argument("--rss", type=int, help=argparse.SUPPRESS)  # the child process of one measurement
    args = parser.parse_args()
    if args.rss:
        print(json.dumps(measured_rss(args.rss)))
        return

    rows = []
    for length in args.lengths:
        row = {"length": length, "chunked": compiled_bytes(length), "one_chunk": compiled_bytes(length, True)}
        if not args.no_run:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.prefill_memory", "--rss", str(length)],
                                  capture_output=True, text=True, check=True)
            row |= json.loads(proc.stdout.splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print("| Prompt tokens | Cache slots | Chunked: XLA temporaries | Chunked: args + outputs | "
          "Chunked: RSS added by the run | Run time | One chunk: XLA temporaries |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c, one = r["chunked"], r["one_chunk"]
        run = (f"{r['rss_added'] / MIB:.0f} MiB", f"{r['seconds']:.1f} s") if "rss_added" in r else ("-", "-")
        print(f"| {r['length']} | {c['slots']} | {c['temp'] / MIB:.0f} MiB | {c['args_outputs'] / MIB:.0f} MiB | "
              f"{run[0]} | {run[1]} | {one['temp'] / MIB:,.0f} MiB |")


if __name__ == "__main__":
    main()
