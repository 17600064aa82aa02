"""int8 and int4 weights and the int8 KV cache: quality, memory, CPU decode speed, a quantising load's peak.

Run: python -m benchmarks.quantization [--parts quality,memory,speed,peak] [--rounds 5]

- quality: the trained demo model's held-out perplexity (every 20th standard library file, as
  scripts/train_demo.py holds them out) with int8 and int4 weights (128-entry groups), the embedding table
  and LM head 16-bit or quantised too, against its 16-bit weights, and through an int8 KV cache (the text
  scored 32 tokens a chunk, each attending to the cache) against a 16-bit cache; and on the random-weight
  214M checkpoint, max |dlogp| of the same weights against float32.
- memory: the 214M checkpoint's weight bytes (int4 at half a byte; scales included) and the size on disk of
  its model folders (`convert --quantize`), against bfloat16; int8 and int4 each with the embedding table and
  LM head 16-bit, and quantised too (`--quantize-vocab`).
- speed: greedy decode tokens/s at batch 1 and 8 on the 214M checkpoint, float32 compute, int8 and int4
  against float32 weights, each model's calls alternated so that drift hits all of them.
- peak: the peak RSS of `load(..., quantize=...)` of a bfloat16 model folder of at least 1.5 GB (a random
  ~790M-parameter Mixtral), each load in a process of its own, against a bfloat16 load of the same folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from benchmarks import common

BIG = dict(hidden_size=1024, intermediate_size=3584)  # ~790M parameters: 1.58 GB in bfloat16
BIG_HF = Path("/tmp/mixtral-790m-hf")
BIG_BF16 = Path("/tmp/mixtral-790m-bf16")
VOCAB_FORMATS = (("int8", False), ("int8", True), ("int4", False), ("int4", True))  # (format, quantize_vocab)
VOCAB_NOTE = {False: "", True: " (embedding table and LM head too)"}


def held_out(tokenizer, n: int) -> np.ndarray:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"test", "tests", "idle_test", "site-packages"}
    files = sorted(p for p in stdlib.rglob("*.py") if not excluded & set(p.relative_to(stdlib).parts))[::20]
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= n:
            break
    return np.asarray(ids[:n])


def quality() -> None:
    import jax

    import mixtral_jax
    from mixtral_jax import demo, prefill

    rows, length = 32, 128
    base = demo.load()
    ids = held_out(base.tokenizer, rows * (length + 1))
    windows = ids.reshape(rows, length + 1)

    def ppl(model) -> float:
        logp = np.asarray(jax.nn.log_softmax(model.logits(windows[:, :-1])))
        return float(np.exp(-np.mean(np.take_along_axis(logp, windows[:, 1:, None], axis=-1))))

    table = []
    ref = ppl(base)
    table.append(["16-bit weights (bfloat16 stored, float32 compute)", ref, 0.0])
    for fmt, vocab in VOCAB_FORMATS:
        got = ppl(demo.load(quantize=fmt, quantize_vocab=vocab))
        table.append([f"{fmt} weights{VOCAB_NOTE[vocab]}", got, 100 * (got / ref - 1)])
    text = ids[:2048].tolist()
    ref_kv = float(np.exp(-prefill.score(base, text, chunk=32).mean()))
    got_kv = float(np.exp(-prefill.score(demo.load(kv_cache_dtype="int8"), text, chunk=32).mean()))
    table.append(["16-bit KV cache (2048 tokens, 32-token chunks)", ref_kv, 0.0])
    table.append(["int8 KV cache (the same)", got_kv, 100 * (got_kv / ref_kv - 1)])
    print(f"demo model, held-out perplexity ({rows} x {length} tokens)")
    print(common.table(["model", "perplexity", "% vs 16-bit"], table))

    folder = common.make_checkpoint()
    f32 = mixtral_jax.load(folder, dtype="float32")
    tokens = np.random.default_rng(0).integers(3, f32.config.vocab_size, (2, 64))
    want = np.asarray(jax.nn.log_softmax(f32.logits(tokens)))
    rows_ = []
    for fmt, vocab in VOCAB_FORMATS:
        model = mixtral_jax.load(folder, dtype="float32", quantize=fmt, quantize_vocab=vocab)
        got = np.asarray(jax.nn.log_softmax(model.logits(tokens)))
        rows_.append([fmt + VOCAB_NOTE[vocab], float(np.abs(got - want).max()), float(np.abs(got - want).mean()),
                      float(np.mean(got.argmax(-1) == want.argmax(-1)))])
    print("214M random-weight checkpoint against float32 (2 x 64 random tokens)")
    print(common.table(["weights", "max |dlogp|", "mean |dlogp|", "argmax agreement"], rows_))


def memory() -> None:
    import jax

    import mixtral_jax
    from mixtral_jax import quant
    from mixtral_jax.convert.writer import convert

    folder = common.make_checkpoint()
    rows, base = [], None
    for fmt, vocab in (("none", False), *VOCAB_FORMATS):
        model = mixtral_jax.load(folder, dtype="bfloat16", quantize=fmt, quantize_vocab=vocab, backend="reference")
        n_bytes = sum(a.size * quant.bits(a.dtype) // 8 for a in jax.tree.leaves(model.checkpoint_params()))
        out = Path(f"/tmp/mixtral-214m-{fmt}{'-vocab' if vocab else ''}")
        if not out.exists():
            convert(folder, out, dtype="bfloat16", quantize=fmt, quantize_vocab=vocab, progress=False)
        disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "tokenizer.model")
        base = base or (n_bytes, disk)
        rows.append(["bfloat16" if fmt == "none" else fmt + VOCAB_NOTE[vocab], n_bytes / 1e6, n_bytes / base[0],
                     disk / 1e6, disk / base[1]])
    print("214M checkpoint: weight bytes (scales included) and model folder on disk")
    print(common.table(["weights", "MB in memory", "of bfloat16", "MB on disk", "of bfloat16"], rows))


def speed(rounds: int) -> None:
    import mixtral_jax

    folder = common.make_checkpoint()
    models = {"float32": mixtral_jax.load(folder, dtype="float32")}
    for fmt, vocab in VOCAB_FORMATS:
        models[fmt + VOCAB_NOTE[vocab]] = mixtral_jax.load(folder, dtype="float32", quantize=fmt, quantize_vocab=vocab)
    print(next(iter(models.values())).backend.describe())
    new = 32
    rows = []
    for batch in (1, 8):
        prompt = np.random.default_rng(1).integers(3, 32000, (batch, 16)).tolist()
        fns = {}
        for name, model in models.items():
            fns[f"{name}/1"] = lambda m=model: m.generate(prompt, 1, stop_at_eos=False)
            fns[f"{name}/n"] = lambda m=model: m.generate(prompt, new, stop_at_eos=False)
        t = common.alternate(fns, rounds=rounds)
        tok_s = {name: batch * (new - 1) / (t[f"{name}/n"] - t[f"{name}/1"]) for name in models}
        rows += [[batch, name, tok_s[name], tok_s[name] / tok_s["float32"]] for name in models]
    print("214M checkpoint, greedy decode tokens/s (float32 compute; 16-token prompts, 32 new tokens)")
    print(common.table(["batch", "weights", "tokens/s", "of float32"], rows))


PEAK = """
import json, resource, sys
import jax
import mixtral_jax
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = mixtral_jax.load(sys.argv[1], quantize=sys.argv[2], backend="reference")
jax.block_until_ready(model.params)
print(json.dumps({"before": before * 1024, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def peak() -> None:
    from mixtral_jax.convert.writer import convert

    if not BIG_BF16.exists():
        common.make_checkpoint(BIG_HF, **BIG)
        convert(BIG_HF, BIG_BF16, dtype="bfloat16", progress=False)
    size = sum(p.stat().st_size for p in (BIG_BF16 / "params").rglob("*") if p.is_file())
    rows = []
    for fmt in ("none", "int8", "int4"):
        proc = subprocess.run([sys.executable, "-c", PEAK, str(BIG_BF16), fmt], capture_output=True, text=True,
                              check=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(["bfloat16 (no quantisation)" if fmt == "none" else fmt, got["before"] / 1e9, got["peak"] / 1e9,
                     (got["peak"] - got["before"]) / 1e9])
    print(f"peak RSS loading a {size / 1e9:.2f} GB bfloat16 model folder (reference backend, one CPU device)")
    print(common.table(["load", "GB before", "GB peak", "GB added"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="quality,memory,speed,peak")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(common.machine())
    parts = args.parts.split(",")
    for name, run in (("quality", quality), ("memory", memory), ("speed", lambda: speed(args.rounds)),
                      ("peak", peak)):
        if name in parts:
            run()


if __name__ == "__main__":
    main()
