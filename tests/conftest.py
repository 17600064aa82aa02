import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests import reference

STDLIB_DATA = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"


@pytest.fixture(scope="session")
def hf_mixtral(tmp_path_factory):
    """A default tiny random-weight Mixtral saved by transformers."""
    return reference.make_hf_checkpoint(tmp_path_factory.mktemp("hf_mixtral"))


@pytest.fixture(scope="session")
def stdlib_tokenizer(tmp_path_factory):
    """A 384-piece SentencePiece model of argparse.py (the training tests' data), and that data file."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("stdlib_tokenizer")
    spm.SentencePieceTrainer.train(
        input=str(STDLIB_DATA), model_prefix=str(folder / "spm"), model_type="bpe", vocab_size=384,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    return folder / "spm.model"


@pytest.fixture(scope="session")
def train_setup(stdlib_tokenizer, tmp_path_factory):
    """A folder with that tokenizer (`spm.model`) and a tiny model config matching it (`config.json`)."""
    from mixtral_jax.config import preset

    folder = tmp_path_factory.mktemp("train_setup")
    (folder / "spm.model").write_bytes(stdlib_tokenizer.read_bytes())
    preset("tiny").replace(vocab_size=384, max_seq_len=256, n_experts=4).save(folder / "config.json")
    return folder


@pytest.fixture
def rng():
    return np.random.default_rng(0)
