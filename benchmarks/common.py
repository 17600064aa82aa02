"""Shared pieces of the benchmarks: the 214M checkpoint, the machine's two ceilings, cost formulas, timing.

Run from the repository root (`python -m benchmarks.NAME`). Nothing here runs in CI.
The two ceilings are measured, not taken from a datasheet: memory bandwidth from a large copy (bytes read
plus bytes written) and matmul peak from a large float32 product, both through JAX on every core.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

# The 214M-parameter benchmark config (transformers names).
HF_214M = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
    rope_theta=1e6,
)
PROMPT, NEW = 128, 64  # the benchmark's prompt and new-token counts
CHECKPOINT = Path(os.environ.get("MIXTRAL_BENCH_CKPT", "/tmp/mixtral-214m"))
SETTLE_S = 0.5  # idle seconds before each timed call in `alternate`


def make_checkpoint(folder: Path = CHECKPOINT, **overrides) -> Path:
    """A random-weight transformers `MixtralForCausalLM` (float32) saved to `folder`; reused if present."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    kwargs = {**HF_214M, **overrides}
    theta = kwargs.pop("rope_theta")
    cfg = MixtralConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).float().eval().save_pretrained(folder)
    return folder


def n_params(folder: Path = CHECKPOINT) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    d, f, v, l = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    return 2 * v * d + d + l * (_attn_params(cfg) + 2 * d + d * cfg["num_local_experts"]
                                + cfg["num_local_experts"] * 3 * d * f)


def _attn_params(cfg: dict) -> int:
    d, n, k = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h = cfg.get("head_dim") or d // n
    return 2 * d * n * h + 2 * d * k * h


# ---- costs -------------------------------------------------------------------------------------------

def expected_distinct_experts(n_experts: int, top_k: int, n_tokens: int) -> float:
    """Experts a step touches per layer when `n_tokens` route uniformly at random (top-k without repeats)."""
    return n_experts * (1 - ((n_experts - top_k) / n_experts) ** n_tokens)


def decode_step_bytes(cfg, batch: int, context: int, weight_bytes: float, kv_bytes: float = 4,
                      expert_reads: float | None = None, quantize: str = "none", group: int = 128) -> float:
    """The fewest bytes one decode step must read: every non-expert weight once, the experts the batch
    routes to (`expert_reads` slices per layer, default the expected distinct count), the KV cache up to
    `context` positions (`kv_bytes` an entry), one embedding row a sequence. `quantize`: the attention and
    expert matrices in int8 (a byte a weight plus a float32 scale per output column) or int4 (half a byte
    plus a float32 scale per `group` weights). `cfg` is a `ModelConfig`."""
    d, f, e, l = cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.n_layers

    def matrix(n_in: int, n_out: int) -> float:
        if quantize == "int8":
            return n_in * n_out + 4 * n_out
        if quantize == "int4":
            return n_in * n_out / 2 + 4 * n_in * n_out / group
        return n_in * n_out * weight_bytes

    attn = matrix(d, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim) + matrix(cfg.n_heads * cfg.head_dim, d)
    if expert_reads is None:
        expert_reads = expected_distinct_experts(e, cfg.top_k, batch)
    expert = 2 * matrix(d, f) + matrix(f, d)
    per_layer = attn + (d * e + 2 * d) * weight_bytes + expert_reads * expert
    kv = 2 * batch * context * cfg.n_kv_heads * cfg.head_dim * kv_bytes
    head = (d * cfg.vocab_size + d) * weight_bytes + batch * d * weight_bytes
    return l * (per_layer + kv) + head


def prefill_flops_per_token(cfg, length: int, all_logits: bool = True) -> float:
    """FLOPs per prompt token a causal prefill of `length` tokens must do: weights times active experts
    plus the causal attention (mean context (length + 1) / 2) in every layer, and logits at every position
    (`Mixtral.logits`); or, with logits only at the last one (`generate`), of the last layer only the keys
    and values at every position, the rest once."""
    d, f, h = cfg.dim, cfg.ffn_dim, cfg.head_dim
    kv_w = 2 * d * cfg.n_kv_heads * h
    attn_w = kv_w + 2 * d * cfg.n_heads * h
    moe = cfg.top_k * 3 * d * f + d * cfg.n_experts
    attn_ctx = 2 * cfg.n_heads * h * (length + 1) / 2
    if all_logits:
        return 2 * (cfg.n_layers * (attn_w + moe + attn_ctx) + d * cfg.vocab_size)
    last = kv_w + (attn_w - kv_w + moe + 2 * cfg.n_heads * h * length + d * cfg.vocab_size) / length
    return 2 * ((cfg.n_layers - 1) * (attn_w + moe + attn_ctx) + last)


# ---- ceilings ----------------------------------------------------------------------------------------

def memory_bandwidth(n_bytes: int = 1 << 29, reps: int = 9) -> dict[str, float]:
    """Measured bytes/s. `read`: a row-wise max over a large array through JAX on every core (what decode
    does to weights: read once, write almost nothing), the ceiling used for decode. `copy`: NumPy's
    one-thread copy, counting bytes read plus written."""
    import jax
    import jax.numpy as jnp

    n = n_bytes // 4
    a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    b = np.empty_like(a)
    t_copy = median_time(lambda: np.copyto(b, a), reps=reps)
    x = jnp.asarray(a)
    row_max = jax.jit(lambda x: jnp.max(x.reshape(-1, 1024), axis=1))
    t_read = median_time(lambda: row_max(x).block_until_ready(), reps=reps)
    return {"read": n_bytes / t_read, "copy": 2 * n_bytes / t_copy}


def matmul_peak(n: int = 2048, dtype: str = "float32", reps: int = 7) -> float:
    """Measured FLOP/s of an n x n x n product through `jnp.dot` (all cores), accumulated in float32 (a
    bfloat16 product with a bfloat16 result is widened to float32 by XLA:CPU)."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2 * n**3 / median_time(lambda: dot(a, b).block_until_ready(), reps=reps)


# ---- timing and reporting ----------------------------------------------------------------------------

def median_time(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternate(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run in alternation (ours, theirs, ours, ...) so drift hits both.
    Each timed call starts SETTLE_S after the last ended: torch's OpenMP workers spin for a while after
    its calls and would take a core from the call after them (measured effect: benchmarks/RESULTS.md)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    """One line describing this machine and the library versions."""
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    devs = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; JAX {jax.__version__} on {devs}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) and not math.isnan(v) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
