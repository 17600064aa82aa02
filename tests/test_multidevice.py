"""Expert, data, tensor and fsdp parallelism on 8 simulated CPU devices give the single-device results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MESHES = ["expert=8", "data=2,expert=4", "tensor=2,expert=4", "data=2,tensor=2,expert=2", "fsdp=2,expert=4", "data=8"]


def run_worker(*args: str, devices: int = 8) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def mesh_results():
    results = run_worker(*MESHES)
    return results[0], {r["mesh"]: r for r in results[1:]}


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_gives_single_device_logprobs_and_greedy_tokens(mesh_results, mesh):
    single, on_mesh = mesh_results
    result = on_mesh[mesh]
    assert result["devices"] == 8
    np.testing.assert_allclose(result["logprobs"], single["logprobs"], atol=1e-5, rtol=0)
    assert result["tokens"] == single["tokens"]
