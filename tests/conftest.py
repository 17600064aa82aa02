import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests import reference

STDLIB_DATA = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
OWN_COMPILE_CACHE = pytest.StashKey[str]()
MAPS = Path("/proc/self/maps")
MAP_LIMIT = int(Path("/proc/sys/vm/max_map_count").read_text()) if MAPS.exists() else None


def pytest_configure(config):
    """One persistent compilation cache for the run: the xdist workers and the CLI subprocesses compile many
    of the same programs (the demo model's above all) and read them back instead. The process that makes it
    (the xdist controller, or a plain pytest) removes it at the end; the workers inherit its settings."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    config.stash[OWN_COMPILE_CACHE] = tempfile.mkdtemp(prefix="mixtral-jax-tests-compile-cache-")
    settings = {"jax_compilation_cache_dir": config.stash[OWN_COMPILE_CACHE],
                "jax_persistent_cache_min_compile_time_secs": 0.2}
    for name, value in settings.items():  # read when jax is imported, here and in every subprocess
        os.environ[name.upper()] = str(value)
    if "jax" in sys.modules:
        for name, value in settings.items():
            sys.modules["jax"].config.update(name, value)


def pytest_unconfigure(config):
    if OWN_COMPILE_CACHE in config.stash:
        shutil.rmtree(config.stash[OWN_COMPILE_CACHE], ignore_errors=True)


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
    """XLA:CPU maps three regions for every kernel of a compiled program, and a process past the kernel's
    `vm.max_map_count` crashes in its next mmap. A test process compiles thousands of programs, so once half
    the limit is in use JAX's compiled-program caches are dropped (what a test still holds stays mapped)."""
    yield
    if MAP_LIMIT and "jax" in sys.modules:
        with MAPS.open() as maps:
            used = sum(1 for _ in maps)
        if used > MAP_LIMIT // 2:
            sys.modules["jax"].clear_caches()
            gc.collect()


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
