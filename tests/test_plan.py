"""`plan`: per-device memory from programs compiled for a mesh of placeholder devices."""

import json
import subprocess
import sys

import pytest

from mixtral_jax import plan


def plan_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mixtral_jax", "plan", *args, "--json"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    return json.loads(line)


@pytest.mark.slow
@pytest.mark.parametrize("config,mesh,devices", [("mixtral-8x7b", "expert=8", 8),
                                                 ("mixtral-8x22b", "expert=8,tensor=4", 32)])
def test_weights_per_device_are_total_over_devices(config, mesh, devices):
    out = plan_json("--config", config, "--mesh", mesh, "--batch", "1", "--max-len", "4096",
                    "--dtype", "bfloat16", "--chip", "h200")
    per_device = out["per_device"]
    ideal = out["param_count"] * 2 / devices
    assert out["devices"] == devices
    assert abs(per_device["params_bytes"] / ideal - 1) < 0.01
    assert per_device["total_bytes"] > per_device["params_bytes"] + per_device["cache_bytes"]
    assert per_device["temp_bytes"] < 0.25 * per_device["params_bytes"]  # measured 0.08 to 0.15
    assert out["fits"] is True


def test_cache_bytes_follow_batch_and_length_and_tensor_split():
    # tiny: 2 layers, 2 KV heads of 16, float32: k and v = 2 * 2 * B * S * 2 * 16 * 4 bytes (+ positions)
    one = plan.plan("tiny", "tensor=2", batch=2, max_len=64, dtype="float32")
    assert one.cache_bytes == 2 * 2 * 2 * 64 * 1 * 16 * 4 + 2 * 64 * 4
    assert one.params_bytes == pytest.approx(one.param_count * 4 / 2, rel=0.01)
    assert not one.fits(one.total_bytes / plan.GIB * 0.99) and one.fits(one.total_bytes / plan.GIB)


def test_chip_names_and_unknown_chip_and_indivisible_mesh():
    from mixtral_jax.errors import ConfigError

    assert plan.hbm_of("v5e") == plan.hbm_of("TPU-v5e") == 16
    with pytest.raises(ConfigError, match="unknown chip"):
        plan.hbm_of("tpu-v9")
    with pytest.raises(ConfigError, match=r"the mesh axis tensor=8 does not divide the 4 query heads of "
                                          r"layers.attn.wo \[2, 4, 16, 64\] \(dimension 1\)"):
        plan.plan("tiny", "tensor=8", max_len=64)


@pytest.mark.slow
def test_the_accelerator_benchmark_runs_on_whatever_device_jax_has(tmp_path):
    """`python -m benchmarks.accelerator --quick` (a tiny model on the CPU here): one row per backend and weight
    format asked for (int4 here, to keep the test short), each with decode and prefill throughput and their
    fractions of the device's limits."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "rows.json"
    argv = ["--quick", "--new", "8", "--weights", "int4", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", *argv],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backend"].split()[0], r["weights"]) for r in rows] == [
        (backend, "int4") for backend in ("cpu", "reference")]
    assert all(r["decode b1 tok/s"] > 0 and r["prefill tok/s"] > 0 and r["prefill of limit"] > 0 for r in rows)
    assert "| backend | weights | decode b1 tok/s |" in proc.stdout
