"""Quantising while loading: each weight is placed on its devices first, then written slice by slice."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import demo, loading
from mixtral_jax.convert.writer import convert

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return convert(demo.path(), tmp_path_factory.mktemp("quantizing-load") / "bf16", progress=False)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_reader_of_whole_weights_quantizes_as_the_slice_reader_does(folder, fmt):
    """A training OUTPUT's reader gives whole weights: they are quantised slice by slice all the same, into the
    same leaves, dtypes and shardings."""
    model = mixtral_jax.load(folder, backend="reference", quantize=fmt)
    by_slice = model.checkpoint_params()
    targets = {path: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for path, a in by_slice.items()}
    whole = loading.QuantizingReader(loading.OrbaxReader(folder, slices=False), model.config).arrays(targets)
    for path, a in by_slice.items():
        assert whole[path].dtype == a.dtype and whole[path].sharding == a.sharding, path
        np.testing.assert_array_equal(np.asarray(whole[path]), np.asarray(a), err_msg=path)


FILLING = """
import itertools, warnings
warnings.simplefilter("error")  # a donated leaf that is not updated in place warns
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mixtral_jax import loading, sharding as sh
mesh = sh.as_mesh("fsdp=2,tensor=2,expert=2")
cases = [((2, 4, 8, 8), P(None, "expert", "fsdp", "tensor")),  # int4 bytes sharded as the leaf
         ((2, 4, 8, 6), P(None, "expert", "fsdp", "tensor")),  # 3 bytes a row: their last axis whole
         ((3, 8, 7), P(None, ("fsdp", "expert"), None)),  # an odd last axis
         ((8, 8), P("fsdp", "tensor"))]  # no stacked axes: one slice
rng = np.random.default_rng(0)
for (shape, spec), dtype in itertools.product(cases, (jax.numpy.int4, np.int8, np.float32)):
    target = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    want = rng.integers(-8, 8, shape).astype(dtype)
    filling = loading._Filling(target)
    for index in itertools.product(*map(range, shape[:len(shape) - 2])):
        filling.write(index, want[index])
    got = filling.done()
    assert got.dtype == dtype and got.sharding == target.sharding, (shape, spec, dtype, got.sharding)
    np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want.astype(np.float32))
print("ok")
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_leaves_filled_slice_by_slice_keep_their_sharding_and_dtype_on_a_mesh():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", FILLING], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok"], proc.stderr[-3000:]
