"""The MoE block alone: reference vs grouped vs decode dispatch at 1, 8, 64 and 1024 tokens (214M sizes).

Run: python -m benchmarks.moe_block [--tokens 1 8 64 1024] [--layers 4]

The dispatch runs under `lax.scan` over a stack of layers, as in the model, so the weights (44 MB a layer
in float32) come from memory rather than cache. Each row shows ms per layer, the bytes the chosen experts
occupy over the measured read bandwidth, and the active-expert FLOPs over the measured matmul peak.
`decode` gathers a weight copy per token and expert, so it is skipped above 64 tokens (1024 tokens would
gather 23 GB).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from mixtral_jax import moe

D, F, E, K = 512, 1792, 8, 2


def stacked(dispatch, n_layers: int):
    def run(x, weights, experts, w1, w3, w2):
        def body(acc, w):
            return acc + dispatch(x, weights, experts, *w), None

        return jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (w1, w3, w2))[0]

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
    bandwidth, peak = common.memory_bandwidth()["read"], common.matmul_peak()
    print(common.machine())
    rows = []
    for n in args.tokens:
        x = jax.random.normal(keys[4], (n, D))
        weights, experts = moe.route(x @ router, K)
        used = len(np.unique(np.asarray(experts)))
        limit_ms = max(used * 3 * D * F * 4 / bandwidth, n * K * 6 * D * F / peak) * 1e3
        row = [n, used]
        for name in ("reference", "grouped", "decode"):
            if name == "decode" and n > 64:
                row.append("n/a")
                continue
            fn = stacked(moe.DISPATCH[name], args.layers)
            ms = common.median_time(lambda: fn(x, weights, experts, w1, w3, w2).block_until_ready(),
                                    reps=args.reps) * 1e3 / args.layers
            row.append(ms)
        row += [moe.choose("auto", n, K, E).__name__, limit_ms]
        rows.append(row)
        print(row, flush=True)
    print(common.table(["tokens", "experts used", "reference ms", "grouped ms", "decode ms", "auto picks",
                        "limit ms"], rows))


if __name__ == "__main__":
    main()
