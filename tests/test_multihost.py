"""Two processes of 4 simulated CPU devices each, joined over 127.0.0.1, run one model on one mesh."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_multidevice import run_worker

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_on_data2_expert4_give_single_device_results(hf_mixtral):
    single = run_worker("--checkpoint", str(hf_mixtral), "--no-generate", devices=1)[0]
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.mesh_worker", "--checkpoint", str(hf_mixtral), "--no-generate",
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
             "--print-all-processes", "data=2,expert=4"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            outputs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    finally:
        for proc in procs:
            proc.kill()
    for i, (result,) in enumerate(outputs):
        assert (result["process"], result["devices"]) == (i, 8)
        np.testing.assert_allclose(result["logprobs"], single["logprobs"], atol=1e-5, rtol=0)
        assert result["greedy"] == single["greedy"]
