"""The MoE block: routing equals the reference formula, and every dispatch path equals a per-expert loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax import config, layout, moe


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


@pytest.mark.parametrize("split", [False, True], ids=["stacked", "split"])
@pytest.mark.parametrize("impl", ["reference", "grouped", "decode", "auto"])
@pytest.mark.parametrize("n_tokens,top_k", [(1, 1), (3, 2), (12, 2), (64, 2), (33, 3), (700, 2)])
def test_dispatch_equals_per_expert_loop(impl, n_tokens, top_k, split):
    """Both weight layouts; the CPU grouped path runs blocks of 2 and 1 rows (3 tokens), 4 to 1 (12), of 32,
    8 and 4 (64 tokens) and of 256 (row form) down to 8 rows (700 tokens)."""
    cfg = config.preset("tiny").replace(dtype="float32", param_dtype="float32", top_k=top_k, moe_impl=impl)
    block = moe.MoE(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (1, n_tokens, cfg.dim))
    w = [np.asarray(p[...]) for p in (block.router, block.w1, block.w3, block.w2)]
    if split:
        for p in (block.w1, block.w3, block.w2):
            p.set_value(layout.expert_buffers(p[...]))
    y, logits = block(x)
    expected = per_expert_loop(np.asarray(x[0]), *w, top_k)
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
    _, logits = block(x)
    expected = x[0].astype(jnp.float32) @ block.router[...]
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits[0], expected, atol=1e-5)


def test_block_sizes_pad_little_and_use_big_blocks_where_experts_fill_them():
    assert moe._block_sizes(2, 8) == (2, 1)  # batch 1
    assert moe._block_sizes(16, 8) == (4, 2, 1)  # decode, batch 8
    assert moe._block_sizes(64, 8) == (16, 8, 4)  # decode, batch 32
    assert moe._block_sizes(256, 8) == (64, 48, 32, 16, 8)  # prefill of 128 tokens
    assert moe._block_sizes(2048, 8) == (256, 192, 128, 96, 64, 48, 32, 16, 8)  # prefill of 1k tokens
    assert moe._block_sizes(40, 1) == (32, 16, 8)  # one local expert (expert parallelism): no block above 40 rows


def test_auto_choice_by_token_count():
    assert moe.choose("auto", 1, 2, 8) is moe.decode
    assert moe.choose("auto", 3, 2, 8) is moe.decode
    assert moe.choose("auto", 4, 2, 8) is moe.grouped
    assert moe.choose("reference", 1, 2, 8) is moe.reference


@pytest.mark.parametrize("kernel", ["blocked", "megablox"])
def test_grouped_kernels_equal_ragged_dot_with_gradients(kernel):
    """Each `grouped_kernel` (megablox interpreted on CPU) against `jax.lax.ragged_dot`, values and gradients,
    with 13 rows of which 3 are past the groups (the sentinel id of tokens whose experts are elsewhere)."""
    e, d, f = 4, 32, 48
    keys = jax.random.split(jax.random.key(0), 4)
    xs = jax.random.normal(keys[0], (13, d))
    w1, w3 = (jax.random.normal(k, (e, d, f)) / d**0.5 for k in keys[1:3])
    w2 = jax.random.normal(keys[3], (e, f, d)) / f**0.5
    group_sizes = jnp.array([4, 0, 5, 1], jnp.int32)
    ffn = moe._grouped_kernel(w1, kernel)

    def loss(fn, *args):
        return jnp.sum(jnp.sin(fn(*args[:1], group_sizes, *args[1:])))

    y = ffn(xs, group_sizes, w1, w3, w2)
    np.testing.assert_allclose(y, moe._ragged_ffn(xs, group_sizes, w1, w3, w2), atol=1e-5)
    np.testing.assert_array_equal(y[10:], 0)
    got = jax.grad(functools.partial(loss, ffn), argnums=(0, 1, 2, 3))(xs, w1, w3, w2)
    want = jax.grad(functools.partial(loss, moe._ragged_ffn), argnums=(0, 1, 2, 3))(xs, w1, w3, w2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_grouped_kernel_is_chosen_by_backend_unless_named():
    w = jnp.zeros((2, 4, 4))
    assert moe._grouped_kernel(w, "auto") is moe._cpu_ffn  # this suite runs on CPU
    assert moe._grouped_kernel(w, "megablox") is moe._megablox_ffn
    assert moe._grouped_kernel((lambda: w[0],) * 2, "megablox") is moe._blocked_ffn  # split layout: in place
    assert moe.choose("grouped", 16, 2, 8, "ragged_dot").keywords == {"kernel": "ragged_dot"}
