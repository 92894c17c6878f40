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


# --- docs/plugins.md: every hook's contract, checked against spon_toolkit/protocols.py -------------------

PLUGINS_DOC = (ROOT / "docs" / "plugins.md").read_text()


def _doc_section(hook: str) -> str:
    import re

    m = re.search(rf"^## `{hook}`\n(.*?)(?=^## |\Z)", PLUGINS_DOC, flags=re.S | re.M)
    assert m, f"docs/plugins.md has no section '## `{hook}`'"
    return m.group(1)


def _contract_signature(proto) -> str:
    """The Protocol's ``__call__`` signature without ``self``, as the docs write it."""
    class Raw(str):  # an annotation written as its source text (they are strings: postponed evaluation)
        def __repr__(self):
            return str(self)

    sig = inspect.signature(proto.__call__)
    params = [p.replace(annotation=Raw(p.annotation)) for p in list(sig.parameters.values())[1:]]
    return str(sig.replace(parameters=params, return_annotation=Raw(sig.return_annotation)))


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspec_is_typed_with_its_contract(hook):
    from spon_toolkit.protocols import HOOK_CONTRACTS

    contract = HOOK_CONTRACTS[hook]
    name = contract if isinstance(contract, str) else contract.__name__
    sig = inspect.signature(getattr(hookspecs, hook))
    assert list(sig.parameters) == ["register"]
    assert sig.parameters["register"].annotation == f"Register[{name}]"


@pytest.mark.parametrize("hook", HOOKS)
def test_docs_signature_matches_the_protocol(hook):
    from spon_toolkit.protocols import HOOK_CONTRACTS

    contract = HOOK_CONTRACTS[hook]
    expected = contract if isinstance(contract, str) else _contract_signature(contract)
    section = _doc_section(hook)
    line = next((ln for ln in section.splitlines() if ln.startswith("Signature: ")), None)
    assert line == f"Signature: `{expected}`", f"docs/plugins.md, {hook}: write 'Signature: `{expected}`'"


@pytest.mark.parametrize("hook", HOOKS)
def test_docs_example_registers_and_fits_the_contract(hook, tmp_path):
    """The section's example is a working plugin: loaded into a toolkit, it registers one entry whose
    factory accepts the contract's positional arguments."""
    import re
    import types

    from spon_toolkit.plugins import KINDS, Toolkit
    from spon_toolkit.protocols import HOOK_CONTRACTS
    from spon_toolkit.sites import ArchSpec

    code = re.findall(r"```python\n(.*?)```", _doc_section(hook), flags=re.S)
    assert len(code) == 1, f"docs/plugins.md, {hook}: one python example"
    module = types.ModuleType(f"doc_example_{hook}")
    exec(compile(code[0], f"docs/plugins.md:{hook}", "exec"), module.__dict__)
    tk = Toolkit(plugins_dir=tmp_path, load_entrypoints=False, extra_plugins=[module])
    kind = next(k for k, (h, _) in KINDS.items() if h == hook)
    mine = [e for e in tk.catalogue(kind) if e.plugin == module.__name__]
    assert len(mine) == 1
    factory = mine[0].factory
    contract = HOOK_CONTRACTS[hook]
    if isinstance(contract, str):
        assert isinstance(factory, ArchSpec)
        return
    params = list(inspect.signature(contract.__call__).parameters.values())[1:]
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    inspect.signature(factory).bind(*[None] * len(positional))  # raises TypeError if it does not fit


def test_builtin_plugin_list_matches_the_package():
    import pkgutil

    from spon_toolkit import builtin
    from spon_toolkit.plugins import BUILTIN_PLUGINS

    modules = sorted(m.name for m in pkgutil.iter_modules(builtin.__path__) if not m.name.startswith("_"))
    assert list(BUILTIN_PLUGINS) == modules, "list new built-in modules in spon_toolkit.plugins.BUILTIN_PLUGINS"


# --- the layout: imports point one way ------------------------------------------------------------------

#: docs/design.md "Architecture": a module may import from its own layer and the layers below it.
LAYERS = {
    "engine": ["errors", "fileio", "atomic", "sites", "activations", "sparsifiers", "sparse", "losses", "decode",
               "protocols", "registry", "hookspecs", "tiny"],
    "domain": ["aggregate", "contracts", "seed_checkpoint", "teacher", "models", "data", "evaluate", "checkpoint", "export", "train", "importance",
               "allocation", "analysis", "sae", "lmeval", "lmeval_data", "prompts"],
    "pipeline": ["experiment", "expdata", "eval_only", "records", "results", "runner", "report", "compat"],
    "entry": ["plugins", "builtin", "cli", "scaleout", "ray_executor", "testing", "__init__", "__main__", "lmeval_tasks"],
}
#: the one-line convenience API may reach the process-wide default toolkit (docs/plugins.md)
CONVENIENCE = {("spon_toolkit/models.py", "plugins"), ("spon_toolkit/train/seed_api.py", "plugins")}


def _spon_imports(path: Path):
    """(imported top-level spon_toolkit module, line) of every import in ``path``, type-checking-only
    imports excluded."""
    import ast

    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    pkg = list(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg[:-1] + ["__init__"]
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in skip:
            continue
        if node.level:
            mod = pkg[: len(pkg) - node.level] + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "spon_toolkit":
            mod = node.module.split(".")
        else:
            continue
        for dest in ([mod[1]] if len(mod) > 1 else [a.name for a in node.names]):
            yield dest, node.lineno


def test_every_module_has_a_layer():
    layered = {m for ms in LAYERS.values() for m in ms}
    tops = {p.relative_to(ROOT / "spon_toolkit").parts[0].removesuffix(".py")
            for p in (ROOT / "spon_toolkit").rglob("*.py")}
    assert tops <= layered, f"give these modules a layer in LAYERS and docs/design.md: {sorted(tops - layered)}"


def test_imports_point_down_the_layers():
    rank = {m: i for i, ms in enumerate(LAYERS.values()) for m in ms}
    wrong = []
    for path in (ROOT / "spon_toolkit").rglob("*.py"):
        src = path.relative_to(ROOT / "spon_toolkit").parts[0].removesuffix(".py")
        for dest, line in _spon_imports(path):
            rel = str(path.relative_to(ROOT))
            if rank.get(dest, -1) > rank[src] and (rel, dest) not in CONVENIENCE:
                wrong.append(f"{rel}:{line} imports {dest}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_module_is_over_the_size_limit():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "spon_toolkit").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 650}
    assert not big, f"split these modules by responsibility: {big}"
