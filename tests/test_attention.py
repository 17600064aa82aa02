"""Blockwise prefill attention over a KV cache equals one softmax over every slot, and skips the blocks past a
chunk's last position; `jax.nn.dot_product_attention` (`layers.dot_product`) equals our own attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax import layers

B, T, N, K, H, S, BLOCK = 3, 6, 4, 2, 8, 24, 8


def _case(q_pos, filled):
    """Random q, cache k, v and slot positions: slot s of row b holds position s where s < filled[b]."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, H, S)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    slot_pos = jnp.where(jnp.arange(S)[None] < jnp.asarray(filled)[:, None], jnp.arange(S)[None], -1)
    return q, k, v, jnp.asarray(q_pos, jnp.int32), slot_pos


def _one_pass(q, k, v, q_pos, slot_pos, window):
    return layers.attend(q, [(k, v, layers.attention_mask(q_pos, slot_pos, window))])


# Row 0 is a chunk at positions 10-15 (its blocks 0 and 1 hold keys), row 1 ends inside the chunk, row 2 is
# batch padding (no query position).
POSITIONS = [list(range(10, 16)), [10, 11, 12, -1, -1, -1], [-1] * T]


@pytest.mark.parametrize("window", [None, 5])
def test_blocks_equal_one_softmax_over_all_slots(window):
    q, k, v, q_pos, slot_pos = _case(POSITIONS, [16, 13, 0])
    ours = layers.attend_blocks(q, k, v, q_pos, slot_pos, window, BLOCK)
    valid = np.asarray(q_pos) >= 0
    expected = np.asarray(_one_pass(q, k, v, q_pos, slot_pos, window))
    np.testing.assert_allclose(np.asarray(ours)[valid], expected[valid], atol=1e-6)


def test_blocks_past_the_last_position_are_not_read():
    q, k, v, q_pos, slot_pos = _case(POSITIONS, [16, 13, 0])
    poisoned = v.at[:, :, 2 * BLOCK:].set(jnp.nan)  # past every query position (at most 15)
    assert np.isnan(np.asarray(_one_pass(q, k, poisoned, q_pos, slot_pos, None))).all()
    ours = np.asarray(layers.attend_blocks(q, k, poisoned, q_pos, slot_pos, None, BLOCK))
    clean = np.asarray(layers.attend_blocks(q, k, v, q_pos, slot_pos, None, BLOCK))
    np.testing.assert_array_equal(ours, clean)
    assert not np.isnan(ours).any()


def test_positions_past_the_slots_read_every_block():
    """A ring buffer (sliding window) holds positions at slot p % S: past S, any slot may hold a key."""
    q, k, v, q_pos, _ = _case([list(range(40, 46))] * B, [S] * B)
    slot_pos = jnp.broadcast_to(jnp.asarray([s + S if s < 46 - S else s for s in range(S)]), (B, S))  # latest
    ours = layers.attend_blocks(q, k, v, q_pos, slot_pos, 30, BLOCK)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(_one_pass(q, k, v, q_pos, slot_pos, 30)), atol=1e-6)


@pytest.mark.parametrize("slots, block", [(24, None), (192, 64), (1536, 256), (768, 256), (255, None), (64, None)])
def test_key_block_divides_the_slots(slots, block):
    assert layers.key_block(slots) == block


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
        mask = layers.attention_mask(positions, positions, window)
        return layers.attend(q, [(k.transpose(0, 2, 3, 1), v.swapaxes(1, 2), mask)])

    def theirs(q, k, v):
        return layers.dot_product(q, k, v, positions, window)

    def loss(f, *args):
        return jnp.sum(jnp.where(valid, f(*args), 0) * cotangent)

    np.testing.assert_allclose(np.where(valid, theirs(q, k, v), 0), np.where(valid, ours(q, k, v), 0), atol=1e-5)
    for g_theirs, g_ours in zip(jax.grad(lambda *a: loss(theirs, *a), (0, 1, 2))(q, k, v),
                                jax.grad(lambda *a: loss(ours, *a), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_theirs, g_ours, atol=1e-5)


def test_dot_product_is_chosen_on_gpu_only_unless_named():
    assert not layers.uses_dot_product("auto", jnp.bfloat16, 128)  # this suite runs on CPU
    assert layers.uses_dot_product("dot_product", jnp.float32, 16)
    assert not layers.uses_dot_product("xla", jnp.bfloat16, 128)
