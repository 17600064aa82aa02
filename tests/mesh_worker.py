"""Run by tests in a subprocess with simulated CPU devices: the same model on one device and on meshes.

Usage: python -m tests.mesh_worker SPEC...
Prints one JSON line per mesh (one device first, spec "") with the log-probs of fixed prompts and the
greedy tokens of `generate` for a ragged batch; one line per model whose KV heads the tensor axis does not
divide, with its greedy tokens on one device and on the mesh; one line for a `jax.make_mesh` mesh of our axes
only; one line with the demo model's log-probs and greedy tokens, int4 weights (the embedding table and LM
head included) quantised while loading and an int8 KV cache, on one device and on `tensor=2,expert=4`; then
one line per MoE strategy and backend with the largest difference between its expert-parallel run on
`expert=4,tensor=2` and the single-device reference dispatch.
"""

import json
import sys

import numpy as np

PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 40], [3, 4, 5]]
NEW_TOKENS = 6


def main(specs: list[str]) -> None:
    import jax

    import mixtral_jax
    from mixtral_jax import config, demo

    cfg = config.preset("tiny").replace(vocab_size=128, dtype="float32", param_dtype="float32")
    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]])
    for spec in ["", *specs]:
        model = mixtral_jax.init_random(cfg, seed=0, mesh=spec or None)
        result = {"mesh": spec, "devices": model.mesh.devices.size,
                  "logprobs": np.asarray(jax.nn.log_softmax(model.logits(ids))).tolist(),
                  "tokens": model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False)}
        print(json.dumps(result), flush=True)
    for kv_heads, spec in ((1, "tensor=2,expert=4"), (2, "tensor=4,expert=2")):  # KV heads replicated
        small = cfg.replace(n_kv_heads=kv_heads)
        tokens = [mixtral_jax.init_random(small, seed=1, mesh=m).generate(PROMPTS, NEW_TOKENS, stop_at_eos=False)
                  for m in (None, spec)]
        print(json.dumps({"kv_heads": kv_heads, "mesh": spec, "single": tokens[0], "tokens": tokens[1]}), flush=True)
    theirs = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
    print(json.dumps({"jax_mesh": mixtral_jax.init_random(cfg, seed=0, mesh=theirs).generate(
        PROMPTS, NEW_TOKENS, stop_at_eos=False)}), flush=True)
    quantized = []
    for spec in (None, "tensor=2,expert=4"):  # int4 weights quantised while loading, an int8 KV cache
        model = demo.load(mesh=spec, quantize="int4", quantize_vocab=True, kv_cache_dtype="int8")
        quantized.append({"logprobs": np.asarray(jax.nn.log_softmax(model.logits(ids))).tolist(),
                          "tokens": model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False)})
    print(json.dumps({"quantized": quantized}), flush=True)
    for impl, err in expert_parallel_errors("expert=4,tensor=2").items():
        print(json.dumps({"strategy": impl, "max_abs_err": err}), flush=True)


def expert_parallel_errors(spec: str) -> dict[str, float]:
    """Each strategy run by `expert_parallel.dispatch` on `spec` against `moe.reference` on one device, on
    few tokens (so that `decode`, which gathers experts, sees the sentinel id of experts held elsewhere), with
    the CPU backend; `grouped/megablox` is the grouped path of the TPU backend (interpreted on CPU), and
    `grouped/int8` the CPU's with int8 experts against their dequantised reference."""
    import functools

    import jax

    from mixtral_jax import backends, expert_parallel, moe, quant
    from mixtral_jax import sharding as sh

    t, d, e, f, k = 3, 16, 8, 32, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d))
    weights, ids = moe.route(jax.random.normal(keys[1], (t, e)), k)
    w1, w3 = (jax.random.normal(key, (e, d, f)) / d**0.5 for key in keys[2:4])
    w2 = jax.random.normal(keys[4], (e, f, d)) / f**0.5
    reference = backends.Backend()
    experts = backends.Experts(w1, w3, w2, None)
    quantised = [quant.quantize(w, "int8", 1, 1, 128) for w in (w1, w3, w2)]
    int8 = backends.Experts(*(q for q, _ in quantised), tuple(s for _, s in quantised))
    expected = {False: moe.reference(reference, x, weights, ids, experts),
                True: moe.reference(reference, x, weights, ids, int8)}
    cpu, tpu = backends.CpuBackend(), backends.TpuBackend(interpret=True)
    errors = {}
    with sh.rules_context(sh.make_mesh(spec)):
        for name, backend, quantise in (("reference", cpu, False), ("grouped", cpu, False), ("decode", cpu, False),
                                        ("grouped/megablox", tpu, False), ("grouped/int8", cpu, True)):
            choose = functools.partial(moe.choose, name.partition("/")[0])
            run = jax.jit(functools.partial(expert_parallel.dispatch, choose, backend))
            got = run(x, weights, ids, int8 if quantise else experts)
            errors[name] = float(abs(got - expected[quantise]).max())
    return errors


if __name__ == "__main__":
    main(sys.argv[1:])
