"""The TPU VM scripts: shellcheck-clean, and they hand gcloud the commands they document."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "scripts" / "tpu").glob("*.sh"))
SCRIPT_DIR = SCRIPTS[0].parent
RUNNABLE = [path.name for path in SCRIPTS if path.name != "common.sh"]
NO_ARGUMENTS = ["create.sh", "delete.sh", "install.sh"]
TOKEN = "secret-token-123"

# A stand-in tool: it prints its argv as one JSON line, logs its argv and HF_TOKEN to $FAKE_LOG, and for
# `gcloud ... scp SOURCE... NAME:DEST` copies the sources, mode included, to DEST under $HOME, the "worker".
FAKE_TOOL = """
import json, os, shutil, sys
argv = sys.argv[1:]
print(json.dumps(argv))
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "HF_TOKEN": os.environ.get("HF_TOKEN")}) + "\\n")
if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]:
    target = next(i for i, arg in enumerate(argv) if arg.startswith(os.environ["TPU_NAME"] + ":"))
    destination = os.path.join(os.environ["HOME"], argv[target].split(":", 1)[1])
    for source in argv[5:target]:
        shutil.copy(source, destination)
"""


def fake_tools(folder: Path) -> dict:
    """A PATH where `gcloud`, `python3` and `hf` are stand-ins that record their arguments instead of running."""
    bin_dir, home = folder / "bin", folder / "home"
    bin_dir.mkdir()
    home.mkdir()
    (folder / "fake_tool.py").write_text(FAKE_TOOL)
    for name in ("gcloud", "python3", "hf"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\nexec {sys.executable} {folder / "fake_tool.py"} {name} "$@"\n')
        tool.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "FAKE_LOG": str(folder / "log"),
            "TPU_NAME": "t", "ZONE": "z"}


def calls(env: dict) -> list[dict]:
    """What the stand-ins were asked to do, in order."""
    log = Path(env["FAKE_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_tpu_scripts_have_no_shellcheck_findings():
    proc = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert len(SCRIPTS) == 6
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("script", RUNNABLE)
def test_help_prints_usage_and_settings_and_runs_nothing(tmp_path, script, flag):
    env = fake_tools(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT_DIR / script), flag], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    description = (SCRIPT_DIR / script).read_text().splitlines()[1].removeprefix("# ")
    assert proc.stdout.startswith(description + "\n")
    assert "TPU_NAME" in proc.stdout and "MODEL_DIR" in proc.stdout
    assert proc.stderr == ""
    assert calls(env) == []


@pytest.mark.parametrize("script", NO_ARGUMENTS)
def test_scripts_without_arguments_refuse_one_and_run_nothing(tmp_path, script):
    env = fake_tools(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT_DIR / script), "--zone", "x"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "'--zone'" in proc.stderr and "usage:" in proc.stderr and proc.stdout == ""
    assert calls(env) == []


def test_delete_says_what_it_deletes(tmp_path):
    env = fake_tools(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT_DIR / "delete.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "'t'" in proc.stderr and "zone z" in proc.stderr
    assert [call["argv"][:6] for call in calls(env)] == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "t"]]


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


def run_hub_checkpoint(tmp_path: Path, token: str | None) -> tuple[dict, list[dict], list[dict]]:
    """checkpoint.sh hf:org/repo, then its remote command on the "worker"; the calls made by each."""
    env = {**fake_tools(tmp_path), "MODEL_DIR": str(tmp_path / "models" / "model")}
    local_env = env if token is None else {**env, "HF_TOKEN": token}
    proc = subprocess.run(["bash", str(SCRIPT_DIR / "checkpoint.sh"), "hf:org/repo"], env=local_env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    local = calls(env)
    Path(env["FAKE_LOG"]).unlink()
    ssh = local[-1]["argv"]
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
    ran = subprocess.run(["bash", "-c", ssh[ssh.index("--command") + 1]], env=env, cwd=env["HOME"],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    return env, local, calls(env)


def test_hub_token_reaches_the_download_as_a_private_file_never_on_a_command_line(tmp_path):
    env, local, remote = run_hub_checkpoint(tmp_path, TOKEN)
    assert [call["argv"][4] for call in local] == ["scp", "ssh"]
    assert not any(TOKEN in arg for call in local for arg in call["argv"])
    scp = local[0]["argv"]
    source, target = scp[5], scp[6]
    assert "--worker=all" in scp and target == "t:.mixtral-jax-hf-token"
    assert not Path(source).exists(), "the local token file outlives the script"
    assert not (Path(env["HOME"]) / ".mixtral-jax-hf-token").exists(), "the worker's token file is left behind"
    assert not any(TOKEN in arg for call in remote for arg in call["argv"])
    download = next(call for call in remote if call["argv"][:2] == ["hf", "download"])
    assert download["HF_TOKEN"] == TOKEN
    assert download["argv"][2] == "org/repo"


def test_hub_token_file_copied_to_workers_is_readable_only_by_the_user(tmp_path):
    env = {**fake_tools(tmp_path), "MODEL_DIR": str(tmp_path / "models" / "model"), "HF_TOKEN": TOKEN}
    proc = subprocess.run(["bash", str(SCRIPT_DIR / "checkpoint.sh"), "hf:org/repo"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    copied = Path(env["HOME"]) / ".mixtral-jax-hf-token"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert copied.read_text() == TOKEN


def test_hub_download_without_token_copies_nothing_and_runs_unauthenticated(tmp_path):
    _, local, remote = run_hub_checkpoint(tmp_path, None)
    assert [call["argv"][4] for call in local] == ["ssh"]
    assert "HF_TOKEN" not in local[0]["argv"][local[0]["argv"].index("--command") + 1]
    download = next(call for call in remote if call["argv"][:2] == ["hf", "download"])
    assert download["HF_TOKEN"] is None
    assert [call["argv"][:4] for call in remote if call["argv"][0] == "python3"] == [
        ["python3", "-m", "pip", "install"], ["python3", "-m", "mixtral_jax", "convert"]]
