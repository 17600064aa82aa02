"""Compile time of the forward pass against depth: the layer stack runs under `lax.scan`, so 32 layers
should compile about as fast as 4. Run: python benchmarks/compile_layers.py"""

import time

import jax
import jax.numpy as jnp

from mixtral_jax import api, backends, config, model


def compile_seconds(n_layers: int, preset: str = "tiny", length: int = 128) -> float:
    cfg = config.preset(preset).replace(n_layers=n_layers, dtype="float32", param_dtype="float32")
    graphdef, abstract = model.abstract(cfg)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    start = time.perf_counter()
    api._forward_logits.lower(graphdef, abstract, backends.Backend(), ids).compile()  # the scanned layers
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for preset in ("tiny", "mixtral-8x7b"):
        for layers in (4, 32):
            print(f"{preset:>14} {layers:>2} layers: compile {compile_seconds(layers, preset):.2f} s")
