"""Damaged config files and damaged training outputs: each is one line on stderr naming the file (and the key),
exit 1, no traceback; the Python API raises the project's error."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

import mixtral_jax
from mixtral_jax import config, trained
from mixtral_jax.cli import main
from mixtral_jax.convert.writer import convert
from mixtral_jax.errors import CheckpointError, ConfigError
from tests import reference

# Orbax abandons its other reads when one fails; what they report when collected is not the command's output.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DATA = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
VOCAB = 384
TRAIN_ARGS = ["--batch-size", "2", "--seq-len", "16", "--no-progress"]
GENERATE_ARGS = ["--prompt", "x", "--max-new-tokens", "1"]


def _fails(argv, capfd) -> str:
    """Run the CLI, expect exit 1 and exactly one line on stderr (file descriptor level), no traceback;
    return that line."""
    capfd.readouterr()
    assert main(argv) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mixtral-jax {argv[0]}: error: "), err
    assert "Traceback" not in err
    return err


# What is written into the config file, and what the message must then say (KEY: the key damaged).
FAULTS = {
    "invalid_json": (lambda cfg, key: '{\n  "' + key + '": 4,\n', "invalid JSON (Expecting property name"),
    "json_list": (lambda cfg, key: json.dumps([cfg]), "expected a JSON object, got an array"),
    "string_for_int": (lambda cfg, key: json.dumps({**cfg, key: str(cfg[key])}), 'KEY must be an integer, got "'),
    "bool_for_int": (lambda cfg, key: json.dumps({**cfg, key: True}), "KEY must be an integer, got true"),
    "float_for_int": (lambda cfg, key: json.dumps({**cfg, key: float(cfg[key])}), "KEY must be an integer, got "),
    "null_for_required": (lambda cfg, key: json.dumps({**cfg, key: None}), "KEY must be an integer, got null"),
}


def _damage(file: Path, key: str, fault: str) -> str:
    """Write `fault` into the JSON config `file` at `key`; return the text the message must contain."""
    write, expected = FAULTS[fault]
    file.write_text(write(json.loads(file.read_text()), key))
    return f"{file}: {expected.replace('KEY', key)}"


@pytest.fixture(scope="module")
def mistral(hf_mixtral, tmp_path_factory):
    return reference.write_mistral_safetensors(hf_mixtral, tmp_path_factory.mktemp("mistral") / "src")


@pytest.fixture(scope="module")
def model_folder(hf_mixtral, tmp_path_factory):
    return convert(hf_mixtral, tmp_path_factory.mktemp("model") / "model", progress=False)


@pytest.mark.parametrize("fault", FAULTS)
def test_hf_config_json_fault_is_one_line_naming_file_and_key(fault, hf_mixtral, tmp_path, capfd):
    source = Path(shutil.copytree(hf_mixtral, tmp_path / "hf"))
    expected = _damage(source / "config.json", "hidden_size", fault)
    assert expected in _fails(["convert", str(source), str(tmp_path / "out")], capfd)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", FAULTS)
def test_mistral_params_json_fault_is_one_line_naming_file_and_key(fault, mistral, tmp_path, capfd):
    source = Path(shutil.copytree(mistral, tmp_path / "src"))
    expected = _damage(source / "params.json", "n_heads", fault)
    assert expected in _fails(["convert", str(source), str(tmp_path / "out")], capfd)


@pytest.mark.parametrize("fault", FAULTS)
def test_model_folder_config_fault_is_one_line_naming_file_and_key(fault, model_folder, tmp_path, capfd):
    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    expected = _damage(folder / "model_config.json", "n_layers", fault)
    assert expected in _fails(["generate", "--checkpoint", str(folder), *GENERATE_ARGS], capfd)
    with pytest.raises(ConfigError, match="model_config.json: "):
        mixtral_jax.load(folder)


@pytest.mark.parametrize("fault", ["invalid_json", "string_for_int", "null_for_required"])
def test_training_output_config_fault_is_one_line_naming_file_and_key(fault, run, tmp_path, capfd):
    output = Path(shutil.copytree(run / "out", tmp_path / "out"))
    expected = _damage(output / "model_config.json", "dim", fault)
    assert expected in _fails(["generate", "--checkpoint", str(output), *GENERATE_ARGS], capfd)


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", 0, "vocab_size must be positive, got 0"),
    ("norm_eps", float("nan"), "norm_eps must be a finite number, got NaN"),
    ("rope_theta", "1e6", 'rope_theta must be a finite number, got "1e6"'),
    ("sliding_window", 1.5, "sliding_window must be an integer or null, got 1.5"),
    ("tie_embeddings", 1, "tie_embeddings must be true or false, got 1"),
    ("dtype", 16, "dtype must be one of float32, bfloat16, float16, got 16"),
    ("eos_id", 32000, "eos_id (32000) must be below vocab_size (32000)"),
    ("top_k", -1, "top_k must not be negative, got -1"),
])
def test_every_field_is_checked_by_type_and_range(field, value, message):
    with pytest.raises(ConfigError) as e:
        config.preset("tiny").replace(**{field: value})
    assert str(e.value) == f"config: {message}"


def test_foreign_configs_name_their_own_keys():
    hf = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4}
    with pytest.raises(ConfigError, match=r"^c.json: num_attention_heads \(4\) must be a multiple of "
                                          r"num_key_value_heads \(3\)$"):
        config.from_hf_config({**hf, "num_key_value_heads": 3}, "c.json")
    with pytest.raises(ConfigError, match=r'^c.json: rope_parameters.rope_theta must be a finite number, got "x"$'):
        config.from_hf_config({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": "x"}}, "c.json")
    with pytest.raises(ConfigError, match=r"^c.json: missing key 'intermediate_size'$"):
        config.from_hf_config({k: v for k, v in hf.items() if k != "intermediate_size"}, "c.json")
    optional = {"num_key_value_heads": None, "head_dim": None, "rope_theta": None, "sliding_window": None,
                "bos_token_id": [1, 5], "eos_token_id": None}
    assert config.from_hf_config({**hf, **optional}) == config.from_hf_config(hf)
    params = {"dim": 64, "n_layers": 2, "hidden_dim": 96, "n_heads": 4, "vocab_size": 96}
    with pytest.raises(ConfigError, match=r"^p.json: moe.num_experts must be an integer, got true$"):
        config.from_params_json({**params, "moe": {"num_experts": True, "num_experts_per_tok": 2}}, "p.json")
    with pytest.raises(ConfigError, match=r"^p.json: moe must be a JSON object, got an array$"):
        config.from_params_json({**params, "moe": [8, 2]}, "p.json")


@pytest.fixture(scope="module")
def run(stdlib_tokenizer, tmp_path_factory):
    """A tokenizer and model config in a folder, and `out`: a 4-step training run of them."""
    folder = tmp_path_factory.mktemp("train")
    (folder / "spm.model").write_bytes(stdlib_tokenizer.read_bytes())
    cfg = config.preset("tiny").replace(vocab_size=VOCAB, max_seq_len=64, n_layers=1, n_experts=2)
    cfg.save(folder / "config.json")
    assert main(_train_argv(folder, folder / "out", 4)) == 0
    return folder


def _train_argv(setup: Path, output: Path, steps: int) -> list[str]:
    return ["train", "--config", str(setup / "config.json"), "--tokenizer", str(setup / "spm.model"),
            "--data", str(DATA), "--steps", str(steps), "--output", str(output), *TRAIN_ARGS]


def _latest(output: Path) -> Path:
    return max((p for p in (output / trained.CHECKPOINTS).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


# A damage done to the latest step of a training OUTPUT, and what the message says of it.
DAMAGES = {
    "array_file_deleted": (lambda step: _largest_file(step / "params" / "ocdbt.process_0").unlink(),
                           "params: unreadable checkpoint ("),
    "array_file_truncated": (lambda step: _truncate(_largest_file(step / "params" / "ocdbt.process_0")),
                             "params: unreadable checkpoint ("),
    "metadata_deleted": (lambda step: (step / "params" / "_METADATA").unlink(), "params: incomplete checkpoint"),
    "metadata_garbage": (lambda step: (step / "params" / "_METADATA").write_text("{garbage"),
                         "params: incomplete checkpoint"),
    "manifest_deleted": (lambda step: (step / "params" / "manifest.ocdbt").unlink(), "params: incomplete checkpoint"),
    "params_deleted": (lambda step: shutil.rmtree(step / "params"), "params: incomplete checkpoint (the folder is "),
}


@pytest.fixture
def damaged(run, tmp_path):
    """A private copy of the training run to damage."""
    return Path(shutil.copytree(run / "out", tmp_path / "out"))


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_training_output_is_one_line_on_generate_and_load(damage, damaged, capfd):
    step = _latest(damaged)
    do, expected = DAMAGES[damage]
    do(step)
    assert f"{step}/{expected}" in _fails(["generate", "--checkpoint", str(damaged), *GENERATE_ARGS], capfd)
    with pytest.raises(CheckpointError, match="checkpoint"):
        mixtral_jax.load(damaged)


def test_training_output_without_a_saved_step_is_one_line(damaged, capfd):
    for step in (damaged / trained.CHECKPOINTS).iterdir():
        shutil.rmtree(step)
    assert f"{damaged}: the training run has no saved step yet" in _fails(
        ["generate", "--checkpoint", str(damaged), *GENERATE_ARGS], capfd)


def test_intact_training_output_loads(run):
    model = mixtral_jax.load(run / "out", dtype="bfloat16")
    assert model.config.n_layers == 1 and model.config.param_dtype == "bfloat16"
    assert len(model.generate([[1, 5, 9]], 2, stop_at_eos=False)[0]) == 2


@pytest.mark.parametrize("damage, expected", [
    (lambda step: (step / "progress" / "metadata").write_text("garbage"), ": unreadable checkpoint (Expecting value"),
    (lambda step: (step / "progress" / "metadata").write_text('{"step": 4}'), ": unreadable checkpoint (its progress "),
    (lambda step: _truncate(_largest_file(step / "opt_state" / "ocdbt.process_0")), ": unreadable checkpoint ("),
    (lambda step: (step / "opt_state" / "_METADATA").unlink(), "/opt_state: incomplete checkpoint"),
], ids=["progress_garbage", "progress_without_position", "opt_state_truncated", "opt_state_metadata_deleted"])
def test_resuming_a_damaged_run_is_one_line(damage, expected, run, damaged, capfd):
    step = _latest(damaged)
    damage(step)
    assert f"{step}{expected}" in _fails(_train_argv(run, damaged, 6), capfd)


def test_a_damaged_training_output_is_exactly_one_line_from_the_console(damaged):
    """Outside pytest's capture, what Orbax's abandoned reads report afterwards ("Event loop is closed") must
    not reach the terminal either."""
    import subprocess
    import sys

    _largest_file(_latest(damaged) / "params" / "ocdbt.process_0").unlink()
    proc = subprocess.run([sys.executable, "-m", "mixtral_jax", "generate", "--checkpoint", str(damaged),
                           *GENERATE_ARGS], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "unreadable checkpoint" in proc.stderr, proc.stderr
