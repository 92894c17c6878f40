"""Third-party plugins: the one-file example, the installable example package, the README tutorial."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spon_toolkit.allocation import allocate
from spon_toolkit.errors import ConfigError
from spon_toolkit.plugins import Toolkit

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ("pytester",)


def readme_snippet(tag: str) -> str:
    """The python code block that follows ``<!-- tutorial: TAG -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- tutorial: {tag} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README lacks the '{tag}' tutorial snippet"
    return match.group(1)


def test_one_file_plugin_from_the_plugins_dir(spon_make_context):
    toolkit = Toolkit(plugins_dir=ROOT / "plugins", load_entrypoints=False)
    assert toolkit.allocations.entry("EVERY-OTHER").plugin == "example_allocation"
    plan = allocate(toolkit, "EVERY-OTHER", spon_make_context(num_layers=5))
    assert plan.biased_layers == [0, 2, 4] and plan.ratio == pytest.approx(0.6)
    assert allocate(toolkit, "EVERY-OTHER", spon_make_context(num_layers=5), step=3, offset=1).biased_layers == [1, 4]
    with pytest.raises(ConfigError, match=r"allocation 'EVERY-OTHER' \(plugin 'example_allocation'\): step"):
        allocate(toolkit, "EVERY-OTHER", spon_make_context(), step=0)


def test_readme_tutorial_plugin_and_its_test(pytester, capsys, monkeypatch):
    """The README's plugin runs from a plugins dir, and the README's test passes with the shipped fixtures."""
    monkeypatch.setenv("SPON_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins = pytester.mkdir("plugins")
    (plugins / "last_quarter.py").write_text(readme_snippet("plugin"))
    (pytester.path / "test_last_quarter.py").write_text(readme_snippet("test"))
    assert len(readme_snippet("plugin").strip().splitlines()) <= 16

    from spon_toolkit.cli import main

    assert main(["--plugins-dir", str(plugins), "plugins", "--json"]) == 0
    info = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert info["last_quarter"]["source"] == "plugins-dir"
    assert info["last_quarter"]["registers"] == {"allocations": ["LAST-QUARTER"]}

    pytester.syspathinsert(plugins)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", "test_last_quarter.py")
    result.assert_outcomes(passed=1)
    sys.modules.pop("last_quarter", None)


def test_example_package_installs_and_registers_through_its_entry_point(tmp_path, spon_make_context):
    target = tmp_path / "site"
    source = tmp_path / "example_package"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "plugins" / "example_package", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    sys.path.insert(0, str(target))
    try:
        toolkit = Toolkit(plugins_dir=empty, load_entrypoints=True)
        info = {p.name: p for p in toolkit.plugin_infos()}
        entry = info["example_allocations"]
        assert entry.source == "entrypoint" and entry.location == "spon-example-allocations==0.1.0"
        assert entry.registers == {"allocations": ["MIDDLE-50", "OUTPUT-WRITERS"]}
        ctx = spon_make_context(num_layers=6)
        assert allocate(toolkit, "MIDDLE-50", ctx).biased_layers == [1, 2, 3]
        writers = allocate(toolkit, "OUTPUT-WRITERS", ctx)
        assert writers.ratio == pytest.approx(2.0) and writers.plugin == "example_allocations"
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m.startswith("spon_example_allocations")]:
            del sys.modules[name]


def test_a_plugins_dir_strategy_returning_missing_sites_is_named(tmp_path):
    """A strategy loaded from a plugins dir whose plan names a layer the model lacks."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_alloc.py").write_text(
        "from spon_toolkit import hookimpl\n\n"
        "@hookimpl\n"
        "def spon_register_allocations(register):\n"
        "    register('BROKEN', lambda context: [f'layers.{context.n_layers}.down_proj'])\n")
    toolkit = Toolkit(plugins_dir=plugins, load_entrypoints=False)
    from spon_toolkit.allocation import AllocationContext
    from spon_toolkit.errors import PluginError
    from spon_toolkit.testing.tiny import make_tiny_llama

    ctx = AllocationContext.from_model(make_tiny_llama(num_layers=2))
    with pytest.raises(PluginError) as info:
        allocate(toolkit, "BROKEN", ctx)
    assert str(info.value) == (
        "allocation 'BROKEN' (plugin 'broken_alloc') returned biased site 'layers.2.down_proj', which this model "
        "does not have (layers 0-1, modules q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
