"""Conversion faults: every bad input is one line on stderr and a non-zero exit; a pickle never runs code;
an interrupted or killed conversion leaves nothing that loads, and a rerun succeeds."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mixtral_jax
from mixtral_jax import checkpoint
from mixtral_jax.cli import main
from mixtral_jax.convert import mapping, writer
from mixtral_jax.convert.writer import convert
from mixtral_jax.errors import CheckpointError, MixtralError
from tests import reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded(hf_mixtral, tmp_path_factory):
    return reference.write_hf_shards(hf_mixtral, tmp_path_factory.mktemp("sharded") / "hf", 3)


@pytest.fixture
def broken(sharded, tmp_path):
    """A private copy of the 3-shard checkpoint to damage."""
    return Path(shutil.copytree(sharded, tmp_path / "hf"))


def _fails(argv, capfd) -> str:
    """Run the CLI, expect exit 1 with one line on stderr (file descriptor level, so library output would
    show) and nothing on stdout; return that line."""
    assert main(argv) == 1
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("mixtral-jax convert: error: "), err
    assert "Traceback" not in err
    return err


def _convert_fails(source, tmp_path, capfd) -> str:
    msg = _fails(["convert", str(source), str(tmp_path / "out")], capfd)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    return msg


def _shard(folder: Path, i: int) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[i]


def test_truncated_safetensors_names_the_file(broken, tmp_path, capfd):
    shard = _shard(broken, 1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = _convert_fails(broken, tmp_path, capfd)
    assert shard.name in msg and "truncated" in msg


def test_unreadable_safetensors_header(broken, tmp_path, capfd):
    shard = _shard(broken, 0)
    shard.write_bytes((40).to_bytes(8, "little") + b"\xff" * 40 + shard.read_bytes()[48:])
    assert "not a safetensors file" in _convert_fails(broken, tmp_path, capfd)


def test_missing_tensor_is_named(broken, tmp_path, capfd):
    shard = _shard(broken, 2)
    tensors = load_file(shard)
    gone = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != gone}, shard)
    msg = _convert_fails(broken, tmp_path, capfd)
    assert f"{shard.name}: tensor {gone} is missing" in msg  # the file the index names


def test_missing_tensor_of_a_single_file_source_names_that_file(hf_mixtral, tmp_path, capfd):
    source = reference.write_mistral_safetensors(hf_mixtral, tmp_path / "src")
    tensors = load_file(source / "consolidated.safetensors")
    del tensors["norm.weight"]
    save_file(tensors, source / "consolidated.safetensors")
    assert "consolidated.safetensors: tensor norm.weight is missing" in _convert_fails(source, tmp_path, capfd)


def test_extra_tensor_is_named(broken, tmp_path, capfd):
    shard = _shard(broken, 0)
    save_file({**load_file(shard), "model.layers.0.mystery.weight": np.zeros(3, np.float32)}, shard)
    msg = _convert_fails(broken, tmp_path, capfd)
    assert "unexpected tensor model.layers.0.mystery.weight" in msg and shard.name in msg


def test_config_that_disagrees_with_weights(broken, tmp_path, capfd):
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    msg = _convert_fails(broken, tmp_path, capfd)
    assert "has shape [96, 64], the config implies [128, 64]" in msg


@pytest.mark.parametrize("content", ["empty", "unknown", "absent"])
def test_empty_unknown_or_absent_source(content, tmp_path, capfd):
    source = tmp_path / "src"
    if content != "absent":
        source.mkdir()
    if content == "unknown":
        (source / "weights.bin").write_bytes(b"\0" * 16)
    msg = _convert_fails(source, tmp_path, capfd)
    assert ("no such file" if content == "absent" else "not a checkpoint folder") in msg


def test_existing_output_is_refused_without_force(hf_mixtral, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = _fails(["convert", str(hf_mixtral), str(out)], capfd)
    assert "already exists" in msg and (out / "keep.txt").read_text() == "mine"


def test_missing_or_inconsistent_checkpoint_on_load(hf_mixtral, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        mixtral_jax.load(tmp_path / "nowhere")
    out = convert(hf_mixtral, tmp_path / "model", progress=False)
    cfg = json.loads((out / checkpoint.CONFIG_FILE).read_text())
    (out / checkpoint.CONFIG_FILE).write_text(json.dumps({**cfg, "ffn_dim": 128}))
    with pytest.raises(CheckpointError, match=r"parameter layers.ffn.w1 has shape \[2, 4, 64, 96\]"):
        mixtral_jax.load(out)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pth_whose_pickle_would_run_code_is_refused(hf_mixtral, tmp_path, capfd):
    source = reference.write_mistral_pth(hf_mixtral, tmp_path / "src")
    marker = tmp_path / "code_ran"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "payload": _RunsCode(marker)},
               source / "consolidated.00.pth")
    msg = _convert_fails(source, tmp_path, capfd)
    assert "refused" in msg and "consolidated.00.pth" in msg
    assert not marker.exists()


def test_pth_without_torch_says_so(hf_mixtral, tmp_path, capfd, monkeypatch):
    source = reference.write_mistral_pth(hf_mixtral, tmp_path / "src")
    monkeypatch.setitem(sys.modules, "torch", None)
    assert "needs torch" in _convert_fails(source, tmp_path, capfd)


def test_megablocks_rows_not_divisible_by_experts(hf_mixtral, tmp_path, capfd):
    source = reference.write_megablocks_pt(hf_mixtral, tmp_path / "src")
    part = torch.load(source / "consolidated.00.pt", weights_only=True)
    part["layers.0.block_sparse_moe.w1"] = part["layers.0.block_sparse_moe.w1"][:-1]
    torch.save(part, source / "consolidated.00.pt")
    msg = _convert_fails(source, tmp_path, capfd)
    assert "layers.0.block_sparse_moe.w1 has 383 rows" in msg


def test_missing_megablocks_tensor_names_its_stacked_form(hf_mixtral, tmp_path, capfd):
    source = reference.write_megablocks_pt(hf_mixtral, tmp_path / "src")
    part = torch.load(source / "consolidated.01.pt", weights_only=True)
    del part["layers.1.block_sparse_moe.w2"]
    torch.save(part, source / "consolidated.01.pt")
    msg = _convert_fails(source, tmp_path, capfd)
    assert "tensor layers.1.feed_forward.experts.0.w2.weight is missing (looked for layers.1.block_sparse_moe.w2" in msg


def test_failure_mid_write_leaves_nothing(hf_mixtral, tmp_path, monkeypatch):
    write, calls = checkpoint.ArrayWriter.write, []

    def failing(self, *args):
        calls.append(args[0])
        if len(calls) == 5:
            raise MixtralError("disk full")
        write(self, *args)

    monkeypatch.setattr(checkpoint.ArrayWriter, "write", failing)
    with pytest.raises(MixtralError, match="disk full"):
        convert(hf_mixtral, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_conversion_keeps_the_old_output(hf_mixtral, tmp_path, monkeypatch):
    old = convert(hf_mixtral, tmp_path / "out", progress=False)
    before = sorted(p.relative_to(old) for p in old.rglob("*"))

    def failing(self, *args):
        raise MixtralError("disk full")

    monkeypatch.setattr(checkpoint.ArrayWriter, "write", failing)
    with pytest.raises(MixtralError, match="disk full"):
        convert(hf_mixtral, old, dtype="bfloat16", force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before
    assert mixtral_jax.load(old).config.param_dtype == "float32"


@pytest.mark.slow
def test_sigkill_mid_write_leaves_no_checkpoint_and_rerun_succeeds(tmp_path):
    from benchmarks.convert_bench import write_synthetic_hf

    write_synthetic_hf(tmp_path / "hf", layers=1, shards=2, hidden_size=512, intermediate_size=2048,
                       vocab_size=8000)  # 0.13 GB: a second or so of writing to interrupt
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mixtral_jax", "convert", str(tmp_path / "hf"), str(out)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f".out.partial-{proc.pid}"
    deadline = time.time() + 120
    while not list(staging.glob(f"{checkpoint.PARAMS_DIR}/*/0.*")) and time.time() < deadline:
        assert proc.poll() is None, "conversion ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staging.is_dir() and not out.exists()
    assert not any(checkpoint.is_checkpoint(p) for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError):
        mixtral_jax.load(staging)
    convert(tmp_path / "hf", out, progress=False)
    assert checkpoint.is_checkpoint(out) and not staging.exists()
    assert mixtral_jax.load(out).config.n_layers == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
def test_damaged_or_incomplete_checkpoint_on_load(hf_mixtral, tmp_path):
    out = convert(hf_mixtral, tmp_path / "model", progress=False)
    (out / checkpoint.PARAMS_DIR / "layers.ffn.w1" / "0.1.0.0").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable checkpoint .*layers.ffn.w1/0.1.0.0"):
        mixtral_jax.load(out)
    shutil.rmtree(out / checkpoint.PARAMS_DIR / "lm_head")
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        mixtral_jax.load(out)


NON_FINITE = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
LOAD_OPT_OUT = "load it with allow_non_finite=True, or convert it with --allow-non-finite, to use it anyway"


def _poison(folder: Path, names: tuple[str, ...], values: dict[int, float] | None = None) -> Path:
    """Write `values` (flat position -> value; default a NaN first and an inf last) into tensors `names` of
    a sharded checkpoint; return the shard that holds the first of them."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for name in names:
        shard = folder / index[name]
        tensors = load_file(shard)
        w = tensors[name].copy()
        for at, value in (values or {0: np.nan, -1: np.inf}).items():
            w.reshape(-1)[at] = value
        save_file({**tensors, name: w}, shard)
    return folder / index[names[0]]


def test_non_finite_weight_refuses_conversion_naming_it(broken, tmp_path, capfd):
    shard = _poison(broken, (NON_FINITE,))
    assert _convert_fails(broken, tmp_path, capfd) == (
        f"mixtral-jax convert: error: {shard}: tensor {NON_FINITE} holds NaN or inf values "
        "(pass --allow-non-finite to convert it anyway)\n"
    )


def test_inf_in_the_last_block_of_a_streamed_tensor_is_refused(broken, tmp_path, monkeypatch):
    _poison(broken, ("lm_head.weight",), {-1: np.inf})
    monkeypatch.setattr(writer, "BLOCK_BYTES", 4096)  # lm_head [96, 64] float32 (24 KiB) goes in blocks
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    check, pieces = mapping.check_finite, []

    def counted(w, source, name, opt_out):
        pieces.extend([w.shape] if name == "lm_head.weight" else [])
        check(w, source, name, opt_out)

    monkeypatch.setattr(mapping, "check_finite", counted)
    with pytest.raises(CheckpointError, match="tensor lm_head.weight holds NaN or inf values"):
        convert(broken, tmp_path / "out", progress=False)
    assert len(pieces) > 1 and sum(rows for rows, _ in pieces) == 96  # checked block by block, to the last
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_allow_non_finite_converts_and_score_json_gives_null_for_nan(broken, tmp_path, capfd):
    _poison(broken, (NON_FINITE, "model.norm.weight"))
    out = tmp_path / "out"
    assert main(["convert", str(broken), str(out), "--allow-non-finite"]) == 0
    w1 = np.asarray(mixtral_jax.load(out).params["layers"]["ffn"]["w1"][...])[1, 3]  # [D, F]: the source's .T
    assert np.isnan(w1[0, 0]) and np.isposinf(w1[-1, -1]) and np.isfinite(w1).sum() == w1.size - 2
    capfd.readouterr()
    assert main(["score", "--checkpoint", str(out), "--ids", "1,5,9,13", "--json"]) == 0
    result = json.loads(capfd.readouterr().out)  # NaN norm weights: every logit is NaN
    assert result == {"ids": [1, 5, 9, 13], "logprobs": [None] * 3, "nll": None, "perplexity": None}


def test_non_finite_weight_refuses_direct_load_unless_allowed(broken):
    shard = _poison(broken, (NON_FINITE,))
    with pytest.raises(CheckpointError) as e:
        mixtral_jax.load(broken)
    assert str(e.value) == f"{shard}: tensor {NON_FINITE} holds NaN or inf values ({LOAD_OPT_OUT})"
    w1 = np.asarray(mixtral_jax.load(broken, allow_non_finite=True).params["layers"]["ffn"]["w1"][...])[1, 3]
    assert np.isnan(w1[0, 0]) and np.isposinf(w1[-1, -1]) and np.isfinite(w1).sum() == w1.size - 2


class _OneFile:
    def file_of(self, name: str) -> Path:
        return Path("/ckpt/model.safetensors")

    def label(self, name: str) -> str:
        return name


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_any_non_finite_value_of_any_float_dtype_is_found(dtype, value):
    w = np.ones((3, 5), dtype)
    mapping.check_finite(w, _OneFile(), "w", "opt out")
    w[2, 4] = value  # float8_e4m3fn has no inf: an inf becomes NaN
    with pytest.raises(CheckpointError) as e:
        mapping.check_finite(w, _OneFile(), "w", "opt out")
    assert str(e.value) == "/ckpt/model.safetensors: tensor w holds NaN or inf values (opt out)"
    mapping.check_finite(np.full((2, 2), 7, np.int8), _OneFile(), "w", "opt out")
