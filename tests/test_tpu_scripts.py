"""The TPU VM scripts: shellcheck-clean, and they hand gcloud the commands they document."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "scripts" / "tpu").glob("*.sh"))
SCRIPT_DIR = SCRIPTS[0].parent


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_tpu_scripts_have_no_shellcheck_findings():
    proc = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert len(SCRIPTS) == 6
    assert proc.returncode == 0, proc.stdout


def fake_tools(folder: Path) -> dict:
    """A PATH where `gcloud` and `python3` print their arguments as JSON lines instead of running."""
    for name in ("gcloud", "python3"):
        tool = folder / name
        tool.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" '
                        f'{name} "$@"\n')
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "TPU_NAME": "t", "ZONE": "z"}


def test_generate_script_runs_the_same_quoted_command_on_every_worker(tmp_path):
    env = fake_tools(tmp_path)
    prompt = "it's \"quoted\" $HOME; echo no"
    proc = subprocess.run(["bash", str(SCRIPT_DIR / "generate.sh"), "--mesh", "expert=8", "--prompt", prompt],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    gcloud = json.loads(proc.stdout)
    assert gcloud[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in gcloud
    remote = gcloud[gcloud.index("--command") + 1]
    ran = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True)
    assert json.loads(ran.stdout) == ["python3", "-m", "mixtral_jax", "generate", "--checkpoint",
                                      "/mnt/disks/models/model", "--mesh", "expert=8", "--prompt", prompt]
