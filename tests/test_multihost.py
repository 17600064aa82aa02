"""Two processes of 4 simulated CPU devices each, joined over 127.0.0.1: one `generate` command, and
checkpoint reads split between the hosts."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["1,5,7,9,11,13,2,40", "3,4,5"]


def cpu_env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def json_lines(stdout: str) -> list[dict]:
    """Every line of a stdout that must hold JSON lines and nothing else (no library output mixed in)."""
    return [json.loads(line) for line in stdout.splitlines()]


def two_processes(command) -> list[list[dict]]:
    """Run `command(coordinator, process_id)` as processes 0 and 1 of 4 CPU devices each; their JSON lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen(command(coordinator, i), cwd=ROOT, env=cpu_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(json_lines(out))
    finally:
        for proc in procs:
            proc.kill()
    return outputs


def generate_command(checkpoint: Path, *flags: str) -> list[str]:
    ids = [arg for prompt in PROMPTS for arg in ("--ids", prompt)]
    return [sys.executable, "-m", "mixtral_jax", "generate", "--checkpoint", str(checkpoint), *ids,
            "--temperature", "0", "--max-new-tokens", "6", "--json", *flags]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_on_data2_expert4_both_print_single_device_tokens(hf_mixtral):
    single = subprocess.run(generate_command(hf_mixtral), env=cpu_env(1), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = [line["ids"] for line in json_lines(single.stdout)]
    assert len(expected) == 2 and all(len(ids) > 0 for ids in expected)

    outputs = two_processes(lambda coordinator, i: generate_command(
        hf_mixtral, "--mesh", "data=2,expert=4", "--coordinator-address", coordinator, "--num-processes", "2",
        "--process-id", str(i), "--print-all-processes"))
    assert [[line["ids"] for line in out] for out in outputs] == [expected, expected]


@pytest.mark.slow
@pytest.mark.multidevice
def test_each_host_reads_only_its_half_of_the_checkpoint(hf_mixtral):
    # expert=4,tensor=2 over 2 hosts: each host's devices hold 2 of the 4 experts and half of every other
    # weight's rows (norms, replicated, are a fraction of a percent).
    outputs = two_processes(lambda coordinator, i: [
        sys.executable, "-m", "tests.shard_reads_worker", str(hf_mixtral), "expert=4,tensor=2", coordinator, "2",
        str(i)])
    for i, (result,) in enumerate(outputs):
        assert result["process"] == i
        assert result["read_bytes"] / result["model_bytes"] == pytest.approx(0.5, abs=0.01)


def test_a_process_whose_coordinator_never_answers_fails_in_one_line_after_its_timeout():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.run(generate_command(Path("unused"), "--coordinator-address", address, "--num-processes", "2",
                                           "--process-id", "1", "--coordinator-timeout", "2"),
                          cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"mixtral-jax: process 1 of 2: waiting for the coordinator at {address}",
        f"mixtral-jax generate: error: process 1 of 2: the coordinator at {address} did not answer within "
        "--coordinator-timeout (Connection refused); is process 0 running?"]


@pytest.mark.parametrize("flags,message", [(("127.0.0.1:1", None, None), "needs all of"),
                                           (("127.0.0.1:1", 2, 2), r"--process-id must be in \[0, 2\)")])
def test_incomplete_or_inconsistent_multihost_flags_are_config_errors(flags, message):
    from mixtral_jax import distributed
    from mixtral_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        distributed.initialize(*flags)


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_serve_from_process_0_what_one_process_generates():
    """`serve` on expert=4,tensor=2 over two hosts: process 0 listens and hands each round's plan to process 1;
    concurrent greedy completions equal the single-process ones; SIGTERM to process 0 ends both with 0."""
    openai = pytest.importorskip("openai")
    import signal
    import threading
    import time
    import urllib.request

    from mixtral_jax import demo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "mixtral_jax", "serve", "--dtype", "float32", "--port", str(port),
                               "--max-len", "40", "--max-slots", "2", "--mesh", "expert=4,tensor=2",
                               "--coordinator-address", coordinator, "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.time() + 400
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert all(p.poll() is None for p in procs) and time.time() < deadline, "the server did not start"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        jobs = [("def add(a, b):", 12), ("import numpy as", 5), ("class Stack:\n    def", 9), ("x = [", 16)]
        answers = [None] * len(jobs)

        def ask(i):
            prompt, limit = jobs[i]
            answers[i] = client.completions.create(model="mixtral-jax", prompt=prompt, max_tokens=limit,
                                                   temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]  # 4 requests, 2 slots
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        procs[0].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    model = demo.load(dtype="float32")
    tok = model.tokenizer
    prompts = [tok.encode(prompt) for prompt, _ in jobs]
    rows = model.generate(prompts, max(limit for _, limit in jobs), stop_at_eos=True)
    expected = []
    for row, (_, limit) in zip(rows, jobs):
        row = row[:limit]
        expected.append(tok.decode(row[:-1] if row and row[-1] == tok.eos_id else row))
    assert answers == expected
