"""Meta-tests: every hook spec is exercised by a test plugin and documented in the README."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from spon_toolkit import hookspecs
from spon_toolkit.plugins import KINDS

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("spon_"))


def test_hook_list_is_complete():
    assert HOOKS and set(HOOKS) == {hook for hook, _ in KINDS.values()}


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_in_readme(hook):
    assert f"`{hook}" in (ROOT / "README.md").read_text(), f"document {hook} in README.md's hook reference"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring(hook):
    assert (getattr(hookspecs, hook).__doc__ or "").strip()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_implemented_by_a_test_plugin(hook):
    sources = [p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_meta.py"]
    assert any(f"def {hook}(" in s for s in sources), f"add a test plugin implementing {hook}"
