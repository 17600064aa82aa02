"""int8 and int4 weights and the int8 KV cache: rounding bounds, the trained demo model's held-out perplexity
against its 16-bit one (the embedding table and LM head quantised too or not), the backends and layouts
agreeing, the same weights quantised converting or loading, and bad input refused."""

import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import backends, config, demo, model, prefill, quant
from mixtral_jax import sharding as sh
from mixtral_jax.backends import cpu
from mixtral_jax.cli import main
from mixtral_jax.convert.writer import convert
from mixtral_jax.errors import MixtralError

ROWS, LENGTH = 8, 128  # held-out windows scored with the weights quantised
KV_TOKENS, KV_CHUNK = 1024, 32  # a held-out text scored through the KV cache, a chunk at a time
SPLIT = backends.CpuBackend(split=True, bf16=cpu.bf16_support())
TINY = config.preset("tiny").replace(vocab_size=256, dtype="float32", param_dtype="float32", quant_group=32)


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


@pytest.fixture(scope="module")
def base_perplexity(held_out):
    return perplexity(demo.load(), held_out)


@pytest.mark.parametrize("fmt, vocab, bound", [("int8", False, 1.01), ("int4", False, 1.08), ("int8", True, 1.01),
                                               ("int4", True, 1.08)])
def test_quantized_weights_keep_the_demo_perplexity(held_out, base_perplexity, fmt, vocab, bound):
    """Held-out perplexity of the demo model within +1% (int8) and +8% (int4, groups of 128) of 16-bit, with
    the embedding table and LM head quantised too (`vocab`) or 16-bit."""
    got = perplexity(demo.load(quantize=fmt, quantize_vocab=vocab), held_out)
    assert got <= bound * base_perplexity, (fmt, vocab, got, base_perplexity)


@pytest.mark.parametrize("fmt, mean_dlogp, agreement", [("int8", 0.04, 0.95), ("int4", 0.4, 0.8)])
def test_quantized_vocab_keeps_the_demo_logits_on_both_backends(fmt, mean_dlogp, agreement):
    """The demo model with every weight quantised while loading, the embedding table and LM head included:
    mean |dlogp| against 16-bit below `mean_dlogp` and the argmax the same at `agreement` of the positions
    on the reference backend; the CPU's split layout (rows and their scales gathered, the head output-major)
    within 1e-4 of it. Without `quantize_vocab` both stay 16-bit."""
    ids = np.random.default_rng(0).integers(3, 2048, (2, 32))
    want = np.asarray(jax.nn.log_softmax(demo.load(backend="reference").logits(ids)))
    reference = demo.load(backend="reference", quantize=fmt, quantize_vocab=True)
    got = np.asarray(jax.nn.log_softmax(reference.logits(ids)))
    assert np.abs(got - want).mean() <= mean_dlogp and np.mean(got.argmax(-1) == want.argmax(-1)) >= agreement
    split = demo.load(backend=SPLIT, quantize=fmt, quantize_vocab=True)
    head = split.params["lm_head"].get_value()  # output-major; int4 two entries to a byte
    assert (head.shape, head.dtype) == (((2048, 128), jnp.int8) if fmt == "int8" else ((2048, 64), jnp.uint8))
    np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(split.logits(ids))), got, atol=1e-4, rtol=0)
    assert reference.params["embedder"].get_value().dtype == quant.STORAGE[fmt]
    assert demo.load(quantize=fmt).params["embedder"].get_value().dtype == jnp.float32


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_tied_embeddings_split_equals_the_reference(fmt):
    """A one-layer dense tied model quantised with its embedding table (the head as well): the split layout's
    logits are the reference backend's, for a few rows and for many."""
    cfg = TINY.replace(quantize=fmt, quantize_vocab=True, tie_embeddings=True, n_layers=1, n_experts=0)
    split = mixtral_jax.init_random(cfg, seed=5, backend=SPLIT)
    reference = split.with_backend("reference")
    assert "lm_head" not in reference.params and reference.params["embedder"].get_value().dtype == quant.STORAGE[fmt]
    for shape in ((1, 4), (2, 80)):
        ids = np.random.default_rng(3).integers(0, cfg.vocab_size, shape)
        np.testing.assert_allclose(split.logits(ids), reference.logits(ids), atol=2e-5, rtol=1e-5)


def test_vocab_scales_keep_the_vocab_axis_and_replicate_the_model_dim():
    """int4 in groups of 32 along D: the embedding table's scales [V, D / 32] and the LM head's [D / 32, V],
    named `vocab` on V and replicated on their groups, as the other weights' scales are."""
    state = model.abstract(TINY.replace(quantize="int4", quantize_vocab=True))[1]
    table, head = state["scales"]["embedder"], state["scales"]["lm_head"]
    assert table.get_value().shape == (TINY.vocab_size, TINY.dim // 32) and table.out_sharding == (sh.VOCAB, None)
    assert head.get_value().shape == (TINY.dim // 32, TINY.vocab_size) and head.out_sharding == (None, sh.VOCAB)


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
    return convert(demo.path(), out, quantize="int4", quant_group=64, quantize_vocab=True, progress=False)


def test_converting_quantized_equals_quantizing_while_loading(converted, tmp_path):
    """A folder converted with --quantize --quantize-vocab holds what a quantising load of the 16-bit model
    folder makes, the embedding table and LM head included, and records it in its config (the Hugging Face
    folder's quantising load is the demo model's in the tests above)."""
    folder = convert(demo.path(), tmp_path / "bf16", progress=False)
    restored = mixtral_jax.load(converted, backend="reference")
    assert restored.config.quantize_vocab
    stored = restored.checkpoint_params()
    loaded = mixtral_jax.load(folder, backend="reference", quantize="int4", quant_group=64,
                              quantize_vocab=True).checkpoint_params()
    assert sorted(stored) == sorted(loaded) and stored["layers.ffn.w1"].dtype == jnp.int4
    assert stored["layers.ffn.scales.w2"].shape[2] == 256 // 64  # FFN dim / group
    assert stored["embedder"].dtype == stored["lm_head"].dtype == jnp.int4
    assert stored["scales.embedder"].shape == (2048, 128 // 64) and stored["scales.lm_head"].shape == (128 // 64, 2048)
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
    (["generate", "--ids", "1", "--quantize-vocab"], "(--quantize-vocab) needs --quantize int8 or int4"),
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
    code, err = _run(capsys, "convert", str(demo.path()), str(out), "--quantize-vocab")
    assert code != 0 and err.count("\n") == 1 and "needs --quantize" in err and not out.exists()


def test_a_config_with_quantize_vocab_and_no_format_is_refused():
    data = {**TINY.to_dict(), "quantize_vocab": True}
    with pytest.raises(MixtralError, match="quantize_vocab needs quantize int8 or int4"):
        config.ModelConfig.from_dict(data, "config.json")


def test_export_of_a_quantized_model_is_refused_before_loading(capsys, tmp_path, converted):
    code, err = _run(capsys, "export", str(converted), str(tmp_path / "hf"))
    assert code != 0 and err.count("\n") == 1 and "weights are int4" in err and not (tmp_path / "hf").exists()
