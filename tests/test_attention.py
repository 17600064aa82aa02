"""Blockwise prefill attention over a KV cache equals one softmax over every slot, and skips the blocks past a
chunk's last position, in every backend's cache layout; the GPU backend's `jax.nn.dot_product_attention`
(cuDNN's kernel on a GPU, XLA's here) equals the reference's attention, in training, prefill and decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import backends
from mixtral_jax.backends import attention
from mixtral_jax.backends.attention import KVLayout

B, T, N, K, H, S, BLOCK = 3, 6, 4, 2, 8, 24, 8
CPU = KVLayout("BKHS", "BKSH")  # the layouts the cases below are written in


def _case(q_pos, filled):
    """Random q, cache k, v and slot positions: slot s of row b holds position s where s < filled[b]."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, H, S)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    slot_pos = jnp.where(jnp.arange(S)[None] < jnp.asarray(filled)[:, None], jnp.arange(S)[None], -1)
    return q, k, v, jnp.asarray(q_pos, jnp.int32), slot_pos


def _one_pass(q, k, v, q_pos, slot_pos, window):
    return attention.attend(q, [(k, v, attention.attention_mask(q_pos, slot_pos, window))], CPU)


# Row 0 is a chunk at positions 10-15 (its blocks 0 and 1 hold keys), row 1 ends inside the chunk, row 2 is
# batch padding (no query position).
POSITIONS = [list(range(10, 16)), [10, 11, 12, -1, -1, -1], [-1] * T]


@pytest.mark.parametrize("window", [None, 5])
def test_blocks_equal_one_softmax_over_all_slots(window):
    q, k, v, q_pos, slot_pos = _case(POSITIONS, [16, 13, 0])
    ours = attention.attend_blocks(q, k, v, q_pos, slot_pos, window, CPU, BLOCK)
    valid = np.asarray(q_pos) >= 0
    expected = np.asarray(_one_pass(q, k, v, q_pos, slot_pos, window))
    np.testing.assert_allclose(np.asarray(ours)[valid], expected[valid], atol=1e-6)
    # the token-major layout of the reference backend: the same keys, the same result
    token_major = attention.attend_blocks(q, k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3), q_pos, slot_pos,
                                          window, attention.TOKEN_MAJOR, BLOCK)
    np.testing.assert_allclose(np.asarray(token_major)[valid], expected[valid], atol=1e-6)


def test_blocks_past_the_last_position_are_not_read():
    q, k, v, q_pos, slot_pos = _case(POSITIONS, [16, 13, 0])
    poisoned = v.at[:, :, 2 * BLOCK:].set(jnp.nan)  # past every query position (at most 15)
    assert np.isnan(np.asarray(_one_pass(q, k, poisoned, q_pos, slot_pos, None))).all()
    ours = np.asarray(attention.attend_blocks(q, k, poisoned, q_pos, slot_pos, None, CPU, BLOCK))
    clean = np.asarray(attention.attend_blocks(q, k, v, q_pos, slot_pos, None, CPU, BLOCK))
    np.testing.assert_array_equal(ours, clean)
    assert not np.isnan(ours).any()


def test_positions_past_the_slots_read_every_block():
    """A ring buffer (sliding window) holds positions at slot p % S: past S, any slot may hold a key."""
    q, k, v, q_pos, _ = _case([list(range(40, 46))] * B, [S] * B)
    slot_pos = jnp.broadcast_to(jnp.asarray([s + S if s < 46 - S else s for s in range(S)]), (B, S))  # latest
    ours = attention.attend_blocks(q, k, v, q_pos, slot_pos, 30, CPU, BLOCK)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(_one_pass(q, k, v, q_pos, slot_pos, 30)), atol=1e-6)


@pytest.mark.parametrize("slots, block", [(24, None), (192, 64), (1536, 256), (768, 256), (255, None), (64, None)])
def test_key_block_divides_the_slots(slots, block):
    assert attention.key_block(slots) == block


GPU = backends.GpuBackend(cudnn=False)  # `jax.nn.dot_product_attention` with XLA's implementation


@pytest.mark.parametrize("window", [None, 3])
def test_dot_product_attention_equals_attend_with_gradients(window):
    """Lengths, causality and the window reach `jax.nn.dot_product_attention` as our mask has them (XLA's
    implementation here; cuDNN's takes the same arguments on GPU): values and gradients at the rows that
    query (row 1 is shorter, row 2 batch padding)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32) for _ in range(2))
    positions = jnp.asarray([list(range(T)), [0, 1, 2, -1, -1, -1], [-1] * T], jnp.int32)
    valid = (positions >= 0)[..., None]
    cotangent = jnp.asarray(rng.normal(size=(B, T, N * H)), jnp.float32)

    def ours(q, k, v):
        return backends.Backend().self_attention(q, positions, k, v, positions, window)

    def theirs(q, k, v):
        return GPU._causal(q, k, v, positions, window)  # what self_attention runs where the kernel applies

    def loss(f, *args):
        return jnp.sum(jnp.where(valid, f(*args), 0) * cotangent)

    np.testing.assert_allclose(np.where(valid, theirs(q, k, v), 0), np.where(valid, ours(q, k, v), 0), atol=1e-5)
    for g_theirs, g_ours in zip(jax.grad(lambda *a: loss(theirs, *a), (0, 1, 2))(q, k, v),
                                jax.grad(lambda *a: loss(ours, *a), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_theirs, g_ours, atol=1e-5)


def test_dot_product_decode_reads_the_token_major_cache_as_the_reference_does():
    """A decode step over a cache holding positions 0..p-1 of each row (slots in position order), the new key
    at p: the GPU backend's fused call with lengths equals the reference's masked attention."""
    rng = np.random.default_rng(2)
    lengths = np.array([5, 11, 0])
    k_all, v_all = (jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32) for _ in range(2))
    filled = jnp.arange(S)[None] < jnp.asarray(lengths)[:, None]
    filled = filled[..., None, None]
    layer = backends.LayerCache(jnp.where(filled, k_all, 0), jnp.where(filled, v_all, 0))
    q = jnp.asarray(rng.normal(size=(B, 1, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, 1, K, H)), jnp.float32) for _ in range(2))
    positions = jnp.asarray(lengths[:, None], jnp.int32)
    slot_pos = jnp.where(jnp.arange(S)[None] <= positions, jnp.arange(S)[None], -1)
    args = (q, positions, k, v, positions, layer, positions, slot_pos, None)
    want, want_kv = backends.Backend().decode_attention(*args)
    got, got_kv = GPU.decode_attention(*args)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got_kv.k, want_kv.k)


def test_cudnn_takes_16_bit_queries_of_supported_head_dims_only():
    cudnn = backends.GpuBackend(cudnn=True)
    assert cudnn._fused(jnp.zeros((1, 2, 4, 128), jnp.bfloat16))
    assert not cudnn._fused(jnp.zeros((1, 2, 4, 128), jnp.float32))
    assert not cudnn._fused(jnp.zeros((1, 2, 4, 160), jnp.bfloat16))
