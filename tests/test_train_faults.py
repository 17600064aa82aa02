"""Training faults: options no run can use are refused by the parser, a diverging run stops without writing a
non-finite checkpoint, a resume must see the same data, and a failed start leaves no run folder behind."""

import hashlib
import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax.cli import main
from tests.test_outputs import snapshot, with_file_size_limit

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
DATA = STDLIB / "argparse.py"
VOCAB = 384


def argv(train_setup, output, *extra, steps=4, data=(DATA,)):
    return ["train", "--config", str(train_setup / "config.json"), "--tokenizer", str(train_setup / "spm.model"),
            "--data", *map(str, data), "--steps", str(steps), "--batch-size", "2", "--seq-len", "16",
            "--output", str(output), "--no-progress", *extra]


def run_cli(capfd, args) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run(train_setup, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "out"
    assert main(argv(train_setup, output)) == 0
    return output


@pytest.mark.parametrize("option, value, message", [
    ("--keep", "0", "must be at least 1, got 0"),
    ("--log-every", "0", "must be at least 1, got 0"),
    ("--save-every", "0", "must be at least 1, got 0"),
    ("--warmup-steps", "-1", "must be at least 0, got -1"),
    ("--seed", "-1", "a seed must be in [0, 4294967295], got -1"),
    ("--seed", "4294967296", "a seed must be in [0, 4294967295], got 4294967296"),
    ("--lr", "nan", "expected a finite number, got 'nan'"),
    ("--lr", "inf", "expected a finite number, got 'inf'"),
    ("--lr", "0", "must be greater than 0, got 0"),
    ("--clip-norm", "nan", "expected a finite number, got 'nan'"),
    ("--weight-decay", "-0.1", "must be at least 0, got -0.1"),
    ("--z-loss", "nan", "expected a finite number, got 'nan'"),
    ("--steps", "0", "must be at least 1, got 0"),
    ("--output", "", "expected a path, got an empty string"),
])
def test_options_no_run_can_use_are_refused_by_the_parser(train_setup, tmp_path, capfd, option, value, message):
    code, out, err = run_cli(capfd, argv(train_setup, tmp_path / "out") + [option, value])
    assert code == 2 and out == ""
    assert err == f"mixtral-jax train: error: argument {option}: {message}\n"
    assert not (tmp_path / "out").exists()


def test_a_sequence_longer_than_the_context_is_refused_before_anything_runs(train_setup, tmp_path, capfd):
    args = argv(train_setup, tmp_path / "out")
    args[args.index("--seq-len") + 1] = "300"
    code, out, err = run_cli(capfd, args)
    assert code == 1 and out == ""
    assert err == "mixtral-jax train: error: sequence length 300 exceeds the model's context of 256 tokens\n"
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_in_one_line_keeping_only_finite_checkpoints(train_setup, tmp_path, capfd):
    output = tmp_path / "out"
    code, out, err = run_cli(capfd, argv(train_setup, output, "--lr", "1e4", "--warmup-steps", "1", "--save-every", "1",
                                         "--keep", "2", steps=40))
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "training diverged and stopped; the last checkpoint, step " in err
    stopped = int(err.split("step ")[1].split(":")[0])
    kept = sorted(int(p.name) for p in (output / "checkpoints").iterdir())
    assert kept[-1] == stopped - 1 and len(kept) == 2
    params = mixtral_jax.load(output).params
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(params))
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == stopped - 1 and all(math.isfinite(r["loss"]) for r in records)


def test_a_resume_on_other_data_of_the_same_size_is_refused(train_setup, tmp_path, capfd):
    other = STDLIB / "fractions.py"
    output = tmp_path / "out"
    assert main(argv(train_setup, output, steps=2, data=(DATA, other))) == 0
    capfd.readouterr()
    before = snapshot(output)
    code, out, err = run_cli(capfd, argv(train_setup, output, steps=3, data=(other, DATA)))  # same tokens, other order
    assert code == 1 and out == ""
    assert err == (f"mixtral-jax train: error: {output} holds a run with other training settings or data "
                   "(data_sha256); choose another output folder\n")
    assert snapshot(output) == before


def test_no_progress_is_honoured_when_a_run_resumes(train_setup, run, tmp_path, capfd):
    output = Path(shutil.copytree(run, tmp_path / "out"))
    code, out, err = run_cli(capfd, argv(train_setup, output, steps=5))
    assert code == 0 and err == ""
    loss = json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert out == f"trained to step 5 of 5, loss {loss:.4f}; the model is in {output}\n"


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_named(train_setup, run, tmp_path, capfd):
    output = Path(shutil.copytree(run, tmp_path / "out"))
    metrics = output / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a killed run's half-written record
    assert main(argv(train_setup, output, steps=5)) == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]
    capfd.readouterr()
    metrics.write_text("garbage\n" + metrics.read_text())
    code, out, err = run_cli(capfd, argv(train_setup, output, steps=6))
    assert code == 1
    assert err == f"mixtral-jax train: error: {metrics}: line 1 is not a metrics record with an integer 'step'\n"


def test_a_damaged_train_config_is_one_line_naming_it(train_setup, run, tmp_path, capfd):
    output = Path(shutil.copytree(run, tmp_path / "out"))
    (output / "train_config.json").write_text('{"batch_size": 2,')
    code, out, err = run_cli(capfd, argv(train_setup, output, steps=5))
    assert code == 1 and err.startswith(f"mixtral-jax train: error: {output / 'train_config.json'}: invalid JSON (")
    assert err.count("\n") == 1


def test_export_never_replaces_the_training_run_it_reads(run, capfd):
    before = snapshot(run)
    code, out, err = run_cli(capfd, ["export", str(run), str(run), "--force"])
    assert code == 1 and err == f"mixtral-jax export: error: {run}: is the source {run}; refusing to replace it\n"
    assert snapshot(run) == before


def test_a_full_disk_is_one_line_and_leaves_no_run_folder(train_setup, tmp_path):
    output = tmp_path / "out"
    proc = subprocess.run(with_file_size_limit(50_000, *argv(train_setup, output)), capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"mixtral-jax train: error: {output}: cannot write (File too large)\n"
    assert not output.exists()


@pytest.mark.slow
def test_out_of_memory_is_one_line_and_the_corrected_run_starts_afresh(train_setup, tmp_path, capfd):
    output = tmp_path / "out"
    big = argv(train_setup, output)
    big[big.index("--config") + 1] = "tiny"  # a 32000-id vocabulary: 64 x 2048 logits need 16 GiB
    big[big.index("--tokenizer"):big.index("--tokenizer") + 2] = []
    big[big.index("--batch-size") + 1], big[big.index("--seq-len") + 1] = "64", "2048"
    limit = 6 << 30
    proc = subprocess.run([sys.executable, "-c", f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, "
                           f"({limit}, {limit})); os.execv(sys.executable, [sys.executable, '-m', 'mixtral_jax', "
                           f"*sys.argv[1:]])", *big], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr == ("mixtral-jax train: error: out of device memory: lower --batch-size or --seq-len, or add "
                           "--remat or devices\n")
    assert not output.exists()
    small = argv(train_setup, output)
    small[small.index("--config") + 1] = "tiny"
    small[small.index("--tokenizer"):small.index("--tokenizer") + 2] = []
    assert main(small) == 0


def test_the_demo_recipe_changes_nothing_in_the_package_until_installed(tmp_path, monkeypatch, capfd):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    shipped = recipe.DEMO
    before = snapshot(shipped)
    files = sorted((STDLIB / "json").glob("*.py"))

    def corpus(work):
        return files[1:], files[:1]

    monkeypatch.setattr(recipe, "corpus", corpus)
    monkeypatch.setattr(recipe, "VOCAB", 512)
    monkeypatch.setattr(sys, "argv", ["train_demo.py", "--work", str(tmp_path / "work"), "--steps", "2"])
    recipe.main()
    assert snapshot(shipped) == before
    model_dir = tmp_path / "work" / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()

    monkeypatch.setattr(recipe, "DEMO", tmp_path / "package" / "demo")
    (tmp_path / "package" / "demo").mkdir(parents=True)
    (tmp_path / "package" / "demo" / "old.txt").write_text("the old demo")
    monkeypatch.setattr(sys, "argv", ["train_demo.py", "--work", str(tmp_path / "work"), "--install"])
    recipe.main()
    installed = sorted(p.name for p in (tmp_path / "package" / "demo").iterdir())
    assert installed == ["config.json", "model.safetensors", "tokenizer.model"]
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert hashlib.sha256((tmp_path / "package" / "demo" / "model.safetensors").read_bytes()).hexdigest() == digest
