"""The MoE block alone: reference vs grouped vs decode dispatch at 1, 8, 64 and 1024 tokens (214M sizes).

Run: python -m benchmarks.moe_block [--tokens 1 8 64 1024] [--layers 4]

Each dispatch runs over several layers, as in the model, so the weights (88 MB a layer in float32) come
from memory rather than cache, with the CPU backend's two layouts: stacked (a `lax.scan` over [L, E, ...]
weights) and split (an unrolled loop over per-layer, per-expert output-major buffers,
`mixtral_jax/backends/cpu.py`). Each row shows ms per layer, and the limit:
the larger of the bytes of the experts used over the measured read bandwidth and the active-expert FLOPs
over the measured matmul peak. Stacked `decode` gathers a weight copy per token and expert, so it is skipped
above 64 tokens (1024 tokens would gather 23 GB); split `decode` compiles a switch per token and choice,
so it is skipped above 8 tokens.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from mixtral_jax import backends, moe

D, F, E, K = 512, 1792, 8, 2
STACKED, SPLIT = backends.CpuBackend(split=False), backends.CpuBackend(split=True)


def stacked(dispatch, n_layers: int):
    def run(x, weights, ids, w1, w3, w2):
        def body(acc, w):
            return acc + dispatch(STACKED, x, weights, ids, backends.Experts(*w, None)), None

        return jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (w1, w3, w2))[0]

    return jax.jit(run)


def split(dispatch):
    def run(x, weights, ids, w1, w3, w2):  # tuples over layers of tuples over experts
        return sum(dispatch(SPLIT, x, weights, ids, backends.Experts(*w, None)) for w in zip(w1, w3, w2))

    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    keys = jax.random.split(jax.random.key(0), 5)
    w1, w3 = (jax.random.normal(k, (args.layers, E, D, F)) * 0.02 for k in keys[:2])
    w2 = jax.random.normal(keys[2], (args.layers, E, F, D)) * 0.02
    router = jax.random.normal(keys[3], (D, E))
    split_w = [tuple(tuple(w[i, e].T.copy() for e in range(E)) for i in range(args.layers)) for w in (w1, w3, w2)]
    bandwidth, peak = common.memory_bandwidth()["read"], common.matmul_peak()
    print(common.machine())
    rows = []
    for n in args.tokens:
        x = jax.random.normal(keys[4], (n, D))
        weights, experts = moe.route(x @ router, K)
        used = len(np.unique(np.asarray(experts)))
        limit_ms = max(used * 3 * D * F * 4 / bandwidth, n * K * 6 * D * F / peak) * 1e3
        row = [n, used]
        for name, form in (("reference", "stacked"), ("grouped", "stacked"), ("decode", "stacked"),
                             ("grouped", "split"), ("decode", "split")):
            if name == "decode" and n > (64 if form == "stacked" else 8):
                row.append("n/a")
                continue
            fn, w = ((stacked(moe.DISPATCH[name], args.layers), (w1, w3, w2)) if form == "stacked"
                     else (split(moe.DISPATCH[name]), split_w))
            ms = common.median_time(lambda: fn(x, weights, experts, *w).block_until_ready(),
                                    reps=args.reps) * 1e3 / args.layers
            row.append(ms)
        row += [moe.choose("auto", n, K, E).__name__, limit_ms]
        rows.append(row)
        print(row, flush=True)
    print(common.table(["tokens", "experts used", "reference ms", "grouped ms", "decode ms",
                        "grouped ms (split)", "decode ms (split)", "auto picks", "limit ms"], rows))


if __name__ == "__main__":
    main()
