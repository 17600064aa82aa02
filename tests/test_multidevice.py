"""Expert, data, tensor and fsdp parallelism on 8 simulated CPU devices give the single-device results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MESHES = ["expert=8", "data=2,expert=4", "tensor=2,expert=4", "data=2,tensor=2,expert=2"]


@pytest.fixture(scope="module")
def mesh_results():
    """All meshes in one subprocess (one compile of the single-device programs, one JAX start-up)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker", *MESHES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    single, *results = (line for line in lines if "mesh" in line)
    return single, {r["mesh"]: r for r in results}, {r["strategy"]: r["max_abs_err"] for r in lines if "strategy" in r}


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_gives_single_device_logprobs_and_greedy_tokens(mesh_results, mesh):
    single, on_mesh, _ = mesh_results
    result = on_mesh[mesh]
    assert result["devices"] == 8
    np.testing.assert_allclose(result["logprobs"], single["logprobs"], atol=1e-5, rtol=0)
    assert result["tokens"] == single["tokens"]


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("strategy", ["reference", "grouped", "decode", "grouped/megablox"])
def test_every_strategy_runs_expert_parallel_and_equals_reference(mesh_results, strategy):
    _, _, errors = mesh_results
    assert errors[strategy] < 1e-5
