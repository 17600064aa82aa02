"""A memory plan: compile prefill and decode ahead of time for a mesh and read XLA's memory analysis.

Nothing is allocated: parameters, prompts and the decode state are `ShapeDtypeStruct`s placed on a mesh of
placeholder devices (simulated CPU devices in a subprocess), and
`jax.jit(...).lower(...).compile().memory_analysis()` gives each device's bytes. Parameters and the KV cache
are counted from their per-device shards; temporaries are XLA's for the larger of the two programs.
The programs are the reference backend's (`backends.Backend`: plain XLA ops, `ragged_dot` for the experts,
the checkpoint layout), as an accelerator runs them less its fused kernels; on the placeholder CPUs the
temporaries follow the CPU compiler's choices (its float32 copy of one layer's bfloat16 weights included),
and the weights and cache are exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

from mixtral_jax.errors import ConfigError

GIB = 1024**3
# HBM per chip (GiB) of common accelerators; TPU names may also be given as tpu-v5e etc.
CHIPS = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "a100": 80, "h100": 80, "h200": 141}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one (config, mesh, batch, max_len, dtype, weight and KV cache formats)."""

    config: str
    mesh: dict[str, int]
    batch: int
    max_len: int
    dtype: str
    quantize: str
    quantize_vocab: bool
    kv_cache_dtype: str
    params_bytes: int
    cache_bytes: int
    temp_bytes: int  # XLA temporaries of the larger program
    prefill_bytes: int  # XLA arguments + outputs - aliased + temporaries, prefill
    decode_bytes: int  # the same for the decode loop
    param_count: int

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total_bytes(self) -> int:
        return max(self.prefill_bytes, self.decode_bytes)

    def fits(self, hbm_gb: float) -> bool:
        return self.total_bytes <= hbm_gb * GIB

    def to_json(self, hbm_gb: float | None = None) -> dict[str, Any]:
        out = {
            "config": self.config, "mesh": self.mesh, "devices": self.devices, "batch": self.batch,
            "max_len": self.max_len, "dtype": self.dtype, "quantize": self.quantize,
            "quantize_vocab": self.quantize_vocab, "kv_cache_dtype": self.kv_cache_dtype,
            "param_count": self.param_count,
            "per_device": {
                "params_bytes": self.params_bytes, "cache_bytes": self.cache_bytes,
                "temp_bytes": self.temp_bytes, "prefill_bytes": self.prefill_bytes,
                "decode_bytes": self.decode_bytes, "total_bytes": self.total_bytes,
            },
        }
        if hbm_gb is not None:
            out.update(hbm_gb=hbm_gb, fits=self.fits(hbm_gb))
        return out


def hbm_of(chip: str) -> float:
    """HBM in GiB of a known chip name (`CHIPS`, e.g. v5e, tpu-v5e, h100)."""
    name = chip.lower().removeprefix("tpu-")
    if name not in CHIPS:
        raise ConfigError(f"unknown chip {chip!r}; known: {', '.join(CHIPS)} (or give --hbm-gb)")
    return CHIPS[name]


def plan(config: str, mesh: str, batch: int = 1, max_len: int = 4096, dtype: str = "bfloat16",
         quantize: str = "none", kv_cache_dtype: str = "auto", quant_group: int = 128,
         quantize_vocab: bool = False) -> MemoryPlan:
    """The memory plan of preset (or config JSON path) `config` on mesh spec `mesh`, its large matrices (with
    `quantize_vocab` its embedding table and LM head too) in `quantize`'s format (`quant.py`) and its KV
    cache in `kv_cache_dtype`.

    Compiles in a subprocess with the mesh's number of simulated CPU devices. Loop-invariant code motion is
    off there: the CPU compiler would otherwise hoist a float32 copy of every bfloat16 weight out of the
    layer loop (its dots run in float32), which no accelerator does.
    """
    from mixtral_jax import sharding as sh

    n = math.prod(sh.parse_mesh_spec(mesh).values())
    if batch < 1 or max_len < 1:
        raise ConfigError(f"batch and max_len must be positive, got {batch} and {max_len}")
    flags = (f"--xla_force_host_platform_device_count={n} "
             "--xla_disable_hlo_passes=while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    args = json.dumps([config, mesh, batch, max_len, dtype, quantize, kv_cache_dtype, quant_group, quantize_vocab])
    proc = subprocess.run([sys.executable, "-m", "mixtral_jax.plan", args], env=env, capture_output=True, text=True)
    if proc.returncode:  # one line from a ConfigError; the exception line of anything else
        lines = proc.stderr.strip().splitlines() or ["plan: the compiler process printed nothing"]
        raise ConfigError(([line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)] or lines)[-1])
    return MemoryPlan(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _plan_here(config: str, mesh_spec: str, batch: int, max_len: int, dtype: str, quantize: str,
               kv_cache_dtype: str, quant_group: int, quantize_vocab: bool) -> MemoryPlan:
    import jax
    import jax.numpy as jnp

    from mixtral_jax import engine, model, prefill, quant
    from mixtral_jax import sharding as sh
    from mixtral_jax.backends import Backend
    from mixtral_jax.config import ModelConfig, preset
    from mixtral_jax.sampling import row_settings

    cfg = (ModelConfig.load(config) if config.endswith(".json") else preset(config)).with_dtype(dtype)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max_len), kv_cache_dtype=kv_cache_dtype)
    if quantize != "none" or quantize_vocab:
        cfg = quant.quantized_config(cfg, quantize, quant_group if quantize == "int4" else None, config,
                                     quantize_vocab)
    mesh = sh.make_mesh(mesh_spec)
    rules = sh.rules_for(cfg.n_kv_heads, mesh)
    backend = Backend()
    graphdef, abstract = model.abstract(cfg)
    shardings = sh.named_shardings(abstract, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    replicated = jax.NamedSharding(mesh, jax.P())

    def placed(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)

    mesh_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-batch // mesh_batch) * mesh_batch
    chunk = min(prefill.default_chunk(cfg, rows // mesh_batch), max_len)
    length = -(-max_len // chunk) * chunk
    rows_of = lambda dtype: jax.ShapeDtypeStruct((rows,), dtype)  # noqa: E731
    prompt = placed((jax.ShapeDtypeStruct((rows, length), jnp.int32), rows_of(jnp.int32), rows_of(jnp.int32),
                     rows_of(jnp.int32), jax.ShapeDtypeStruct((), jnp.uint32),
                     jax.eval_shape(lambda: jax.tree.map(jnp.asarray, row_settings(rows)))))
    programs = engine.programs(backend)
    static = dict(n_valid=None, n_logprobs=0)
    with sh.rules_context(mesh, rules):
        lowered = programs.start.lower(graphdef, params, *prompt, backend=backend, cfg=cfg, chunk=chunk,
                                       max_len=prefill.cache_slots(cfg, max_len), **static)
        prefill_program = lowered.compile()
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             lowered.out_info[0], prefill_program.output_shardings[0])
        decode = programs.decode.lower(graphdef, params, state, backend=backend, n=8, **static).compile()

    def per_device(tree) -> int:
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * quant.bits(x.dtype) // 8 for x in jax.tree.leaves(tree))

    def program(compiled) -> tuple[int, int]:
        m = compiled.memory_analysis()
        used = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        return used, m.temp_size_in_bytes

    (prefill_bytes, prefill_temp), (decode_bytes, decode_temp) = program(prefill_program), program(decode)
    return MemoryPlan(
        config=config, mesh=dict(mesh.shape), batch=batch, max_len=max_len, dtype=dtype, quantize=quantize,
        quantize_vocab=quantize_vocab, kv_cache_dtype=kv_cache_dtype,
        params_bytes=per_device(params), cache_bytes=per_device(state.cache),
        temp_bytes=max(prefill_temp, decode_temp), prefill_bytes=prefill_bytes, decode_bytes=decode_bytes,
        param_count=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)),
    )


if __name__ == "__main__":
    from mixtral_jax.errors import MixtralError

    try:
        print(json.dumps(dataclasses.asdict(_plan_here(*json.loads(sys.argv[1])))))
    except MixtralError as e:
        sys.exit(f"{e}")
