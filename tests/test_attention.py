"""Blockwise prefill attention over a KV cache equals one softmax over every slot, and skips the blocks past a
chunk's last position."""

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
