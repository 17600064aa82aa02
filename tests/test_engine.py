"""The decode slots: what a request produces does not depend on what else runs beside it."""

import numpy as np
import pytest

import mixtral_jax
from mixtral_jax.backends.cpu import CpuBackend
from mixtral_jax.engine import Engine, programs
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
    """Every prompt through the engine, admitted as slots free up, each request's tokens collected (the first
    ones as `prefill` hands them over); `sampled`: the sampling settings of some requests, by index (the
    others greedy)."""
    got, owner, queue = [[] for _ in prompts], {}, list(range(len(prompts)))
    while queue or engine.busy:
        while queue and engine.free():
            i = queue.pop(0)
            owner[engine.admit(prompts[i], limits[i], stop_at_eos=False, **(sampled or {}).get(i, {}))] = i
        ready = []  # each first token as its prompt completes, as the server sends it
        completed = engine.prefill(ready=lambda slot, first: ready.append((slot, int(first.ids[0]))))
        assert ready == [(slot, int(first.ids[0])) for slot, first in completed]
        for slot, token in ready:
            got[owner[slot]].append(token)
        if engine.decoding():
            new = engine.step().ids
            for slot, i in owner.items():
                got[i] += [int(t) for t in new[:, slot] if t >= 0]
        for slot in engine.finished():
            del owner[slot]
    return got


# the CPU's own cache layout, prompts prefilled 16 tokens a round between decode rounds; the token-major
# layout, short prompts prefilled together
@pytest.mark.parametrize("backend, chunk", [("split", 16), ("gpu", None)])
def test_greedy_requests_equal_generate_whatever_runs_beside_them(tiny, prompts, backend, chunk):
    model = tiny.with_backend(CpuBackend(split=True) if backend == "split" else backend)
    want = [model.generate([p], n, stop_at_eos=False)[0] for p, n in zip(prompts, LIMITS)]
    grouped = programs(model.backend).admit_rows._cache_size()
    assert _run(Engine(model, slots=3, max_len=128, steps=4, chunk=chunk), prompts, LIMITS) == want
    # the first three prompts prefilled together, unless each round takes 16 tokens only
    assert programs(model.backend).admit_rows._cache_size() == grouped + (chunk is None)


def test_log_probabilities_are_the_models(tiny, prompts):
    """Each token's log-probability is the model's (`score` of the prompt and the tokens before it), and the
    likeliest alternative of a greedy token is itself."""
    engine = Engine(tiny, slots=2, max_len=128, steps=4, logprobs=3)
    slot = engine.admit(prompts[1], 6, stop_at_eos=False, logprobs=True)
    (_, first), = engine.prefill()
    rest = engine.step(8)
    ids = np.concatenate([first.ids, rest.ids[:5, slot]])
    logprob = np.concatenate([first.logprob, rest.logprob[:5, slot]])
    top = np.concatenate([first.top_ids[:, 0], rest.top_ids[:5, slot, 0]])
    assert (rest.ids[5:, slot] == -1).all() and (top == ids).all()
    assert rest.top_logprob.shape == (8, 2, 3) and (np.diff(rest.top_logprob[:5, slot], axis=-1) <= 0).all()
    scored = tiny.score(prompts[1] + ids.tolist())[len(prompts[1]) - 1:]
    np.testing.assert_allclose(logprob, scored, atol=2e-5)


def test_a_seeded_request_samples_the_same_tokens_beside_any_others(tiny, prompts):
    sampled = {0: dict(temperature=0.8, top_k=50, top_p=0.9, seed=7)}
    alone = _run(Engine(tiny, slots=1, max_len=128, steps=3), prompts[:1], LIMITS[:1], sampled)
    busy = _run(Engine(tiny, slots=4, max_len=128, steps=5), prompts, LIMITS, sampled)
    assert alone[0] == busy[0]
    greedy = _run(Engine(tiny, slots=1, max_len=128, steps=3), prompts[:1], LIMITS[:1])
    assert alone[0] != greedy[0]  # it did sample
    settings = dict(sampled[0])
    assert tiny.generate([prompts[0]], LIMITS[0], stop_at_eos=False, **settings)[0] == alone[0]  # as generate


def _penalised_greedy(model, prompt, n, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """OpenAI's definition, on full forward passes: each next token the argmax of the logits less
    count * frequency + (count > 0) * presence over the tokens generated so far, plus the logit bias."""
    vocab = model.config.vocab_size
    counts, offset, new = np.zeros(vocab), np.zeros(vocab), []
    for token, value in (bias or {}).items():
        offset[token] = value
    for _ in range(n):
        ids = list(prompt) + new  # padded to one length: one program, and causal attention ignores the padding
        logits = np.asarray(model.logits([ids + [0] * (64 - len(ids))]))[0, len(ids) - 1]
        new.append(int(np.argmax(logits - counts * frequency - (counts > 0) * presence + offset)))
        counts[new[-1]] += 1
    return new


def test_penalties_and_logit_bias_are_openais_and_each_request_keeps_its_own(tiny, prompts):
    """Presence and frequency penalties and a logit bias change a greedy request's tokens as OpenAI defines
    them (a random model seldom repeats a token: negative penalties make it), beside a plain greedy request,
    which still gets what it gets alone."""
    engine = Engine(tiny, slots=4, max_len=128, steps=5)  # the seeded test's programs
    plain = _run(engine, prompts, LIMITS)  # greedy, as `generate` (above)
    banned = {t: -100.0 for t in plain[2][:3]}
    settings = {0: dict(presence_penalty=-1.0, frequency_penalty=-0.5), 2: dict(logit_bias=banned),
                3: dict(logit_bias={str(plain[3][1]): 100.0}, frequency_penalty=-2.0)}
    got = _run(engine, prompts, LIMITS, settings)
    assert got[1] == plain[1]
    for i, asked in settings.items():
        want = _penalised_greedy(tiny, prompts[i], LIMITS[i], asked.get("presence_penalty", 0.0),
                                 asked.get("frequency_penalty", 0.0),
                                 {int(t): v for t, v in asked.get("logit_bias", {}).items()})
        assert got[i] == want != plain[i], i
    assert got[3] == [plain[3][1]] * LIMITS[3]


def test_a_cancelled_slot_is_free_and_produces_nothing_more(tiny, prompts):
    engine = Engine(tiny, slots=2, max_len=128, steps=2)
    a = engine.admit(prompts[0], 50)
    b = engine.admit(prompts[1], 50)
    with pytest.raises(MixtralError, match="all 2 slots are busy"):
        engine.admit(prompts[2], 5)
    while engine.pending:
        engine.prefill()
    engine.cancel(a)
    assert engine.free() == [a]
    queued = engine.admit(prompts[2], 5)
    engine.cancel(queued)  # before its prefill
    assert engine.free() == [a] and not engine.pending
    new = engine.step().ids
    assert (new[:, a] == -1).all() and (new[:, b] >= 0).all()


def test_bad_requests_are_refused(tiny):
    engine = Engine(tiny, slots=1, max_len=64)
    with pytest.raises(MixtralError, match="exceeds"):
        engine.admit([5] * 60, 10)
    with pytest.raises(MixtralError, match="temperature"):
        engine.admit([5], 3, temperature=-1)
    with pytest.raises(MixtralError, match="outside"):
        engine.admit([10**6], 3)
    with pytest.raises(MixtralError, match="presence_penalty"):
        engine.admit([5], 3, presence_penalty=2.5)
    with pytest.raises(MixtralError, match="not in \\[0, "):
        engine.admit([5], 3, logit_bias={-1: 1.0})
    with pytest.raises(MixtralError, match="not in \\[-100, 100\\]"):
        engine.admit([5], 3, logit_bias={5: 101.0})
    assert engine.free() == [0]
