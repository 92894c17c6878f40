"""Shared fixtures. Unit tests use tiny random Llama models; tests marked ``slow`` use the real offline
model (smollm2-135m, converted once from its PyPI wheel and cached)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# No example database and no hypothesis cache in the checkout: tests leave no files outside temp dirs.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="spon-hypothesis-"))
settings.register_profile("spon", database=None, derandomize=True)
settings.load_profile("spon")

# Tests never load plugins from the environment or the working directory by accident.
os.environ.setdefault("SPON_DISABLE_PLUGIN_AUTOLOAD", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip (with the reason shown) on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_model():
    from spon_toolkit.testing.tiny import make_tiny_llama

    return make_tiny_llama(seed=0)


@pytest.fixture
def tiny_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 16), generator=g)


@pytest.fixture(scope="session")
def builtin_toolkit():
    """A toolkit with the built-in plugins only (entry points are off in tests), built once."""
    from spon_toolkit.plugins import Toolkit

    return Toolkit(plugins_dir=tempfile.mkdtemp(prefix="spon-noplugins-"))
