import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from tests import reference


@pytest.fixture(scope="session")
def hf_mixtral(tmp_path_factory):
    """A default tiny random-weight Mixtral saved by transformers."""
    return reference.make_hf_checkpoint(tmp_path_factory.mktemp("hf_mixtral"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
