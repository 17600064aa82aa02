"""The MoE block: routing equals the reference formula, and every dispatch path of every backend equals a
per-expert loop."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax import backends, config, moe
from mixtral_jax.backends import cpu, reference, tpu

BACKENDS = {"stacked": backends.CpuBackend(split=False), "split": backends.CpuBackend(split=True),
            "reference": backends.Backend(), "megablox": backends.TpuBackend(interpret=True),
            "gpu": backends.GpuBackend(cudnn=False)}


def per_expert_loop(x, router, w1, w3, w2, top_k):
    """The oracle, written as mistral-inference writes it: softmax over the top-k logits, loop over experts."""
    logits = x @ router
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-logits[t], kind="stable")[:top_k]
        w = np.exp(logits[t, top] - logits[t, top].max())
        w /= w.sum()
        for weight, e in zip(w, top):
            h = x[t] @ w1[e]
            h = h / (1 + np.exp(-h)) * (x[t] @ w3[e])
            out[t] += weight * (h @ w2[e])
    return out


@pytest.mark.parametrize("backend", ["stacked", "split"])
@pytest.mark.parametrize("impl", ["reference", "grouped", "decode", "auto"])
@pytest.mark.parametrize("n_tokens,top_k", [(1, 1), (3, 2), (12, 2), (64, 2), (33, 3), (700, 2)])
def test_dispatch_equals_per_expert_loop(impl, n_tokens, top_k, backend):
    """Both CPU weight layouts; the CPU grouped path runs blocks of 2 and 1 rows (3 tokens), 4 to 1 (12), of
    32, 8 and 4 (64 tokens) and of 256 (row form) down to 8 rows (700 tokens)."""
    _check_dispatch(impl, n_tokens, top_k, backend)


@pytest.mark.parametrize("backend", ["reference", "megablox", "gpu"])
@pytest.mark.parametrize("impl", ["grouped", "decode"])
@pytest.mark.parametrize("n_tokens,top_k", [(3, 2), (64, 2)])
def test_accelerator_dispatch_equals_per_expert_loop(impl, n_tokens, top_k, backend):
    """The reference, TPU (megablox, interpreted) and GPU backends' expert kernels."""
    _check_dispatch(impl, n_tokens, top_k, backend)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("impl", ["grouped", "decode"])
def test_tokens_not_valid_take_no_expert(impl, backend):
    """Padding and finished slots (not `valid`) come out zero; the other tokens as without them."""
    _check_dispatch(impl, 12, 2, backend, valid=np.arange(12) % 3 != 1)


def _check_dispatch(impl, n_tokens, top_k, backend, valid=None):
    cfg = config.preset("tiny").replace(dtype="float32", param_dtype="float32", top_k=top_k)
    block = moe.MoE(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (1, n_tokens, cfg.dim))
    w = [np.asarray(p[...]) for p in (block.router, block.w1, block.w3, block.w2)]
    if backend == "split":  # each expert output-major in a buffer of its own, as `CpuBackend.place` holds them
        for p in (block.w1, block.w3, block.w2):
            p.set_value(tuple(p[...][e].T for e in range(cfg.n_experts)))
    y, logits = block(x, dataclasses.replace(BACKENDS[backend], moe=impl), None if valid is None else valid[None])
    expected = per_expert_loop(np.asarray(x[0]), *w, top_k)
    if valid is not None:
        expected[~valid] = 0
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y[0]), expected, atol=1e-5, rtol=1e-4)


def test_topk_softmax_equals_softmax_then_renormalise():
    logits = jax.random.normal(jax.random.key(0), (50, 8)) * 3
    weights, experts = moe.route(logits, 2)
    full = jax.nn.softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(full, experts, axis=-1)
    np.testing.assert_allclose(weights, chosen / chosen.sum(-1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def test_router_runs_in_float32_for_bfloat16_models():
    """Near-tied logits that bf16 cannot tell apart still route by their float32 order."""
    cfg = config.preset("tiny").replace(dtype="bfloat16", param_dtype="float32")
    block = moe.MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 16, cfg.dim)).astype(jnp.bfloat16)
    _, logits = block(x, backends.Backend())
    expected = x[0].astype(jnp.float32) @ block.router[...]
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits[0], expected, atol=1e-5)


def test_block_sizes_pad_little_and_use_big_blocks_where_experts_fill_them():
    assert cpu.block_sizes(2, 8) == (2, 1)  # batch 1
    assert cpu.block_sizes(16, 8) == (4, 2, 1)  # decode, batch 8
    assert cpu.block_sizes(64, 8) == (16, 8, 4)  # decode, batch 32
    assert cpu.block_sizes(256, 8) == (64, 48, 32, 16, 8)  # prefill of 128 tokens
    assert cpu.block_sizes(2048, 8) == (256, 192, 128, 96, 64, 48, 32, 16, 8)  # prefill of 1k tokens
    assert cpu.block_sizes(40, 1) == (32, 16, 8)  # one local expert (expert parallelism): no block above 40 rows


def test_auto_choice_by_token_count():
    assert moe.choose("auto", 1, 2, 8) is moe.decode
    assert moe.choose("auto", 3, 2, 8) is moe.decode
    assert moe.choose("auto", 4, 2, 8) is moe.grouped
    assert moe.choose("reference", 1, 2, 8) is moe.reference


KERNELS = {
    "blocked": lambda xs, g, w1, w3, w2: cpu._trainable_blocked_ffn(xs, g, w1, w3, w2, None),
    "blocked bf16 operands": lambda xs, g, w1, w3, w2: cpu._trainable_blocked_ffn(xs, g, w1, w3, w2, "amx"),
    "megablox": lambda xs, g, w1, w3, w2: tpu.megablox_ffn(xs, g, w1, w3, w2, interpret=True),
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_grouped_kernels_equal_ragged_dot_with_gradients(kernel):
    """Each backend's grouped kernel (megablox interpreted on CPU) against `jax.lax.ragged_dot` (the
    reference's), values and gradients, with 13 rows of which 3 are past the groups (the sentinel id of tokens
    whose experts are elsewhere)."""
    e, d, f = 4, 32, 48
    keys = jax.random.split(jax.random.key(0), 4)
    xs = jax.random.normal(keys[0], (13, d))
    w1, w3 = (jax.random.normal(k, (e, d, f)) / d**0.5 for k in keys[1:3])
    w2 = jax.random.normal(keys[3], (e, f, d)) / f**0.5
    group_sizes = jnp.array([4, 0, 5, 1], jnp.int32)
    ffn = KERNELS[kernel]

    def loss(fn, *args):
        return jnp.sum(jnp.sin(fn(*args[:1], group_sizes, *args[1:])))

    y = ffn(xs, group_sizes, w1, w3, w2)
    np.testing.assert_allclose(y, reference.ragged_ffn(xs, group_sizes, w1, w3, w2), atol=1e-5)
    np.testing.assert_array_equal(y[10:], 0)
    got = jax.grad(functools.partial(loss, ffn), argnums=(0, 1, 2, 3))(xs, w1, w3, w2)
    want = jax.grad(functools.partial(loss, reference.ragged_ffn), argnums=(0, 1, 2, 3))(xs, w1, w3, w2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_the_backend_is_resolved_once_from_platform_size_and_name():
    mesh = jax.make_mesh((1,) * 4, ("data", "fsdp", "expert", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    tiny = config.preset("tiny")
    assert backends.resolve(None, tiny, mesh) == backends.CpuBackend(split=False, bf16=cpu.bf16_support())
    big = config.preset("mixtral-8x7b")
    assert backends.resolve(None, big, mesh).split and not backends.resolve(None, big, mesh, training=True).split
    assert backends.resolve("tpu", tiny, mesh) == backends.TpuBackend(interpret=True)  # not on a TPU here
    assert backends.resolve("gpu", tiny, mesh) == backends.GpuBackend(cudnn=False)
    assert type(backends.resolve("reference", tiny, mesh)) is backends.Backend
    assert hash(backends.resolve(None, big, mesh)) == hash(backends.resolve(None, big, mesh))  # a static argument
