"""`mixtral-jax serve` through the official `openai` client: what each request gets does not depend on what
else is in flight, streamed text equals whole text, and bad input is a 4xx while the server goes on."""

import concurrent.futures
import socket
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from mixtral_jax import demo  # noqa: E402
from mixtral_jax.engine import Engine  # noqa: E402
from mixtral_jax.serve.app import Metrics, create_app  # noqa: E402
from mixtral_jax.serve.scheduler import Scheduler  # noqa: E402

MAX_LEN = 64


@pytest.fixture(scope="session")  # one server per worker, whichever modules run between its tests
def served():
    """The demo model behind a server on 127.0.0.1 (4 slots, 3 decode steps a round), its scheduler and app."""
    model = demo.load(dtype="float32")
    engine = Engine(model, slots=4, max_len=MAX_LEN, steps=3)
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


def _offline(model, prompt: str, max_tokens: int) -> tuple[str, str]:
    """The text and finish reason `generate --temperature 0` gives."""
    tok = model.tokenizer
    ids = model.generate([tok.encode(prompt)], max_tokens)[0]
    stopped = bool(ids) and ids[-1] == tok.eos_id
    return tok.decode(ids[:-1] if stopped else ids), "stop" if stopped else "length"


def test_concurrent_greedy_completions_equal_offline_generate(served):
    model, client, _, _ = served
    rng = np.random.default_rng(0)
    words = "def class return import self value list the of for in if else while".split()
    jobs = [(" ".join(rng.choice(words, rng.integers(1, 14))), int(rng.integers(1, 20))) for _ in range(8)]

    def ask(job):
        prompt, limit = job
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=limit, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, limit), (text, reason, used) in zip(jobs, answers):
        assert (text, reason) == _offline(model, prompt, limit), prompt
        assert 1 <= used <= limit


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


def test_bad_requests_are_4xx_with_an_error_body_and_the_server_goes_on(served):
    model, client, app, scheduler = served
    http = TestClient(app)
    for body, needle in (({"prompt": "x", "max_tokens": MAX_LEN + 1}, "exceed the context"),
                         ({"prompt": "x", "n": 2}, "one choice"),
                         ({"prompt": "x", "temperature": -1}, "temperature"),
                         ({"prompt": [10**6]}, "token ids"),
                         ({"max_tokens": 3}, "prompt")):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400
    assert http.get("/health").json() == {"status": "ok"}
    locked = TestClient(create_app(scheduler, Metrics(), "demo", MAX_LEN, api_key="k"))
    assert locked.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 401
    assert locked.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers={"Authorization": "Bearer k"}).status_code == 200
    assert client.completions.create(model="demo", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None
    metrics = http.get("/metrics").text
    assert 'mixtral_requests_total{outcome="rejected"}' in metrics and "mixtral_time_to_first_token_seconds" in metrics


def test_the_command_serves_the_demo_model_and_ends_on_ctrl_c():
    import json
    import signal
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = str(Path(sys.executable).with_name("mixtral-jax"))
    proc = subprocess.Popen([cli, "serve", "--port", str(port), "--max-len", "24", "--max-slots", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5))
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
                time.sleep(0.5)
        assert models["data"][0]["max_model_len"] == 24
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(model="mixtral-jax", prompt="def", max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == ""
    assert "compiled prefill for 2 prompt lengths" in err and f"http://127.0.0.1:{port}/v1" in err
