"""Export to a Hugging Face folder: transformers loads it and computes the same log-probs."""

import json

import jax
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax.cli import main as cli
from mixtral_jax.convert.export_hf import export
from tests import reference

IDS = np.random.default_rng(0).integers(0, 96, size=(2, 12))


@pytest.mark.parametrize("dense", [False, True], ids=["mixtral", "mistral"])
def test_exported_folder_gives_transformers_equal_logprobs(tmp_path, dense):
    cfg = mixtral_jax.preset("tiny").replace(vocab_size=96, n_experts=0 if dense else 4, top_k=0 if dense else 2,
                                             max_seq_len=256)
    model = mixtral_jax.init_random(cfg, seed=3, dtype="float32")
    export(model.config, model.checkpoint_params(), tmp_path / "hf")
    ours = jax.nn.log_softmax(model.logits(IDS), axis=-1)
    theirs = reference.hf_logprobs(tmp_path / "hf", IDS)
    assert np.max(np.abs(np.asarray(ours) - theirs)) < 2e-4


def test_export_command_round_trips_a_checkpoint(tmp_path, hf_mixtral):
    assert cli(["export", str(hf_mixtral), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    again = mixtral_jax.load(tmp_path / "out")
    original = mixtral_jax.load(hf_mixtral)
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), again.params,
                        original.params)
    assert max(jax.tree.leaves(diff)) == 0.0
    assert np.max(np.abs(reference.hf_logprobs(tmp_path / "out", IDS) - reference.hf_logprobs(hf_mixtral, IDS))) == 0.0


def test_export_of_converted_model_folder_gives_transformers_equal_logprobs(tmp_path, hf_mixtral):
    assert cli(["convert", str(hf_mixtral), str(tmp_path / "model")]) == 0
    assert cli(["export", str(tmp_path / "model"), str(tmp_path / "hf")]) == 0
    theirs = reference.hf_logprobs(tmp_path / "hf", IDS)
    assert np.max(np.abs(theirs - reference.hf_logprobs(hf_mixtral, IDS))) < 2e-4


def test_export_refuses_an_existing_folder_in_one_line(tmp_path, hf_mixtral, capsys):
    (tmp_path / "hf").mkdir()
    assert cli(["export", str(hf_mixtral), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert cli(["export", str(hf_mixtral), str(tmp_path / "hf"), "--force"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
