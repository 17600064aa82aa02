"""int8 and int4 weights and the int8 KV cache: rounding bounds, the trained demo model's held-out perplexity
against its 16-bit one, the same weights quantised converting or loading, and bad input refused."""

import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import demo, prefill, quant
from mixtral_jax.backends import cpu
from mixtral_jax.cli import main
from mixtral_jax.convert.writer import convert
from mixtral_jax.errors import MixtralError

ROWS, LENGTH = 8, 128  # held-out windows scored with the weights quantised
KV_TOKENS, KV_CHUNK = 1024, 32  # a held-out text scored through the KV cache, a chunk at a time


@pytest.fixture(scope="module")
def held_out():
    """Token ids of the demo model's validation files (every 20th standard library file, as
    scripts/train_demo.py holds them out), in order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"test", "tests", "idle_test", "site-packages"}
    files = sorted(p for p in stdlib.rglob("*.py") if not excluded & set(p.relative_to(stdlib).parts))[::20]
    model = demo.load()
    ids: list[int] = []
    for f in files:
        ids += model.tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) > max(ROWS * (LENGTH + 1), KV_TOKENS):
            return np.asarray(ids)
    raise AssertionError("too little held-out text")


def perplexity(model, ids: np.ndarray) -> float:
    rows = ids[: ROWS * (LENGTH + 1)].reshape(ROWS, LENGTH + 1)
    logp = jax.nn.log_softmax(model.logits(rows[:, :-1]))
    return float(np.exp(-np.mean(np.take_along_axis(np.asarray(logp), rows[:, 1:, None], axis=-1))))


def test_rounding_error_is_at_most_half_a_step_of_its_group():
    w = jax.random.normal(jax.random.key(0), (3, 256, 8)) * jnp.arange(1, 9)  # [lead, in, out], channels differ
    for fmt, group, groups in (("int8", 128, 1), ("int4", 64, 4)):
        q, scale = quant.quantize(w, fmt, 1, 1, group)
        assert q.dtype == quant.STORAGE[fmt] and scale.shape == (3, groups, 8)
        step = np.repeat(np.asarray(scale), 256 // groups, axis=1)
        assert np.all(np.abs(np.asarray(quant.dequantize(q, scale, jnp.float32)) - np.asarray(w)) <= step / 2 + 1e-6)


def test_wo_groups_span_heads_in_order():
    """wo [N, H, D] contracts N x H: groups of 2H rows take two heads each, groups of H/2 half a head."""
    w = jax.random.normal(jax.random.key(1), (4, 8, 5))
    for group, shape in ((16, (2, 1, 5)), (4, (4, 2, 5))):
        q, scale = quant.quantize(w, "int4", 0, 2, group)
        flat_q, flat_s = quant.quantize(w.reshape(32, 5), "int4", 0, 1, group)
        assert scale.shape == shape
        np.testing.assert_array_equal(q.reshape(32, 5), flat_q)
        np.testing.assert_array_equal(scale.reshape(-1, 5), flat_s)


@pytest.mark.parametrize("fmt, bound", [("int8", 1.01), ("int4", 1.08)])
def test_quantized_weights_keep_the_demo_perplexity(held_out, fmt, bound):
    """Held-out perplexity of the demo model within +1% (int8) and +8% (int4, groups of 128) of 16-bit."""
    base = perplexity(demo.load(), held_out)
    got = perplexity(demo.load(quantize=fmt), held_out)
    assert got <= bound * base, (fmt, got, base)


def test_int8_kv_cache_keeps_the_demo_perplexity(held_out):
    """A held-out text scored 32 tokens at a time, each chunk attending to the int8 cache: perplexity within
    +1% of the 16-bit cache's."""
    ids = held_out[:KV_TOKENS].tolist()
    base = np.exp(-prefill.score(demo.load(), ids, chunk=KV_CHUNK).mean())
    int8 = demo.load(kv_cache_dtype="int8")
    assert int8.backend.new_cache(int8.config, 1, 8).k.dtype == jnp.int8
    got = np.exp(-prefill.score(int8, ids, chunk=KV_CHUNK).mean())
    assert got <= 1.01 * base, (got, base)


def test_int4_decode_with_int8_cache_equals_its_own_full_forward():
    """Greedy decoding (the gather path, the int8 cache) picks the quantised model's own argmax at every
    step of a full forward pass over the same tokens (grouped path, no cache) where its margin is clear."""
    model = demo.load(quantize="int4", kv_cache_dtype="int8")
    prompt = model.tokenizer.encode("def fibonacci(n):")
    new = model.generate([prompt], 12, stop_at_eos=False)[0]
    logits = np.asarray(model.logits([prompt + new[:-1]]))[0, len(prompt) - 1:]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.sum() >= 8 and (logits.argmax(-1) == new)[clear].all()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "int4"
    return convert(demo.path(), out, quantize="int4", quant_group=64, progress=False)


def test_converting_quantized_equals_quantizing_while_loading(converted, tmp_path):
    """A folder converted with --quantize holds what a quantising load of the 16-bit model folder makes
    (the Hugging Face folder's quantising load is the demo model's in the tests above)."""
    folder = convert(demo.path(), tmp_path / "bf16", progress=False)
    stored = mixtral_jax.load(converted, backend="reference").checkpoint_params()
    loaded = mixtral_jax.load(folder, backend="reference", quantize="int4", quant_group=64).checkpoint_params()
    assert sorted(stored) == sorted(loaded) and stored["layers.ffn.w1"].dtype == jnp.int4
    assert stored["layers.ffn.scales.w2"].shape[2] == 256 // 64  # FFN dim / group
    for path in stored:
        np.testing.assert_array_equal(np.asarray(stored[path]), np.asarray(loaded[path]), err_msg=path)


def test_a_quantized_checkpoint_is_not_quantized_again(converted):
    with pytest.raises(MixtralError, match="already quantised"):
        mixtral_jax.load(converted, quantize="int8")


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--ids", "1", "--quantize", "int5"], "argument --quantize: invalid choice: 'int5'"),
    (["generate", "--ids", "1", "--kv-cache-dtype", "fp8"], "argument --kv-cache-dtype: invalid choice: 'fp8'"),
    (["generate", "--ids", "1", "--quantize", "int4", "--quant-group", "48"], "quant_group (48) does not divide"),
    (["generate", "--ids", "1", "--quantize", "int8", "--quant-group", "64"], "applies to int4 only"),
    (["plan", "--config", "tiny", "--mesh", "tensor=1", "--quantize", "int3"], "invalid choice: 'int3'"),
])
def test_bad_quantization_input_is_one_line_and_a_nonzero_exit(capsys, argv, message):
    code, err = _run(capsys, *argv)
    assert code != 0 and err.count("\n") == 1 and message in err, err


def test_bad_convert_quantization_writes_nothing(capsys, tmp_path, converted):
    out = tmp_path / "out"
    code, err = _run(capsys, "convert", str(demo.path()), str(out), "--quantize", "int4", "--quant-group", "96")
    assert code != 0 and err.count("\n") == 1 and "does not divide" in err and not out.exists()
    code, err = _run(capsys, "convert", str(converted), str(out), "--quantize", "int8")
    assert code != 0 and err.count("\n") == 1 and not out.exists()


def test_export_of_a_quantized_model_is_refused_before_loading(capsys, tmp_path, converted):
    code, err = _run(capsys, "export", str(converted), str(tmp_path / "hf"))
    assert code != 0 and err.count("\n") == 1 and "weights are int4" in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_products_equal_the_dequantised_product(rows):
    """`cpu.int8_times` (activations as three int8 digits) against float64 over the dequantised weights:
    within 1e-6 of the output's largest entry, as close as the float32 product itself."""
    q, scale = quant.quantize(jax.random.normal(jax.random.key(0), (96, 300)), "int8", 1, 1, 128)  # [out, in]
    w = quant.QTensor(q, scale, jnp.float32)  # output-major, scales [out, 1]
    x = jax.random.normal(jax.random.key(1), (rows, 300)) * jnp.logspace(-3, 1, 300)  # entries of every size
    want = np.asarray(x, np.float64) @ np.asarray(w.dequantized(), np.float64).T
    got = np.asarray(cpu.int8_times(x, w))
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    dequantised = np.asarray(x @ w.dequantized().T)
    assert np.abs(got - want).max() <= 2 * np.abs(dequantised - want).max() + 1e-7 * np.abs(want).max()
