"""pytest plugin (entry point ``pytest11``) shipped with spon-toolkit.

It stays cheap to import: heavy imports happen inside fixtures and hooks.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def spon_tiny_model():
    """A tiny random Llama (2 layers, hidden 64) in eval mode, seeded."""
    from spon_toolkit.testing.tiny import make_tiny_llama

    return make_tiny_llama(seed=0)


@pytest.fixture
def spon_toolkit_fresh(tmp_path):
    """A fresh :class:`spon_toolkit.Toolkit` with built-ins only (no entry points, an empty plugins dir)."""
    from spon_toolkit.plugins import Toolkit

    empty = tmp_path / "spon_plugins_empty"
    empty.mkdir()
    return Toolkit(plugins_dir=empty, load_entrypoints=False)
