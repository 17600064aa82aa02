"""What the commands write and replace: `--force` replaces only a folder mixtral-jax wrote and that is not a
source; a write the system refuses is one line naming the path, with nothing partial left behind."""

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_jax import outputs
from mixtral_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> hash of its bytes) and every folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def fails(argv, capfd, command: str) -> str:
    """Run the CLI in-process; expect exit 1, nothing on stdout and one error line on stderr; return it."""
    assert main(argv) == 1
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"mixtral-jax {command}: error: "), err
    return err


@pytest.fixture
def model_folder(hf_mixtral, tmp_path):
    """A folder `m` holding a Hugging Face source `m/hf`, a sibling model and a notes file."""
    folder = tmp_path / "m"
    (folder / "hf").mkdir(parents=True)
    for f in hf_mixtral.iterdir():
        (folder / "hf" / f.name).write_bytes(f.read_bytes())
    (folder / "other-model").mkdir()
    (folder / "other-model" / "model.safetensors").write_bytes(b"weights of another model")
    (folder / "notes.txt").write_text("my notes")
    return folder


def test_force_never_replaces_a_folder_that_holds_the_source(model_folder, capfd):
    before = snapshot(model_folder)
    msg = fails(["convert", str(model_folder / "hf"), str(model_folder), "--force"], capfd, "convert")
    assert "contains the source" in msg
    assert snapshot(model_folder) == before


def test_force_never_replaces_the_source_itself(model_folder, capfd):
    before = snapshot(model_folder)
    msg = fails(["convert", str(model_folder / "hf"), str(model_folder / "hf"), "--force"], capfd, "convert")
    assert "is the source" in msg
    assert snapshot(model_folder) == before


def test_force_never_replaces_the_working_directory(model_folder, capfd, monkeypatch):
    monkeypatch.chdir(model_folder / "other-model")
    before = snapshot(model_folder)
    msg = fails(["convert", str(model_folder / "hf"), ".", "--force"], capfd, "convert")
    assert "working directory" in msg
    assert snapshot(model_folder) == before


def test_force_never_replaces_a_folder_mixtral_jax_did_not_write(model_folder, capfd):
    before = snapshot(model_folder)
    msg = fails(["convert", str(model_folder / "hf"), str(model_folder / "other-model"), "--force"], capfd,
                "convert")
    assert "not a folder written by mixtral-jax" in msg
    msg = fails(["export", str(model_folder / "hf"), str(model_folder / "notes.txt"), "--force"], capfd, "export")
    assert "not a folder" in msg
    assert snapshot(model_folder) == before


def test_force_replaces_its_own_output_unless_the_user_added_files(hf_mixtral, tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["convert", str(hf_mixtral), str(out)]) == 0
    capfd.readouterr()
    assert (out / outputs.MARKER).is_file()
    (out / "my-notes.txt").write_text("keep me")
    before = snapshot(out)
    msg = fails(["convert", str(hf_mixtral), str(out), "--force", "--dtype", "bfloat16"], capfd, "convert")
    assert "my-notes.txt" in msg and snapshot(out) == before
    (out / "my-notes.txt").unlink()
    assert main(["convert", str(hf_mixtral), str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert '"param_dtype": "bfloat16"' in (out / "model_config.json").read_text()


def test_export_never_replaces_its_own_source(hf_mixtral, tmp_path, capfd):
    model = tmp_path / "model"
    assert main(["convert", str(hf_mixtral), str(model)]) == 0
    capfd.readouterr()
    before = snapshot(model)
    assert "is the source" in fails(["export", str(model), str(model), "--force"], capfd, "export")
    assert "contains the source" in fails(["export", str(model), str(tmp_path), "--force"], capfd, "export")
    assert snapshot(model) == before


def test_export_replaces_its_own_export_and_writes_files_readable_by_all(hf_mixtral, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(hf_mixtral), str(out)]) == 0
    assert main(["export", str(hf_mixtral), str(out), "--force"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask


def test_an_output_under_a_file_is_one_line_naming_it(hf_mixtral, tmp_path, capfd):
    (tmp_path / "file").write_text("not a folder")
    msg = fails(["convert", str(hf_mixtral), str(tmp_path / "file" / "out")], capfd, "convert")
    assert f"({tmp_path / 'file'} is a file, not a folder)" in msg
    assert (tmp_path / "file").read_text() == "not a folder"


def with_file_size_limit(limit_bytes: int, *argv: str) -> list[str]:
    """`python -m mixtral_jax ARGV` unable to write files past `limit_bytes`, as on a full disk: Python ignores
    SIGXFSZ, so such a write fails with EFBIG ("File too large")."""
    return [sys.executable, "-c", f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
            f"({limit_bytes}, {limit_bytes})); os.execv(sys.executable, [sys.executable, '-m', 'mixtral_jax', "
            f"*sys.argv[1:]])", *argv]


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_full_disk_is_one_line_and_leaves_nothing(command, hf_mixtral, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(with_file_size_limit(20_000, command, str(hf_mixtral), str(out)),
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"mixtral-jax {command}: error: {out}: cannot write (File too large)\n"
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_output_folder_is_one_line(hf_mixtral, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    command = [sys.executable, "-m", "mixtral_jax", "export", str(hf_mixtral), str(parent / "out")]
    if os.geteuid() == 0:  # root writes through permissions: mount the folder read-only for the command
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: no way to make a folder read-only for the command")
        command = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(parent), *command]
    else:
        parent.chmod(0o555)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    finally:
        parent.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"mixtral-jax export: error: {parent / 'out'}: ")
    assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("command", ["convert", "export", "train"])
def test_every_command_names_a_file_standing_where_its_output_folder_would_go(command, hf_mixtral, tmp_path, capfd):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "sub" / "out"
    argv = ([command, str(hf_mixtral), str(out)] if command != "train" else
            ["train", "--config", "tiny", "--data", __file__, "--steps", "1", "--batch-size", "1", "--seq-len", "8",
             "--output", str(out)])
    msg = fails(argv, capfd, command)
    assert msg == f"mixtral-jax {command}: error: {out}: cannot write ({tmp_path / 'file'} is a file, not a folder)\n"
    assert (tmp_path / "file").read_text() == "not a folder"
