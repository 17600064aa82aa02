"""The decode slots: what a request produces does not depend on what else runs beside it."""

import numpy as np
import pytest

import mixtral_jax
from mixtral_jax.backends.cpu import CpuBackend
from mixtral_jax.engine import Engine
from mixtral_jax.errors import MixtralError

PROMPT_LENGTHS, LIMITS = (5, 17, 40, 9), (12, 7, 20, 4)


@pytest.fixture(scope="module")
def tiny():
    return mixtral_jax.init_random("tiny", seed=0, dtype="float32")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 1000, n).tolist() for n in PROMPT_LENGTHS]


def _run(engine: Engine, prompts, limits, sampled=None) -> list[list[int]]:
    """Every prompt through the engine, admitted as slots free up, each request's tokens collected;
    `sampled`: the sampling settings of some requests, by index (the others greedy)."""
    got, owner, queue = [[] for _ in prompts], {}, list(range(len(prompts)))
    while queue or engine.busy:
        while queue and engine.free():
            i = queue.pop(0)
            slot, first = engine.admit(prompts[i], limits[i], stop_at_eos=False, **(sampled or {}).get(i, {}))
            owner[slot] = i
            got[i].append(first)
        new = engine.step()
        for slot, i in owner.items():
            got[i] += [int(t) for t in new[:, slot] if t >= 0]
        for slot in engine.finished():
            del owner[slot]
    return got


@pytest.mark.parametrize("backend", ["split", "gpu"])  # the CPU's own cache layout, and the token-major one
def test_greedy_requests_equal_generate_whatever_runs_beside_them(tiny, prompts, backend):
    model = tiny.with_backend(CpuBackend(split=True) if backend == "split" else backend)
    want = [model.generate([p], n, stop_at_eos=False)[0] for p, n in zip(prompts, LIMITS)]
    assert _run(Engine(model, slots=3, max_len=128, steps=4), prompts, LIMITS) == want


def test_a_seeded_request_samples_the_same_tokens_beside_any_others(tiny, prompts):
    sampled = {0: dict(temperature=0.8, top_k=50, top_p=0.9, seed=7)}
    alone = _run(Engine(tiny, slots=1, max_len=128, steps=3), prompts[:1], LIMITS[:1], sampled)
    busy = _run(Engine(tiny, slots=4, max_len=128, steps=5), prompts, LIMITS, sampled)
    assert alone[0] == busy[0]
    greedy = _run(Engine(tiny, slots=1, max_len=128, steps=3), prompts[:1], LIMITS[:1])
    assert alone[0] != greedy[0]  # it did sample


def test_a_cancelled_slot_is_free_and_produces_nothing_more(tiny, prompts):
    engine = Engine(tiny, slots=2, max_len=128, steps=2)
    a, _ = engine.admit(prompts[0], 50)
    b, _ = engine.admit(prompts[1], 50)
    with pytest.raises(MixtralError, match="all 2 slots are busy"):
        engine.admit(prompts[2], 5)
    engine.cancel(a)
    assert engine.free() == [a]
    new = engine.step()
    assert (new[:, a] == -1).all() and (new[:, b] >= 0).all()


def test_bad_requests_are_refused(tiny):
    engine = Engine(tiny, slots=1, max_len=64)
    with pytest.raises(MixtralError, match="exceeds"):
        engine.admit([5] * 60, 10)
    with pytest.raises(MixtralError, match="temperature"):
        engine.admit([5], 3, temperature=-1)
    with pytest.raises(MixtralError, match="outside"):
        engine.admit([10**6], 3)
    assert engine.free() == [0]
