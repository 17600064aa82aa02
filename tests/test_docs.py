"""The docs hold: the README's Python block and command lines run as written (against the built-in demo model
and small models), and every figure the docs quote is what the code gives (`scripts/docs_figures.py`)."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mixtral_jax import demo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CLI = str(Path(sys.executable).with_name("mixtral-jax"))
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _block(heading: str, language: str) -> str:
    """The first ```language block after the README heading `heading`."""
    section = README[README.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S)[1]


def _figures():
    spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "scripts" / "docs_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_readme_python_block_runs_as_written():
    """On 8 simulated devices (its `mesh="expert=8"`), with the built-in demo model for the checkpoint path."""
    code = _block("## Python API", "python")
    assert '"path/to/Mixtral-8x7B-v0.1"' in code
    code = code.replace('"path/to/Mixtral-8x7B-v0.1"', repr(str(demo.path())))
    proc = subprocess.run([sys.executable, "-c", code], env=_env(8), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("cpu (")  # the backend's description, printed last


@pytest.mark.slow
def test_the_readme_command_lines_run_as_written(tmp_path):
    """Each line of the README's command block, with its placeholder paths pointing at the demo model (a
    Hugging Face folder with a tokenizer) and files made here; `--mesh expert=8` on 8 simulated devices."""
    (tmp_path / "essay.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 4)
    for name, source in (("a.py", "argparse.py"), ("b.py", "fractions.py")):
        (tmp_path / name).write_text((STDLIB / source).read_text())
    paths = {"./Mixtral-8x7B-v0.1": str(demo.path()), "./mixtral-8x7b-instruct": str(demo.path()),
             "./mixtral-8x7b": str(tmp_path / "mixtral-8x7b"), "./hf-folder": str(tmp_path / "hf-folder")}
    lines = [line.split("  #")[0].strip() for line in _block("## Command line", "bash").splitlines() if line]
    assert len(lines) == 8
    for line in lines:
        argv = [paths.get(arg, arg) for arg in shlex.split(line)]
        assert argv[0] == "mixtral-jax"
        devices = 8 if "--mesh" in argv and "expert=8" in argv else 1
        proc = subprocess.run([CLI, *argv[1:]], cwd=tmp_path, env=_env(devices), input="Hi\n",
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "hf-folder" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-sample", "plan-readme", "plan-long", "plan-table"])
def test_the_figures_the_docs_quote_are_what_the_code_gives(name):
    figures = _figures()
    assert any(block_name == name for _, block_name, _ in figures.blocks())
    assert figures.stale([name]) == []
