"""Fixtures for people who write spon-toolkit plugins (active through the toolkit's ``pytest11`` plugin).

- ``spon_make_toolkit(*plugins, plugins_dir=None)``: a fresh :class:`~spon_toolkit.plugins.Toolkit` with the
  built-ins plus your plugin objects (modules or classes with ``@hookimpl`` methods) and/or a directory of
  one-file plugins. Entry points are not loaded, so installed third-party plugins cannot interfere.
- ``spon_make_context(num_layers=4, sparse_sites="down_proj", **kw)``: an
  :class:`~spon_toolkit.allocation.AllocationContext` of a tiny random Llama (hidden 64, MLP 128).
- ``spon_allocation_context``: ``spon_make_context()`` with the defaults.
- ``spon_allocate``: ``spon_allocate(toolkit, name, context, **options)`` is
  :func:`spon_toolkit.allocation.allocate`, which validates the plan your strategy returns.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def spon_make_toolkit(tmp_path):
    """Factory for a fresh toolkit: built-ins + the given plugin objects (+ an optional plugins dir)."""
    from spon_toolkit.plugins import Toolkit, get_plugin_manager

    def make(*plugins, plugins_dir=None):
        if plugins_dir is None:
            plugins_dir = tmp_path / "spon_plugins_none"
            plugins_dir.mkdir(exist_ok=True)
        pm = get_plugin_manager(plugins_dir, load_entrypoints=False, extra_plugins=list(plugins))
        return Toolkit(pm)

    return make


@pytest.fixture
def spon_make_context():
    """Factory for an allocation context of a tiny random Llama (default 4 layers, down_proj sparsified)."""
    from spon_toolkit.allocation import AllocationContext
    from spon_toolkit.testing.tiny import make_tiny_llama

    def make(num_layers: int = 4, sparse_sites="down_proj", **kwargs):
        return AllocationContext.from_model(make_tiny_llama(seed=0, num_layers=num_layers), sparse_sites, **kwargs)

    return make


@pytest.fixture
def spon_allocation_context(spon_make_context):
    """An allocation context: tiny random Llama with 4 layers, down_proj of every layer sparsified."""
    return spon_make_context()


@pytest.fixture
def spon_allocate():
    """:func:`spon_toolkit.allocation.allocate`: run a strategy by name and validate its plan."""
    from spon_toolkit.allocation import allocate

    return allocate
