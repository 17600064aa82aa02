"""The split runtime layout (per-layer, per-expert buffers) computes what the stacked layout computes."""

import re
import types

import jax
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import config, generate, layout, quant
from mixtral_jax.errors import MixtralError

CFG = config.preset("tiny").replace(vocab_size=256, dtype="float32", param_dtype="float32")
PROMPTS = [[1, 17, 42, 5, 88, 23, 9], [1, 60], [1, 3, 70, 71, 33, 12, 50, 8], [4, 4], [9]]


@pytest.fixture(scope="module")
def models():
    split_model = mixtral_jax.init_random(CFG.replace(layout="split"), seed=3)
    return split_model, split_model.with_options(layout="stacked")


def test_split_buffers_are_per_layer_and_expert(models):
    split_model, stacked = models
    assert stacked.split is None
    layers = split_model.split.layers
    assert len(layers) == CFG.n_layers
    w1 = layers[0]["ffn"]["w1"].get_value()
    assert isinstance(w1, tuple) and len(w1) == CFG.n_experts and w1[0].shape == (CFG.ffn_dim, CFG.dim)
    assert layers[1]["attn"]["wq"].get_value().shape == (CFG.dim, CFG.n_heads, CFG.head_dim)
    stacked_w1 = np.asarray(stacked.params["layers"]["ffn"]["w1"].get_value())
    np.testing.assert_array_equal(np.asarray(layers[1]["ffn"]["w1"].get_value()[5]), stacked_w1[1, 5].T)
    head = np.asarray(stacked.params["lm_head"].get_value())
    np.testing.assert_array_equal(np.asarray(split_model.split.head), head.T)  # output-major [V, D]
    assert split_model.with_options(moe_impl="grouped").split is split_model.split  # shared, not copied again


def test_split_logits_and_scores_equal_stacked(models):
    split_model, stacked = models
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 21))
    np.testing.assert_allclose(split_model.logits(ids), stacked.logits(ids), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(split_model.score(ids[0].tolist()), stacked.score(ids[0].tolist()), atol=2e-5)


def test_split_prefill_runs_the_last_layer_at_the_logit_index_only(models):
    split_model, stacked = models
    ids = jax.numpy.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (3, 12)))
    index = jax.numpy.asarray([11, 4, 0])
    pruned = split_model.module(ids, logit_index=index, split=split_model.split)
    full = stacked.module(ids, logit_index=index)
    assert pruned.logits.shape == (3, 1, CFG.vocab_size) and pruned.router_logits is None
    np.testing.assert_allclose(pruned.logits, full.logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n_prompts", [1, 5])  # decode steps of 1 row (switch) and 8 rows (grouped blocks)
def test_split_generate_equals_stacked(models, n_prompts):
    split_model, stacked = models
    prompts = PROMPTS[:n_prompts]
    assert split_model.generate(prompts, 10, stop_at_eos=False) == stacked.generate(prompts, 10, stop_at_eos=False)
    # prompts over several prefill chunks, rows ending in different ones
    chunked = generate.generate(split_model, prompts, 4, stop_at_eos=False, chunk=4)
    assert chunked == stacked.generate(prompts, 4, stop_at_eos=False)


@pytest.mark.skipif(layout.cpu_bf16() != "amx", reason="bfloat16 operands are kept throughout on AMX CPUs only")
@pytest.mark.parametrize("n_prompts", [1, 5])  # decode steps of one row (lone rows doubled) and of eight
def test_bf16_programs_never_widen_a_weight(n_prompts):
    """XLA:CPU widens to float32 the weights of a bfloat16 product with a bfloat16 result or of one row, and
    a whole embedding table read through a widening gather: no weight-shaped float32 array is left."""
    cfg = CFG.replace(vocab_size=250, dim=40, ffn_dim=72, dtype="bfloat16", param_dtype="bfloat16",
                      layout="split")  # weight shapes no activation has
    model = mixtral_jax.init_random(cfg, seed=3)
    run = generate._Run(model, PROMPTS[:n_prompts], 4, 0.0, None, None, 0, False, None)
    weights = (model.graphdef, model.params, model.split)
    state = run.prefill()
    programs = {"prefill": generate.prefill.lower(*weights, *run.args, **run.static),
                "decode": generate.decode.lower(*weights, state, np.int32(4), run.args[-1])}
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    shapes = [f"f32[{a},{b}]{{" for a, b in ((f, d), (d, f), (v, d), (d, v))]
    shapes.append(f"f32[{d},{cfg.n_heads},{cfg.head_dim}]{{")
    for name, program in programs.items():
        arrays = _materialised(program.compile().as_text())
        assert [a for a in arrays if any(a.startswith(s) for s in shapes)] == [], name
    # and they run (XLA:CPU's DotThunk has no bfloat16 x bfloat16 = float32 kernel for some layouts)
    stacked = model.with_options(layout="stacked")
    assert model.generate(PROMPTS[:n_prompts], 4) == stacked.generate(PROMPTS[:n_prompts], 4)


def _materialised(hlo: str, ops: bool = False) -> list:
    """Shapes of the arrays an optimised HLO module writes to memory: instruction outputs outside fused
    computations (a fusion's inner ops write nothing); with `ops`, (opcode, shape) pairs, a fusion's
    opcode its name (`select_dynamic-update-slice_fusion.2`: named after what it fuses)."""
    fused = set(re.findall(r" fusion\(.*?calls=%([\w.\-]+)", hlo))
    found, inside = [], False
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and not line.startswith(" "):
            inside = line.split()[0 if line.startswith("%") else 1].lstrip("%") in fused
        elif not inside and (m := re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\]\{)\S* ([\w\-]+)", line)):
            found.append((m.group(1) if m.group(3) == "fusion" else m.group(3), m.group(2)) if ops else m.group(2))
    return found


def test_split_int8_equals_stacked_int8(models):
    split_model, stacked = (quant.quantize(m) for m in models)
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (1, 16))
    assert isinstance(split_model.split.layers[0]["ffn"]["scales"]["w2"].get_value(), tuple)
    assert stacked.split is None
    np.testing.assert_allclose(split_model.logits(ids), stacked.logits(ids), atol=2e-5, rtol=1e-5)
    assert split_model.generate([PROMPTS[0]], 8) == stacked.generate([PROMPTS[0]], 8)


def test_auto_splits_large_models_on_one_cpu_device_and_split_is_refused_on_a_mesh():
    mesh = types.SimpleNamespace(devices=np.empty((2, 1), object))
    with pytest.raises(MixtralError, match="single device"):
        layout.use_split(CFG.replace(layout="split"), mesh, 1 << 30)
    assert not layout.use_split(CFG, mesh, 1 << 30)
    assert layout.use_split(CFG.replace(layout="split"), None, 1)
    assert not layout.use_split(CFG, None, layout.SPLIT_FROM_BYTES - 1)  # the demo and test models
    assert layout.use_split(CFG, None, layout.SPLIT_FROM_BYTES) == (jax.devices()[0].platform == "cpu")


def test_split_with_tied_embeddings_reads_the_embedder_as_head():
    tied = mixtral_jax.init_random(CFG.replace(layout="split", tie_embeddings=True, n_layers=1), seed=4)
    assert tied.split.head is None
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, (3, 5))
    np.testing.assert_allclose(tied.logits(ids), tied.with_options(layout="stacked").logits(ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_decode_step_copies_no_cache_buffer(dtype):
    """A decode step writes one position of each layer's keys and values in place: nothing else of a
    cache buffer's size is written (XLA:CPU copied each buffer twice a step for a write ahead of the reads,
    and transposed one for a layout other than its batched matmuls take; a bfloat16 cache it widened whole
    to float32 and back for each write, so a 16-bit model's split cache is float32)."""
    model = mixtral_jax.init_random(CFG.replace(layout="split", dtype=dtype, param_dtype=dtype), seed=3)
    run = generate._Run(model, PROMPTS[:1], 40, 0.0, None, None, 0, False, None)
    state = run.prefill()
    hlo = generate.decode.lower(model.graphdef, model.params, model.split, state, np.int32(40),
                                run.args[-1]).compile().as_text()
    assert state.cache.k[0].dtype == np.float32
    cache = {f"{t}[{','.join(map(str, buf.shape))}]{{" for buf in (state.cache.k[0], state.cache.v[0])
             for t in ("f32", "bf16")}
    writes = [op for op, shape in _materialised(hlo, ops=True) if shape in cache]
    assert writes and all(op.startswith(("get-tuple-element", "parameter", "select_dynamic-update-slice_fusion"))
                          for op in writes), sorted(set(writes))
