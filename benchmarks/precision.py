"""float32 vs bfloat16 vs int8 weights (attention and experts) on the 214M checkpoint: speed and parity.

Run: python -m benchmarks.precision [--rounds 3] [--batch 1]

Parity: log-probabilities of two random 128-token rows against float32 (max and mean |delta log p|, argmax
agreement). Speed: greedy `generate` at `--batch` rows (prefill 128 tokens each, decode 64), variants in
alternation; tokens/s count every row.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    import mixtral_jax

    folder = common.make_checkpoint()
    f32 = mixtral_jax.load(folder, dtype="float32")
    bf16 = mixtral_jax.load(folder, dtype="bfloat16")
    models = {"float32": f32, "bfloat16": bf16,
              "int8, float32": mixtral_jax.load(folder, dtype="float32", quantize="int8"),
              "int8, bfloat16": mixtral_jax.load(folder, dtype="bfloat16", quantize="int8")}
    ids = np.random.default_rng(0).integers(3, f32.config.vocab_size, (2, common.PROMPT))
    ref = np.asarray(jax.nn.log_softmax(f32.logits(ids)))
    prompt = np.random.default_rng(1).integers(3, f32.config.vocab_size, (args.batch, common.PROMPT)).tolist()
    fns = {}
    for name, model in models.items():
        model.generate(prompt, common.NEW, stop_at_eos=False)
        fns[f"{name}/1"] = lambda m=model: m.generate(prompt, 1, stop_at_eos=False)
        fns[f"{name}/n"] = lambda m=model: m.generate(prompt, common.NEW, stop_at_eos=False)
    t = common.alternate(fns, rounds=args.rounds)
    print(common.machine())
    rows = []
    for name, model in models.items():
        got = np.asarray(jax.nn.log_softmax(model.logits(ids)))
        delta = np.abs(got - ref)
        ffn = model.params["layers"]["ffn"]
        expert_bytes = sum(x.nbytes for w in ("w1", "w3", "w2") for x in jax.tree.leaves(ffn[w]))
        rows.append([name, f"{expert_bytes / 1e6:.0f} MB", args.batch * common.PROMPT / t[f"{name}/1"],
                     args.batch * (common.NEW - 1) / (t[f"{name}/n"] - t[f"{name}/1"]), float(delta.max()),
                     float(delta.mean()),
                     float(np.mean(got.argmax(-1) == ref.argmax(-1)))])
        print(rows[-1], flush=True)
    print(common.table(["weights", "expert bytes", "prefill tok/s", "decode tok/s", "max |dlogp|",
                        "mean |dlogp|", "argmax agree"], rows))


if __name__ == "__main__":
    main()
