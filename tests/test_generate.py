"""Generation: greedy equals transformers' generate, cached decode equals a full forward pass, ragged
batches, EOS, buckets that do not recompile, sliding-window caches, streaming, and clear errors."""

import numpy as np
import pytest
import torch
from transformers import MixtralForCausalLM

import mixtral_jax
from mixtral_jax import generate as gen
from mixtral_jax.errors import MixtralError
from tests import reference

PROMPTS = [[1, 17, 42, 5, 88, 23, 9], [1, 60], [1, 3, 70, 71, 33, 12, 50, 8]]  # with 24 new: one bucket
NEW = 24
LONG = [1, 3, 70, 71, 33, 12, 50, 8, 19, 44, 2, 95, 61]


def _hf_greedy(folder, prompts, n):
    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    outs = [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0) for p in prompts]
    return [out[0, len(p):].tolist() for p, out in zip(prompts, outs)]


@pytest.fixture(scope="module")
def model(hf_mixtral):
    return mixtral_jax.load(hf_mixtral, dtype="float32")


@pytest.fixture(scope="module")
def greedy(model):
    """The ragged batch PROMPTS, greedy, without stopping at EOS."""
    return model.generate(PROMPTS, NEW, stop_at_eos=False)


@pytest.fixture(scope="module")
def window_checkpoint(tmp_path_factory):
    return reference.make_hf_checkpoint(tmp_path_factory.mktemp("window"), sliding_window=5)


def test_greedy_equals_transformers_generate(greedy, hf_mixtral):
    assert [len(new) for new in greedy] == [NEW] * len(PROMPTS)
    assert greedy == _hf_greedy(hf_mixtral, PROMPTS, NEW)


def test_ragged_batch_equals_single_prompts(model, greedy):
    assert greedy == [model.generate([p], NEW, stop_at_eos=False)[0] for p in PROMPTS]


def test_cached_decode_equals_full_forward(model):
    """Greedy tokens from the cache are the argmax of one uncached forward pass over prompt + tokens."""
    new = gen.generate(model, [LONG], 12, stop_at_eos=False, chunk=4)[0]  # prefill in 4 chunks
    logits = np.asarray(model.logits([LONG + new]))[0, len(LONG) - 1 : -1]
    assert new == logits.argmax(-1).tolist()


def test_chunked_scores_equal_full_forward_and_transformers(model, hf_mixtral):
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 37).tolist()
    ref = reference.hf_logprobs(hf_mixtral, np.asarray([ids]))[0]
    ref = ref[np.arange(len(ids) - 1), ids[1:]]
    for chunk in (8, 256):  # 5 chunks with a padded tail; one pass
        assert np.abs(gen.score(model, ids, chunk=chunk) - ref).max() <= 2e-4


def test_sliding_window_decode_equals_transformers_with_a_bounded_cache(window_checkpoint):
    model = mixtral_jax.load(window_checkpoint, dtype="float32")
    assert gen.generate(model, [LONG], 16, stop_at_eos=False) == _hf_greedy(window_checkpoint, [LONG], 16)
    run = gen._Run(model, [LONG], 200, 0.0, None, None, 0, False, 8)
    assert run.prefill().cache.slots == 5 + 8 - 1  # window + chunk - 1, not prompt + 200


def test_rows_stop_at_their_first_eos(model, greedy):
    eos = greedy[0][3]
    stopped = model.with_options(eos_id=eos).generate(PROMPTS, NEW)
    assert sum(map(len, stopped)) < sum(map(len, greedy))
    for row, full in zip(stopped, greedy):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:end]


def test_prompt_lengths_in_one_bucket_compile_once(model):
    model.generate([[1, 2, 3]], 5)
    before = (gen.prefill._cache_size(), gen.decode._cache_size())
    for n in (4, 9, 11):  # pad to 16 positions, need <= 16 cache slots; 5 and 7 new tokens share 8 slots
        model.generate([list(range(1, n + 1))], 7 if n == 9 else 5)
    assert (gen.prefill._cache_size(), gen.decode._cache_size()) == before


def test_stream_yields_generate_tokens_without_recompiling(model, greedy):
    single = model.generate([PROMPTS[0]], NEW, stop_at_eos=False)[0]
    before = gen.decode._cache_size()
    steps = list(model.stream(PROMPTS, NEW, stop_at_eos=False))  # 6 segments of 4 steps
    assert [list(col) for col in zip(*steps)] == greedy
    assert list(model.stream(PROMPTS[0], NEW, stop_at_eos=False)) == single == greedy[0]
    assert gen.decode._cache_size() == before  # the shapes generate compiled; nothing per token


def test_sampling_is_reproducible_and_seeded(model):
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.95, stop_at_eos=False)
    first = model.generate(PROMPTS, 16, seed=7, **kwargs)
    assert first == model.generate(PROMPTS, 16, seed=7, **kwargs)
    assert first != model.generate(PROMPTS, 16, seed=8, **kwargs)


@pytest.mark.parametrize("prompts, new, settings, message", [
    ([list(range(1, 90)) * 2 + [1] * 60], 20, {}, "context of 256"),
    ([[1, 2]], 255, {}, "context of 256"),
    ([[]], 4, {}, "non-empty"),
    ([[1, 96]], 4, {}, "outside"),
    ([[1, 2]], 4, dict(temperature=-1.0), "temperature"),
    ([[1, 2]], 4, dict(top_k=0), "top_k"),
    ([[1, 2]], 4, dict(top_p=0.0), "top_p"),
])
def test_bad_prompts_and_settings_are_clear_errors(model, prompts, new, settings, message):
    with pytest.raises(MixtralError, match=message):
        model.generate(prompts, new, **settings)
