"""The TPU VM scripts pass shellcheck (skipped where shellcheck is not installed)."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "scripts" / "tpu").glob("*.sh"))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_tpu_scripts_have_no_shellcheck_findings():
    proc = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert len(SCRIPTS) == 6
    assert proc.returncode == 0, proc.stdout
