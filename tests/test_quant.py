"""Int8 weight-only expert quantisation: bounded rounding error, and a model that scores like float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import backends, quant
from mixtral_jax.backends import cpu
from mixtral_jax.errors import MixtralError


@pytest.fixture(scope="module")
def models(hf_mixtral):
    model = mixtral_jax.load(hf_mixtral, dtype="float32")
    return model, model.quantize()


def test_rounding_error_is_at_most_half_a_step_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (2, 3, 16, 8)) * jnp.arange(1, 9)  # channels of different range
    q, scale = quant.quantize_int8(w)
    assert q.dtype == jnp.int8 and scale.shape == (2, 3, 1, 8)
    error = np.abs(np.asarray(q, np.float32) * np.asarray(scale) - np.asarray(w))
    assert np.all(error <= np.asarray(scale) / 2 + 1e-6)


def test_int8_experts_score_like_float32(models):
    """Mean |log p difference| under 0.05 and the same argmax at 95% of positions (random weights with
    initializer range 0.15, so logits are sharp)."""
    model, q = models
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 40))
    ref = np.asarray(jax.nn.log_softmax(model.logits(ids)))
    got = np.asarray(jax.nn.log_softmax(q.logits(ids)))
    assert np.mean(np.abs(got - ref)) < 0.05
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.95


def test_int8_generate_decode_path_equals_its_full_forward(models):
    """Greedy decoding (the gather path) agrees with the quantised model's own full forward (grouped)."""
    _, q = models
    prompt = list(range(3, 13))
    new = q.generate([prompt], 6, stop_at_eos=False)[0]
    logits = np.asarray(q.logits([prompt + new[:-1]]))[0, len(prompt) - 1:]
    assert logits.argmax(-1).tolist() == new


def test_quantize_keeps_input_and_stores_int8_experts(models):
    model, q = models
    ffn = q.params["layers"]["ffn"]
    assert {ffn[n][...].dtype for n in ("w1", "w3", "w2")} == {jnp.dtype(jnp.int8)}
    assert model.params["layers"]["ffn"]["w1"][...].dtype == jnp.float32
    with pytest.raises(MixtralError, match="already quantised"):
        q.quantize()


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_products_equal_the_dequantised_product(rows):
    """`cpu.int8_times` (activations as three int8 digits) against float64 over the dequantised weights:
    within 1e-6 of the output's largest entry, as close as the float32 product itself."""
    q, scale = quant.quantize_int8(jax.random.normal(jax.random.key(0), (1, 1, 300, 96)))  # [.., in, out]
    w = quant.Int8(q[0, 0].T, scale[0, 0].T, jnp.float32)  # output-major, scales [out, 1]
    x = jax.random.normal(jax.random.key(1), (rows, 300)) * jnp.logspace(-3, 1, 300)  # entries of every size
    want = np.asarray(x, np.float64) @ np.asarray(w.dequantized(), np.float64).T
    got = np.asarray(cpu.int8_times(x, w))
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    dequantised = np.asarray(x @ w.dequantized().T)
    assert np.abs(got - want).max() <= 2 * np.abs(dequantised - want).max() + 1e-7 * np.abs(want).max()


@pytest.mark.parametrize("batch", [1, 5])
def test_split_int8_decode_equals_stacked(models, batch):
    """The split layout's int8 decode (int8 products: a switch per token at batch 1, blocks of 1-4 rows at 5)
    gives the stacked layout's logits (dequantised weights) and greedy tokens."""
    _, q = models
    q = q.with_backend(backends.CpuBackend(split=False))
    split = q.with_backend(backends.CpuBackend(split=True))
    prompts = [list(range(3 + i, 13 + 2 * i)) for i in range(batch)]
    assert split.generate(prompts, 6, stop_at_eos=False) == q.generate(prompts, 6, stop_at_eos=False)
    ids = np.random.default_rng(1).integers(0, q.config.vocab_size, (batch, 1))
    np.testing.assert_allclose(split.logits(ids), q.logits(ids), atol=1e-4)
