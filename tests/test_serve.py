"""`mixtral-jax serve` through the official `openai` client: what each request gets does not depend on what
else is in flight, streamed text equals whole text, and bad input is a 4xx while the server goes on."""

import asyncio
import concurrent.futures
import gc
import json
import re
import signal
import socket
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import httpx2  # noqa: E402  (the openai client's)
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from mixtral_jax import demo  # noqa: E402
from mixtral_jax.engine import Engine, programs  # noqa: E402
from mixtral_jax.serve.app import Metrics, create_app  # noqa: E402
from mixtral_jax.serve.scheduler import Job, Scheduler  # noqa: E402

MAX_LEN = 64


@pytest.fixture(scope="session")  # one server per worker, whichever modules run between its tests
def served():
    """The demo model behind a server on 127.0.0.1 (4 slots, 3 decode steps a round, prompts prefilled 16 tokens
    a round, up to 5 alternatives per token), its scheduler and app."""
    model = demo.load(dtype="float32")
    engine = Engine(model, slots=4, max_len=MAX_LEN, steps=3, chunk=16, logprobs=5)
    engine.compile_all()
    metrics = Metrics()
    scheduler = Scheduler(engine, model.tokenizer, metrics.observe)
    scheduler.start()
    app = create_app(scheduler, metrics, "demo", engine.max_len)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    yield model, client, app, scheduler
    server.should_exit = True
    thread.join(timeout=10)
    scheduler.stop()


def _offline(model, prompts: list[list[int]], limits: list[int]) -> list[tuple[str, str]]:
    """The text and finish reason `generate --temperature 0` gives each prompt at its limit: one ragged batch
    to the largest limit (a row's tokens do not depend on the others), each row cut at its own."""
    tok = model.tokenizer
    answers = []
    for ids, limit in zip(model.generate(prompts, max(limits)), limits):
        ids = ids[:limit]
        stopped = tok.eos_id in ids
        answers.append((tok.decode(ids[: ids.index(tok.eos_id)] if stopped else ids), "stop" if stopped else "length"))
    return answers


def test_concurrent_greedy_requests_of_both_kinds_equal_offline_generate(served):
    """32 requests at once through 4 slots: completions and chats, whole and streamed, of mixed prompt lengths
    and limits; each gets what greedy `generate` gives its prompt alone, and none compiles a program."""
    model, client, _, _ = served
    rng = np.random.default_rng(0)
    words = "def class return import self value list the of for in if else while".split()
    jobs = [(" ".join(rng.choice(words, rng.integers(1, 14))), int(rng.integers(1, 20)), i % 2 == 1, i % 4 >= 2)
            for i in range(32)]  # (prompt, limit, chat, streamed)

    def ask(job):
        prompt, limit, chat, streamed = job
        ask = dict(model="demo", max_tokens=limit, temperature=0)
        if streamed:
            ask.update(stream=True, stream_options={"include_usage": True})
        if chat:
            answer = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **ask)
        else:
            answer = client.completions.create(prompt=prompt, **ask)
        if streamed:
            chunks = list(answer)
            choices = [c.choices[0] for c in chunks if c.choices]
            pieces = [c.delta.content or "" for c in choices] if chat else [c.text for c in choices]
            usage = chunks[-1].usage
        else:
            choices, usage = answer.choices, answer.usage
            pieces = [choices[0].message.content if chat else choices[0].text]
        return "".join(pieces), choices[-1].finish_reason, usage.completion_tokens

    compiled = programs(model.backend)
    before = [program._cache_size() for program in compiled]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert [program._cache_size() for program in compiled] == before  # start-up compiled every program it ran
    tok = model.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) if chat else tok.encode(p) for p, _, chat, _ in jobs]
    for job, expected, (text, reason, used) in zip(jobs, _offline(model, prompts, [j[1] for j in jobs]), answers):
        assert (text, reason) == expected, job
        assert 1 <= used <= job[1]


def test_a_streamed_completion_equals_the_whole_one(served):
    _, client, _, _ = served
    whole = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "def add(a, b):"}],
                                           max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_repeats_and_a_stop_string_ends_the_text_before_it(served):
    _, client, _, _ = served
    ask = dict(model="demo", prompt="import os\n", max_tokens=30, temperature=0.9, top_p=0.95, seed=11)
    first, again = (client.completions.create(**ask).choices[0].text for _ in range(2))
    assert first == again
    whole = client.completions.create(model="demo", prompt="def f(x):", max_tokens=30, temperature=0)
    stop = whole.choices[0].text.strip()[:3]
    cut = client.completions.create(model="demo", prompt="def f(x):", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == whole.choices[0].text[: whole.choices[0].text.index(stop)]


def test_log_probabilities_are_the_models_whole_and_streamed(served):
    """A completion's `logprobs` (OpenAI's parallel lists) and a streamed chat's (`content` entries) hold each
    token's log-probability as `score` gives it, and its likeliest alternatives, a greedy token first."""
    model, client, _, _ = served
    tok = model.tokenizer
    r = client.completions.create(model="demo", prompt="def add(a, b):", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ids = model.generate([tok.encode("def add(a, b):")], 6)[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len([i for i in ids if i != tok.eos_id])
    assert lp.tokens == [tok.token_bytes(i).decode() for i in ids[: len(lp.tokens)]]
    scored = model.score(tok.encode("def add(a, b):") + ids)[-len(ids):]
    np.testing.assert_allclose(lp.token_logprobs, scored[: len(lp.tokens)], atol=1e-4)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(chosen, abs=1e-6)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    entries = []
    for chunk in client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            entries += chunk.choices[0].logprobs.content
        usage = chunk.usage
    assert 0 < len(entries) <= usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token and e.logprob <= 0
               and bytes(e.bytes) == e.token.encode() for e in entries)
    with pytest.raises(openai.BadRequestError, match="at most 5 alternatives"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logprobs=True, top_logprobs=6)


def test_n_choices_of_one_prompt_whole_and_streamed(served):
    """`n` choices: greedy ones are alike and each is what one greedy request gets; seeded sampled ones differ,
    choice i samples as a request with seed + i does, and streamed chunks (told apart by `index`) join to the
    whole response's choices; usage counts the prompt once and every choice's tokens."""
    _, client, _, _ = served
    one = client.completions.create(model="demo", prompt="def f(x):", max_tokens=8, temperature=0)
    three = client.completions.create(model="demo", prompt="def f(x):", max_tokens=8, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [one.choices[0].text] * 3
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    ask = dict(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=1.0, seed=5)
    whole = client.chat.completions.create(n=2, **ask)
    texts = [c.message.content for c in whole.choices]
    assert texts[0] != texts[1]
    assert client.chat.completions.create(**{**ask, "seed": 6}).choices[0].message.content == texts[1]
    pieces, reasons = {0: [], 1: []}, {}
    for chunk in client.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **ask):
        for choice in chunk.choices:
            pieces[choice.index].append(choice.delta.content or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
        usage = chunk.usage
    assert ["".join(pieces[i]) for i in (0, 1)] == texts
    assert [reasons[i] for i in (0, 1)] == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_penalties_and_logit_bias_reach_the_sampler(served):
    """A logit bias of 100 makes a greedy completion that token over and over; -100 on the greedy first token
    makes it another; negative penalties make the model repeat itself (a random model seldom does)."""
    model, client, _, _ = served
    tok = model.tokenizer
    token = tok.encode("hello")[-1]
    forced = client.completions.create(model="demo", prompt="x", max_tokens=5, temperature=0,
                                       logit_bias={str(token): 100})
    assert forced.choices[0].text == tok.decode([token] * 5)
    greedy = model.generate([tok.encode("x")], 6, stop_at_eos=False)[0]
    banned = client.completions.create(model="demo", prompt="x", max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(greedy[0]): -100})
    assert banned.choices[0].logprobs.tokens[0] != tok.token_bytes(greedy[0]).decode()
    ask = dict(model="demo", prompt="x", max_tokens=6, temperature=0, logprobs=0)
    until_eos = greedy[: greedy.index(tok.eos_id)] if tok.eos_id in greedy else greedy
    assert client.completions.create(**ask).choices[0].logprobs.tokens == [tok.token_bytes(i).decode()
                                                                           for i in until_eos]
    repeated = client.completions.create(presence_penalty=-2, frequency_penalty=-2, **ask).choices[0].logprobs.tokens
    assert len(set(repeated)) < len(repeated)


def test_bad_requests_are_4xx_with_an_error_body_and_the_server_goes_on(served):
    model, client, app, scheduler = served
    http = TestClient(app)
    for body, needle, param in (({"prompt": "x", "max_tokens": MAX_LEN + 1}, "exceed the context", "max_tokens"),
                                ({"prompt": "x", "n": 5}, "at most 4 choices", "n"),
                                ({"prompt": "x", "temperature": -1}, "temperature", "temperature"),
                                ({"prompt": [10**6]}, "token ids", "prompt"),
                                ({"max_tokens": 3}, "prompt", "prompt"),
                                ({"prompt": "x", "model": "gpt-4"}, "not 'gpt-4'", "model"),
                                ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty", "presence_penalty"),
                                ({"prompt": "x", "logit_bias": {"7": 101}}, "[-100, 100]", "logit_bias"),
                                ({"prompt": "x", "logit_bias": {"x": 1}}, "not a token id", "logit_bias"),
                                ({"prompt": "x", "suffix": "y"}, "suffix", "suffix"),
                                ({"prompt": "x", "echo": True}, "echo", "echo")):
        r = http.post("/v1/completions", json=body)
        error = r.json()["error"]
        assert r.status_code == 400 and needle in error["message"] and error["param"] == param, (body, r.text)
    for extra, param in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, None)):
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **extra})
        assert r.status_code == 400 and (param is None or r.json()["error"]["param"] == param), (extra, r.text)
    assert http.post("/v1/completions", json={"prompt": "x", "model": "demo", "max_tokens": 1}).status_code == 200
    assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                                                   "tools": [], "response_format": {"type": "text"}}).status_code == 200
    assert http.get("/health").json() == {"status": "ok"}
    locked = TestClient(create_app(scheduler, Metrics(), "demo", MAX_LEN, api_key="k"))
    for headers in ({}, {"Authorization": "Bearer kk"}, {"Authorization": b"Bearer \xe9"}):
        r = locked.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (headers, r.text)
    assert locked.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers={"Authorization": "Bearer k"}).status_code == 200
    assert client.completions.create(model="demo", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None
    metrics = http.get("/metrics").text
    assert 'mixtral_requests_total{outcome="rejected"}' in metrics and "mixtral_time_to_first_token_seconds" in metrics


def test_past_the_slots_and_the_queue_a_request_is_a_429_with_retry_after(served):
    """With no queue, one request a slot is taken; the next is refused at once with OpenAI's error body and
    `Retry-After`, and once those in flight have ended a request is taken again."""
    _, _, _, scheduler = served
    metrics = Metrics()
    app = create_app(scheduler, metrics, "demo", MAX_LEN, max_queue=0)
    slots, body = scheduler.engine.n_slots, json.dumps({"prompt": "x", "max_tokens": 1}).encode()

    async def run():
        arrived, sending = [], asyncio.Event()

        async def slowly():  # a client still sending its body: its request is in flight from its arrival
            arrived.append(1)
            await sending.wait()
            yield body

        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://serve",
                                      headers={"Content-Type": "application/json"}) as http:
            held = [asyncio.create_task(http.post("/v1/completions", content=slowly())) for _ in range(slots)]
            while len(arrived) < slots:
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/completions", content=body)
            sending.set()
            return refused, await asyncio.gather(*held), await http.post("/v1/completions", content=body)

    refused, taken, again = asyncio.run(run())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "rate_limit_exceeded", None)
    assert [r.status_code for r in taken] == [200] * slots and again.status_code == 200
    assert 'mixtral_requests_total{outcome="rejected"} 1.0' in generate_latest(metrics.registry).decode()


def test_a_body_past_the_limit_is_a_413_whether_its_length_is_declared_or_not(served):
    _, client, _, scheduler = served
    small = TestClient(create_app(scheduler, Metrics(), "demo", MAX_LEN, max_body_bytes=1000))
    declared = small.post("/v1/completions", json={"prompt": "x" * 1000})
    chunked = small.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * 1000, b'"}']))
    assert "content-length" not in chunked.request.headers
    for r in declared, chunked:
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert small.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    with socket.create_connection(("127.0.0.1", client.base_url.port), timeout=30) as s:  # uvicorn, 4 MiB
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: serve\r\nContent-Length: %d\r\n\r\n" % (5 * 2**20))
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")  # answered before a byte of the body is sent


def test_clients_gone_mid_stream_free_their_slots_and_leave_nothing_behind(served):
    """100 streamed requests, each dropped after its first chunk, twice: the slots are all free again, the
    disconnect ended (nearly) every request, no request's job is alive, and the second hundred grow the
    process by under 16 MiB."""
    _, client, app, _ = served
    http = TestClient(app)
    request = _raw_completion({"prompt": "def", "max_tokens": MAX_LEN - 4, "temperature": 0, "stream": True})

    def drop_after_first_chunk(_):
        with socket.create_connection(("127.0.0.1", client.base_url.port), timeout=30) as s:
            s.sendall(request)
            seen = b""
            while b"data: " not in seen:
                part = s.recv(4096)
                assert part, seen
                seen += part

    def hundred() -> float:
        """Cancelled requests among 100 dropped ones, once every slot is free again."""
        cancelled = 'mixtral_requests_total{outcome="cancelled"}'
        before = _metric(http.get("/metrics").text, cancelled)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(drop_after_first_chunk, range(100)))
        deadline = time.time() + 30
        while _metric(text := http.get("/metrics").text, "mixtral_busy_slots") > 0:
            assert time.time() < deadline, "slots still busy"
            time.sleep(0.05)
        return _metric(text, cancelled) - before

    hundred()
    rss = _rss()
    assert hundred() >= 90
    assert _rss() - rss < 16 * 2**20
    deadline = time.time() + 10  # a response's task may still be winding down when its slot is free
    gc.collect()
    while any(type(o) is Job for o in gc.get_objects()) and time.time() < deadline:
        time.sleep(0.1)
        gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Job]


def test_a_client_gone_before_its_whole_response_frees_its_slot(served):
    """A request that is not streamed, its client gone right after sending it: the wait ends and the slot is
    freed long before its token limit would have ended it."""
    _, client, app, _ = served
    http = TestClient(app)
    request = _raw_completion({"prompt": "def", "max_tokens": MAX_LEN - 4, "temperature": 0})
    cancelled = 'mixtral_requests_total{outcome="cancelled"}'
    before = _metric(http.get("/metrics").text, cancelled)
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", client.base_url.port), timeout=30) as s:
            s.sendall(request)
    deadline = time.time() + 30
    while _metric(text := http.get("/metrics").text, "mixtral_busy_slots") > 0 or _metric(text, cancelled) < before + 4:
        assert time.time() < deadline, text
        time.sleep(0.05)


def _raw_completion(body: dict) -> bytes:
    """A whole HTTP request for /v1/completions, to send on a socket that is then dropped."""
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: serve\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


def _rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/status") as status:
        return 1024 * int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_the_command_serves_the_demo_model_and_at_ctrl_c_or_sigterm_drains_then_exits_0(stop):
    """A stream running when the signal comes ends whole, the port is closed to new connections at once, and
    the command exits 0 without a traceback."""
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = str(Path(sys.executable).with_name("mixtral-jax"))
    proc = subprocess.Popen([cli, "serve", "--port", str(port), "--max-len", "24", "--max-slots", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    try:
        deadline = time.time() + 300
        while True:
            try:
                models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5))
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.5)
        assert models["data"][0]["max_model_len"] == 24
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="mixtral-jax", prompt="def", max_tokens=20, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        chunks = [next(stream)]
        proc.send_signal(getattr(signal, stop))
        deadline = time.time() + 10
        while True:  # refused from the signal on, while the stream is still being sent
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                break
            assert time.time() < deadline, "the port is still open"
            time.sleep(0.05)
        chunks += list(stream)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert out == ""
    # prompt buckets 16 and 23 (the rest of --max-len 24), alone and two at a time
    assert "compiled and warmed 4 prefill programs" in err and f"http://127.0.0.1:{port}/v1" in err
