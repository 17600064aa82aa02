"""Run by tests in a subprocess with simulated CPU devices: the same model on several meshes.

Usage: python -m tests.mesh_worker [--checkpoint DIR] [--no-generate] [multi-host flags] SPEC...
Prints one JSON line per mesh (the single device first, spec "", unless multi-host) with the log-probs of
fixed prompts, greedy tokens from full forward passes, and the greedy tokens of `generate`.
"""

import argparse
import json

import numpy as np

PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 40], [3, 4, 5]]
NEW_TOKENS = 6


def model_on(mesh, checkpoint):
    import mixtral_jax
    from mixtral_jax import config

    if checkpoint:
        return mixtral_jax.load(checkpoint, mesh=mesh)
    cfg = config.preset("tiny").replace(vocab_size=128, dtype="float32", param_dtype="float32")
    return mixtral_jax.init_random(cfg, seed=0, mesh=mesh)


def greedy_without_cache(model, prompt, n):
    """The oracle for `generate`: argmax of a full forward pass, one token at a time."""
    from mixtral_jax.distributed import fetch

    ids = list(prompt)
    for _ in range(n):
        ids.append(int(fetch(model.logits(np.array([ids])))[0, -1].argmax()))
    return ids[len(prompt):]


def main() -> None:
    from mixtral_jax import distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("specs", nargs="*")
    distributed.add_distributed_args(parser)
    args = parser.parse_args()
    distributed.from_args(args)
    import jax

    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]])
    for spec in ([] if jax.process_count() > 1 else [""]) + args.specs:
        model = model_on(spec or None, args.checkpoint)
        logprobs = distributed.fetch(jax.nn.log_softmax(model.logits(ids)))
        result = {"mesh": spec, "devices": model.mesh.devices.size, "process": jax.process_index(),
                  "logprobs": logprobs.tolist(), "greedy": [greedy_without_cache(model, p, 3) for p in PROMPTS]}
        if not args.no_generate:
            result["tokens"] = model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
