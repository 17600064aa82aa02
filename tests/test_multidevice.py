"""Expert, data, tensor and fsdp parallelism on 8 simulated CPU devices give the single-device results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.shared import shared_result

ROOT = Path(__file__).resolve().parent.parent
MESHES = ["expert=8", "data=2,expert=4", "tensor=2,expert=4", "data=2,tensor=2,expert=2"]


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    """All meshes in one subprocess (one compile of the single-device programs, one JAX start-up), run once
    for all xdist workers."""
    lines = shared_result(tmp_path_factory, "mesh_results", _run_mesh_worker)
    single, *results = (line for line in lines if "mesh" in line and "kv_heads" not in line)
    errors = {r["strategy"]: r["max_abs_err"] for r in lines if "strategy" in r}
    kv_runs = [line for line in lines if "kv_heads" in line]
    jax_mesh = next(r["jax_mesh"] for r in lines if "jax_mesh" in r)
    quantized = next(r["quantized"] for r in lines if "quantized" in r)
    return single, {r["mesh"]: r for r in results}, errors, kv_runs, jax_mesh, quantized


def _run_mesh_worker() -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker", *MESHES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_gives_single_device_logprobs_and_greedy_tokens(mesh_results, mesh):
    single, on_mesh, *_ = mesh_results
    result = on_mesh[mesh]
    assert result["devices"] == 8
    np.testing.assert_allclose(result["logprobs"], single["logprobs"], atol=1e-5, rtol=0)
    assert result["tokens"] == single["tokens"]


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("strategy", ["reference", "grouped", "decode", "grouped/megablox", "grouped/int8"])
def test_every_strategy_runs_expert_parallel_and_equals_reference(mesh_results, strategy):
    _, _, errors, *_ = mesh_results
    assert errors[strategy] < 1e-5


@pytest.mark.slow
@pytest.mark.multidevice
def test_kv_heads_the_tensor_axis_does_not_divide_are_replicated(mesh_results):
    """1 KV head on tensor=2 and 2 KV heads on tensor=4: the single-device greedy tokens."""
    *_, kv_runs, _, _ = mesh_results
    assert [(r["kv_heads"], r["mesh"]) for r in kv_runs] == [(1, "tensor=2,expert=4"), (2, "tensor=4,expert=2")]
    for run in kv_runs:
        assert run["tokens"] == run["single"]


@pytest.mark.slow
@pytest.mark.multidevice
def test_a_jax_mesh_of_some_of_our_axes_is_accepted(mesh_results):
    """`jax.make_mesh((8,), ("expert",))` with Explicit axes: the single-device greedy tokens."""
    single, *_, tokens, _ = mesh_results
    assert tokens == single["tokens"]


@pytest.mark.slow
@pytest.mark.multidevice
def test_int4_weights_quantized_while_loading_shard_like_one_device(mesh_results):
    """The demo model, int4 weights (the embedding table and LM head included) quantised as they are read into
    `tensor=2,expert=4` shardings (scales included) and an int8 KV cache: one device's log-probs within 1e-4
    and its greedy tokens."""
    one, mesh = mesh_results[-1]
    np.testing.assert_allclose(mesh["logprobs"], one["logprobs"], atol=1e-4, rtol=0)
    assert mesh["tokens"] == one["tokens"]
