"""Run by tests in a subprocess with simulated CPU devices: the same model on one device and on meshes.

Usage: python -m tests.mesh_worker SPEC...
Prints one JSON line per mesh (one device first, spec "") with the log-probs of fixed prompts and the
greedy tokens of `generate` for a ragged batch, then one line per MoE strategy with the largest difference
between its expert-parallel run on `expert=4,tensor=2` and the single-device reference dispatch.
"""

import json
import sys

import numpy as np

PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 40], [3, 4, 5]]
NEW_TOKENS = 6


def main(specs: list[str]) -> None:
    import jax

    import mixtral_jax
    from mixtral_jax import config

    cfg = config.preset("tiny").replace(vocab_size=128, dtype="float32", param_dtype="float32")
    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]])
    for spec in ["", *specs]:
        model = mixtral_jax.init_random(cfg, seed=0, mesh=spec or None)
        result = {"mesh": spec, "devices": model.mesh.devices.size,
                  "logprobs": np.asarray(jax.nn.log_softmax(model.logits(ids))).tolist(),
                  "tokens": model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False)}
        print(json.dumps(result), flush=True)
    for impl, err in expert_parallel_errors("expert=4,tensor=2").items():
        print(json.dumps({"strategy": impl, "max_abs_err": err}), flush=True)


def expert_parallel_errors(spec: str) -> dict[str, float]:
    """Each strategy run by `expert_parallel.dispatch` on `spec` against `moe.reference` on one device, on
    few tokens (so that `decode`, which gathers experts, sees the sentinel id of experts held elsewhere);
    `grouped/megablox` is the grouped path with the TPU kernel, interpreted on CPU."""
    import functools

    import jax

    from mixtral_jax import expert_parallel, moe
    from mixtral_jax import sharding as sh

    t, d, e, f, k = 3, 16, 8, 32, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d))
    weights, experts = moe.route(jax.random.normal(keys[1], (t, e)), k)
    w1, w3 = (jax.random.normal(key, (e, d, f)) / d**0.5 for key in keys[2:4])
    w2 = jax.random.normal(keys[4], (e, f, d)) / f**0.5
    expected = moe.reference(x, weights, experts, w1, w3, w2)
    errors = {}
    with sh.rules_context(sh.make_mesh(spec)):
        for name in ("reference", "grouped", "decode", "grouped/megablox"):
            impl, _, kernel = name.partition("/")
            choose = functools.partial(moe.choose, impl, kernel=kernel or "auto")
            run = jax.jit(functools.partial(expert_parallel.dispatch, choose))
            errors[name] = float(abs(run(x, weights, experts, w1, w3, w2) - expected).max())
    return errors


if __name__ == "__main__":
    main(sys.argv[1:])
