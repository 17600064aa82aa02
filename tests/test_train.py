"""Training: the loss falls, a resumed run equals an uninterrupted one, the output loads, generates and exports."""

import json
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

import mixtral_jax
from mixtral_jax.cli import main as cli
from tests import reference

DATA = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
VOCAB = 384
STEPS = 24
ARGS = ["--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "5", "--no-progress"]


def _train(train_setup, output, steps):
    argv = ["train", "--config", str(train_setup / "config.json"), "--tokenizer", str(train_setup / "spm.model"),
            "--data", str(DATA), "--steps", str(steps), "--output", str(output), *ARGS]
    assert cli(argv) == 0


def _metrics(output):
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(train_setup, tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    output = tmp_path_factory.mktemp("run") / "out"
    _train(train_setup, output, STEPS)
    return output


def test_loss_falls_on_tiny_config(run):
    losses = [r["loss"] for r in _metrics(run)]
    assert np.mean(losses[-4:]) < 0.8 * losses[0]


def test_metrics_record_every_step_with_router_loss(run):
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(abs(r["aux_loss"] - 2.0) < 0.5 and r["tokens_per_s"] > 0 for r in records)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(train_setup, run, tmp_path):
    output = tmp_path / "out"
    _train(train_setup, output, STEPS // 2)
    _train(train_setup, output, STEPS)
    a, b = mixtral_jax.load(run), mixtral_jax.load(output)
    diff = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a.params, b.params)
    assert max(jax.tree.leaves(diff)) <= 1e-6
    assert [r["step"] for r in _metrics(output)] == list(range(1, STEPS + 1))
    assert abs(_metrics(output)[-1]["loss"] - _metrics(run)[-1]["loss"]) <= 1e-6


def test_resume_with_other_settings_is_refused_in_one_line(train_setup, run, capsys):
    argv = ["train", "--config", str(train_setup / "config.json"), "--tokenizer", str(train_setup / "spm.model"),
            "--data", str(DATA), "--steps", "30", "--output", str(run), "--batch-size", "2", "--seq-len", "32"]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_size" in err


def test_training_output_generates(run):
    model = mixtral_jax.load(run)
    prompt = model.tokenizer.encode("def parse_args(self")
    new = model.generate([prompt], max_new_tokens=5, stop_at_eos=False)[0]
    assert len(new) == 5 and all(0 <= t < VOCAB for t in new)


def test_export_of_training_output_gives_transformers_equal_logprobs(run, tmp_path):
    assert cli(["export", str(run), str(tmp_path / "hf")]) == 0
    ids = np.random.default_rng(0).integers(3, VOCAB, size=(2, 16))
    ours = jax.nn.log_softmax(mixtral_jax.load(run).logits(ids), axis=-1)
    assert np.max(np.abs(np.asarray(ours) - reference.hf_logprobs(tmp_path / "hf", ids))) < 2e-4
    assert (tmp_path / "hf" / "tokenizer.model").is_file()


def test_demo_model_predicts_held_out_stdlib_code():
    """The shipped demo model was trained: on a held-out standard-library file its perplexity is about 60,
    against 2048 for an untrained model."""
    from mixtral_jax import data, demo, train

    model = demo.load()
    tokens = data.tokenize_files([DATA.parent / "fractions.py"], model.tokenizer)[: 8 * 128 + 1]
    assert np.exp(train.evaluate(model, tokens, seq_len=128)) < 100
