"""The CPU backend's split layout (per-layer, per-expert buffers) computes what the stacked layout computes,
and is the only copy of the weights a handle holds."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import backends, config, generate
from mixtral_jax import engine as engine_lib
from mixtral_jax.backends import cpu
from mixtral_jax.layers import Mode

CFG = config.preset("tiny").replace(vocab_size=256, dtype="float32", param_dtype="float32")
PROMPTS = [[1, 17, 42, 5, 88, 23, 9], [1, 60], [1, 3, 70, 71, 33, 12, 50, 8], [4, 4], [9]]
SPLIT = backends.CpuBackend(split=True, bf16=cpu.bf16_support())
STACKED = backends.CpuBackend(split=False, bf16=cpu.bf16_support())


@pytest.fixture(scope="module")
def models():
    split_model = mixtral_jax.init_random(CFG, seed=3, backend=SPLIT)
    return split_model, split_model.with_backend(STACKED)


def test_split_buffers_are_per_layer_and_expert(models):
    split_model, stacked = models
    ffn = split_model.params["layers"]["ffn"]
    assert len(ffn["w1"].get_value()) == CFG.n_layers
    w1 = ffn["w1"].get_value()[0]
    assert isinstance(w1, tuple) and len(w1) == CFG.n_experts and w1[0].shape == (CFG.ffn_dim, CFG.dim)
    assert split_model.params["layers"]["attn"]["wq"].get_value()[1].shape == (CFG.dim, CFG.n_heads, CFG.head_dim)
    stacked_w1 = np.asarray(stacked.params["layers"]["ffn"]["w1"].get_value())
    np.testing.assert_array_equal(np.asarray(ffn["w1"].get_value()[1][5]), stacked_w1[1, 5].T)
    head = np.asarray(stacked.params["lm_head"].get_value())
    np.testing.assert_array_equal(np.asarray(split_model.params["lm_head"].get_value()), head.T)  # output-major
    assert split_model.with_options(max_seq_len=128).params is split_model.params  # shared, not copied again
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(split_model.checkpoint_params()),
                                                  jax.tree.leaves(stacked.checkpoint_params())))


def test_split_logits_and_scores_equal_stacked(models):
    split_model, stacked = models
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 21))
    np.testing.assert_allclose(split_model.logits(ids), stacked.logits(ids), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(split_model.score(ids[0].tolist()), stacked.score(ids[0].tolist()), atol=2e-5)


def test_split_prefill_runs_the_last_layer_at_the_logit_index_only(models):
    split_model, stacked = models
    ids = jax.numpy.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (3, 12)))
    positions = jax.numpy.broadcast_to(jax.numpy.arange(12), ids.shape)
    index = jax.numpy.asarray([11, 4, 0])
    pruned = split_model.module(ids, positions, Mode.TRAIN, SPLIT, logit_index=index)
    full = stacked.module(ids, positions, Mode.TRAIN, STACKED, logit_index=index)
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


@pytest.mark.skipif(cpu.bf16_support() != "amx", reason="bfloat16 operands are kept throughout on AMX CPUs only")
@pytest.mark.parametrize("n_prompts", [1, 5])  # decode steps of one row (lone rows doubled) and of eight
def test_bf16_programs_never_widen_a_weight(n_prompts):
    """XLA:CPU widens to float32 the weights of a bfloat16 product with a bfloat16 result or of one row, and
    a whole embedding table read through a widening gather: no weight-shaped float32 array is left."""
    cfg = CFG.replace(vocab_size=250, dim=40, ffn_dim=72, dtype="bfloat16", param_dtype="bfloat16")
    model = mixtral_jax.init_random(cfg, seed=3, backend=SPLIT)  # weight shapes no activation has
    programs = _lowered(model, PROMPTS[:n_prompts], 4)
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    shapes = [f"f32[{a},{b}]{{" for a, b in ((f, d), (d, f), (v, d), (d, v))]
    shapes.append(f"f32[{d},{cfg.n_heads},{cfg.head_dim}]{{")
    for name, program in programs.items():
        arrays = _materialised(program.compile().as_text())
        assert [a for a in arrays if any(a.startswith(s) for s in shapes)] == [], name
    # and they run (XLA:CPU's DotThunk has no bfloat16 x bfloat16 = float32 kernel for some layouts)
    stacked = model.with_backend(STACKED)
    assert model.generate(PROMPTS[:n_prompts], 4) == stacked.generate(PROMPTS[:n_prompts], 4)


def _lowered(model, prompts, new: int) -> dict:
    """The prefill (`Engine.start`) and decode programs `generate` runs for `prompts`, lowered."""
    spy = {}

    def record(name, program):
        def run(*args, **kwargs):
            spy[name] = program.lower(*args, **kwargs)
            return program(*args, **kwargs)
        return run

    programs = engine_lib.programs(model.backend)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_lib, "programs", lambda backend: programs._replace(
            start=record("prefill", programs.start), decode=record("decode", programs.decode)))
        generate.generate(model, prompts, new, stop_at_eos=False)
    return spy


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


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_split_quantized_equals_stacked(fmt):
    """The split layout's quantised weights (output-major, int4 ones packed) against the stacked
    layout's dequantised ones."""
    cfg = CFG.replace(quantize=fmt, quant_group=32)
    split_model = mixtral_jax.init_random(cfg, seed=3, backend=SPLIT)
    stacked = split_model.with_backend(STACKED)
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (1, 16))
    assert isinstance(split_model.params["layers"]["ffn"]["scales"]["w2"].get_value()[0], tuple)
    groups = 1 if fmt == "int8" else CFG.ffn_dim // 32
    assert stacked.params["layers"]["ffn"]["scales"]["w2"].get_value().shape == (CFG.n_layers, CFG.n_experts,
                                                                                  groups, CFG.dim)
    np.testing.assert_allclose(split_model.logits(ids), stacked.logits(ids), atol=2e-5, rtol=1e-5)
    assert split_model.generate([PROMPTS[0]], 8) == stacked.generate([PROMPTS[0]], 8)
    w2 = split_model.params["layers"]["ffn"]["w2"].get_value()[0][0]  # output-major [D, F]
    assert (w2.shape, w2.dtype) == (((CFG.dim, CFG.ffn_dim), jnp.int8) if fmt == "int8" else
                                    ((CFG.dim, CFG.ffn_dim // 2), jnp.uint8))  # int4 two entries to a byte
    for path, value in split_model.checkpoint_params().items():  # the checkpoint layout unpacks them
        np.testing.assert_array_equal(np.asarray(value), np.asarray(stacked.checkpoint_params()[path]), err_msg=path)


def test_auto_splits_large_models_on_one_cpu_device_only():
    one = jax.make_mesh((1,) * 4, ("data", "fsdp", "expert", "tensor"), devices=jax.devices()[:1],
                        axis_types=(jax.sharding.AxisType.Auto,) * 4)
    assert cpu.layer_bytes(CFG) < cpu.SPLIT_FROM_BYTES  # the demo and test models
    assert not backends.resolve(None, CFG, one).split
    big = CFG.replace(n_layers=CFG.n_layers * (cpu.SPLIT_FROM_BYTES // cpu.layer_bytes(CFG) + 1))
    assert backends.resolve(None, big, one).split
    assert cpu.layer_bytes(config.preset("mixtral-8x7b")) == 32 * (4096 * (2 * 32 + 2 * 8) * 128 + 2 * 4096
                                                                 + 8 * 4096 + 3 * 4096 * 14336 * 8) * 2


def test_split_with_tied_embeddings_reads_the_embedder_as_head():
    tied = mixtral_jax.init_random(CFG.replace(tie_embeddings=True, n_layers=1), seed=4, backend=SPLIT)
    assert "lm_head" not in tied.params
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, (3, 5))
    np.testing.assert_allclose(tied.logits(ids), tied.with_backend(STACKED).logits(ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_decode_step_copies_no_cache_buffer(dtype):
    """A decode step writes one position of each layer's keys and values in place: nothing else of a
    cache buffer's size is written (XLA:CPU copied each buffer twice a step for a write ahead of the reads,
    and transposed one for a layout other than its batched matmuls take; a bfloat16 cache it widened whole
    to float32 and back for each write, so a 16-bit model's split cache is float32)."""
    model = mixtral_jax.init_random(CFG.replace(dtype=dtype, param_dtype=dtype), seed=3, backend=SPLIT)
    engine = generate.engine_for(model, PROMPTS[:1], 40)
    engine.start(PROMPTS[:1], 40)
    hlo = _lowered(model, PROMPTS[:1], 40)["decode"].compile().as_text()
    kv = engine.state.cache.kv
    assert kv.k[0].dtype == np.float32
    cache = {f"{t}[{','.join(map(str, buf.shape))}]{{" for buf in (kv.k[0], kv.v[0]) for t in ("f32", "bf16")}
    writes = [op for op, shape in _materialised(hlo, ops=True) if shape in cache]
    assert writes and all(op.startswith(("get-tuple-element", "parameter", "select_dynamic-update-slice_fusion"))
                          for op in writes), sorted(set(writes))
