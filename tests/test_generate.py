"""Generation: greedy equals transformers' generate, cached decode equals a full forward pass, ragged
batches, EOS, buckets that do not recompile, sliding-window caches, streaming, and clear errors.

Most tests share the compiled shapes of the `greedy` fixture (batch 4 or 1, prompt bucket 16, 32 cache
slots, 24 new tokens), so the module compiles few programs."""

import functools

import numpy as np
import pytest
import torch
from transformers import MixtralForCausalLM

import mixtral_jax
from mixtral_jax import backends, engine, prefill
from mixtral_jax import generate as gen
from mixtral_jax.backends.attention import key_block
from mixtral_jax.errors import MixtralError
from tests import reference

PROMPTS = [[1, 17, 42, 5, 88, 23, 9], [1, 60], [1, 3, 70, 71, 33, 12, 50, 8]]
NEW = 24
LONG = [1, 3, 70, 71, 33, 12, 50, 8, 19, 44, 2, 95, 61]


@functools.cache
def hf_greedy(folder, prompts: tuple[tuple[int, ...], ...], n: int) -> list[list[int]]:
    """transformers' greedy `generate` (do_sample=False, no EOS stop), one prompt at a time."""
    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    outs = [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0) for p in prompts]
    return [out[0, len(p):].tolist() for p, out in zip(prompts, outs)]


class _Eos:
    """A stand-in tokenizer that only names the EOS id and knows every id (changing the config would
    recompile)."""

    def __init__(self, eos_id, vocab_size=96):
        self.eos_id = eos_id
        self.vocab_size = vocab_size


@pytest.fixture(scope="module")
def model(hf_mixtral):
    return mixtral_jax.load(hf_mixtral, dtype="float32")


@pytest.fixture(scope="module")
def greedy(model):
    """The ragged batch PROMPTS, greedy, without stopping at EOS."""
    return model.generate(PROMPTS, NEW, stop_at_eos=False)


def test_greedy_equals_transformers_generate(greedy, hf_mixtral):
    assert [len(new) for new in greedy] == [NEW] * len(PROMPTS)
    assert greedy == hf_greedy(hf_mixtral, tuple(map(tuple, PROMPTS)), NEW)  # all 72 tokens equal


def test_ragged_batch_equals_single_prompts(model, greedy):
    assert greedy == [model.generate([p], NEW, stop_at_eos=False)[0] for p in PROMPTS]


@pytest.mark.parametrize("backend", [backends.Backend(), backends.GpuBackend(cudnn=False),
                                     backends.TpuBackend(interpret=True), backends.CpuBackend(split=True)],
                         ids=lambda b: b.name + ("-split" if getattr(b, "split", False) else ""))
def test_every_backend_generates_the_same_tokens(model, greedy, backend):
    """The reference, the GPU backend (its fused `jax.nn.dot_product_attention`, XLA's implementation here),
    the TPU backend (megablox, interpreted) and the CPU split layout give the ragged batch's greedy tokens."""
    assert model.with_backend(backend).generate(PROMPTS, NEW, stop_at_eos=False) == greedy


def test_dot_product_attention_prefill_and_decode_generate_the_same_tokens(model, greedy, monkeypatch):
    """The one-chunk prefill of the ragged batch (with a batch-padding row) and every decode step run through
    `jax.nn.dot_product_attention` on the GPU backend, and give the same tokens."""
    calls = []
    causal, decode = backends.GpuBackend._causal, backends.GpuBackend.decode_attention
    monkeypatch.setattr(backends.GpuBackend, "_causal", lambda self, *a: calls.append(a[0].shape) or causal(self, *a))
    monkeypatch.setattr(backends.GpuBackend, "decode_attention",
                        lambda self, *a: calls.append(a[0].shape) or decode(self, *a))
    gpu = model.with_backend(backends.GpuBackend(cudnn=False, moe="grouped"))  # compiled here, not before
    assert gpu.generate(PROMPTS, NEW, stop_at_eos=False) == greedy
    assert {shape[:2] for shape in calls} == {(4, 16), (4, 1)}  # the prefill's one 16-token chunk; decode


def test_cached_decode_equals_full_forward(model):
    """Greedy tokens from the cache are the argmax of one uncached forward pass over prompt + tokens."""
    new = gen.generate(model, [LONG], 19, stop_at_eos=False, chunk=4)[0]  # prefill in 4 chunks; 32 slots
    logits = np.asarray(model.logits([LONG + new]))[0, len(LONG) - 1 : -1]
    assert new == logits.argmax(-1).tolist()


@pytest.mark.parametrize("length, chunks", [(37, (8, 256)), (150, (32, 256))])
def test_chunked_scores_equal_full_forward_and_transformers(model, hf_mixtral, length, chunks):
    """37 tokens: 5 chunks with a padded tail, or one pass. 150 (192 cache slots): the chunks attend to the
    cache in blocks of 64 slots up to their last position (`attention.attend_blocks`)."""
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, length).tolist()
    ref = reference.hf_logprobs(hf_mixtral, np.asarray([ids]))[0]
    ref = ref[np.arange(len(ids) - 1), ids[1:]]
    for chunk in chunks:
        assert np.abs(prefill.score(model, ids, chunk=chunk) - ref).max() <= 2e-4


def test_long_prompt_prefill_in_key_blocks_equals_transformers(model, hf_mixtral):
    prompt = np.random.default_rng(1).integers(1, model.config.vocab_size, 150).tolist()  # no pad id 0
    assert key_block(prefill.cache_slots(model.config, 150 + 8)) == 64
    new = gen.generate(model, [prompt], 8, stop_at_eos=False, chunk=32)[0]  # 5 chunks, 1 to 3 blocks each
    assert new == hf_greedy(hf_mixtral, (tuple(prompt),), 8)[0]


def test_sliding_window_decode_equals_transformers_and_a_full_forward_with_a_bounded_cache(tmp_path):
    folder = reference.make_hf_checkpoint(tmp_path, sliding_window=5)
    model = mixtral_jax.load(folder, dtype="float32")
    new = gen.generate(model, [LONG], 16, stop_at_eos=False, chunk=8)[0]  # 29 positions, window 5
    assert new == hf_greedy(folder, (tuple(LONG),), 16)[0]
    logits = np.asarray(model.logits([LONG + new]))[0, len(LONG) - 1 : -1]
    assert new == logits.argmax(-1).tolist()
    engine = gen.engine_for(model, [LONG], 200, chunk=8)
    engine.start([LONG], 200)
    cache = engine.state.cache
    slots = cache.kv.v.shape[1 + model.backend.kv_layout.v.index("S")]
    assert cache.pos.shape[1] == slots == 5 + 8 - 1  # window + chunk - 1 slots, not 213


def test_rows_stop_at_their_first_eos(model, greedy):
    eos = greedy[0][3]
    stopping = model.with_tokenizer(_Eos(eos))
    stopped = stopping.generate(PROMPTS, NEW)
    assert sum(map(len, stopped)) < sum(map(len, greedy))
    for row, full in zip(stopped, greedy):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:end]


def test_prompt_lengths_in_one_bucket_compile_once(model):
    programs = engine.programs(model.backend)
    model.generate([[1, 2, 3]], NEW)
    before = (programs.start._cache_size(), programs.decode._cache_size())
    for n, new in ((4, 24), (9, 23), (11, 21)):  # 16 prompt positions, 32 cache slots, 24 decode steps
        assert len(model.generate([list(range(1, n + 1))], new, stop_at_eos=False)[0]) == new
    assert (programs.start._cache_size(), programs.decode._cache_size()) == before


def test_stream_yields_generate_tokens_without_recompiling(model, greedy):
    decode = engine.programs(model.backend).decode
    single = model.generate([PROMPTS[0]], NEW, stop_at_eos=False)[0]
    steps = list(model.stream(PROMPTS, NEW, stop_at_eos=False))  # the first token, then segments of 4 steps
    assert [list(col) for col in zip(*steps)] == greedy
    assert list(model.stream(PROMPTS[0], NEW, stop_at_eos=False)) == single == greedy[0]
    before = decode._cache_size()
    assert list(model.stream(PROMPTS, NEW - 3, stop_at_eos=False)) == steps[: NEW - 3]
    assert list(model.stream(PROMPTS[0], NEW - 3, stop_at_eos=False)) == single[: NEW - 3]
    assert decode._cache_size() == before  # one program for every segment of a batch size; nothing per token


def test_sampling_is_reproducible_and_seeded(model):
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.95, stop_at_eos=False)
    first = model.generate(PROMPTS, NEW, seed=7, **kwargs)
    assert first == model.generate(PROMPTS, NEW, seed=7, **kwargs)
    assert first != model.generate(PROMPTS, NEW, seed=8, **kwargs)
    steps = list(model.stream(PROMPTS, NEW, seed=7, **kwargs))  # the same draws, segment by segment
    assert [list(col) for col in zip(*steps)] == first


@pytest.mark.parametrize("n, expected", [(1, 16), (16, 16), (17, 24), (25, 32), (33, 48), (1000, 1024),
                                         (8193, 12288)])
def test_buckets_are_two_per_octave(n, expected):
    assert prefill.bucket(n) == expected


def test_prefill_chunks_and_cache_slots(model):
    cfg = model.config
    assert [prefill.default_chunk(cfg, rows) for rows in (1, 2, 8, 32)] == [2048, 1024, 256, 256]
    assert prefill.default_chunk(cfg.replace(sliding_window=5), 1) == 256  # the ring grows with the chunk
    assert prefill.cache_slots(cfg, 150) == 192 and prefill.cache_slots(cfg, 40) == 48  # buckets
    clipped = cfg.replace(max_seq_len=1000)
    assert prefill.cache_slots(clipped, 900) == 1024 and key_block(1024) == 256  # not 1000 slots in one pass


@pytest.mark.parametrize("prompts, new, settings, message", [
    ([list(range(1, 90)) * 2 + [1] * 60], 20, {}, "context of 256"),
    ([[1, 2]], 255, {}, "context of 256"),
    ([[]], 4, {}, "non-empty"),
    ([[1, 96]], 4, {}, "outside"),
    ([[1, 2]], -1, {}, "non-negative"),
    ([[1, 2]], 4, dict(temperature=-1.0), "temperature"),
    ([[1, 2]], 4, dict(top_k=0), "top_k"),
    ([[1, 2]], 4, dict(top_p=1.5), "top_p"),
])
def test_bad_prompts_and_settings_are_clear_errors(model, prompts, new, settings, message):
    with pytest.raises(MixtralError, match=message):
        model.generate(prompts, new, **settings)


@pytest.mark.parametrize("run", [lambda model: gen.generate(model, [[1, 5, 9]], 2, chunk=0),
                                 lambda model: prefill.score(model, [1, 5, 9], chunk=0)], ids=["generate", "score"])
def test_a_prefill_chunk_below_one_is_a_clear_error(model, run):
    with pytest.raises(MixtralError, match="chunk must be >= 1"):
        run(model)
