"""The mesh spec `axis=size,...`: every valid spec parses to its sizes, anything else is a ConfigError."""

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral_jax import sharding
from mixtral_jax.errors import ConfigError

AXES = sharding.MESH_AXES
spaces = st.sampled_from(["", " ", "  "])


@st.composite
def valid_specs(draw):
    names = draw(st.lists(st.sampled_from(AXES), min_size=1, max_size=4, unique=True))
    sizes = {name: draw(st.integers(1, 4096)) for name in names}
    parts = [f"{draw(spaces)}{name}{draw(spaces)}={draw(spaces)}{size}{draw(spaces)}" for name, size in sizes.items()]
    return ",".join(parts), sizes


@settings(max_examples=300, deadline=None)
@given(valid_specs())
def test_valid_spec_parses_to_its_sizes_and_missing_axes_are_one(case):
    spec, sizes = case
    parsed = sharding.parse_mesh_spec(spec)
    assert parsed == {axis: sizes.get(axis, 1) for axis in AXES}


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("datfspexnor=,0123456789 -x.\t²٣")) , max_size=30) | st.text(max_size=30))
def test_any_string_parses_or_raises_config_error(spec):
    try:
        parsed = sharding.parse_mesh_spec(spec)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert set(parsed) == set(AXES) and all(isinstance(v, int) and v >= 1 for v in parsed.values())


@pytest.mark.parametrize("spec", ["", "data", "data=0", "data=-1", "data=2,data=2", "gpu=2", "data=2,,expert=4",
                                  "data=2.0", "data=x", "expert=٣", "data=2;expert=4"])
def test_malformed_spec_raises_config_error(spec):
    with pytest.raises(ConfigError, match="mesh spec"):
        sharding.parse_mesh_spec(spec)


def test_mesh_that_does_not_match_device_count_is_config_error():
    with pytest.raises(ConfigError, match="has 2 devices but 1 are present"):
        sharding.make_mesh("data=2")


@pytest.mark.parametrize("argv,message", [
    (["plan", "--config", "tiny", "--mesh", "expert=8x"], "bad mesh spec"),
    (["generate", "--ids", "1,2", "--max-new-tokens", "1", "--mesh", "data=2"], "has 2 devices but 1 are present"),
])
def test_cli_bad_mesh_is_one_line_and_nonzero_exit(argv, message):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "mixtral_jax", *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("mixtral-jax: note:")]
    assert len(lines) == 1 and message in lines[0]
