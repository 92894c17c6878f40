"""Plugin manager factory and the typed :class:`Toolkit` facade over it.

Load order: the local plugins directory, then entry points of group ``spon_toolkit``, then the
built-ins, then ``check_pending()``. Catalogues list registrations in that order, so a duplicate-name
error names the earlier plugin first.

Environment:

- ``SPON_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry-point plugins (the plugins directory still loads when
  it is given explicitly).
- ``SPON_BLOCK_PLUGINS=name1,name2`` blocks plugins by name (built-ins are named ``spon.<module>``,
  e.g. ``spon.sparsifiers``; entry points by their entry-point name; plugins-dir files by file stem).
- ``SPON_PLUGINS_DIR=DIR`` is the default plugins directory (otherwise ``./plugins`` if it exists).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .protocols import (
        AllocationStrategy,
        Analyzer,
        Command,
        ImportanceMethod,
        ModelLoader,
        ReportSection,
        SparsifierFactory,
        TrainerFactory,
    )
    from .sites import ArchSpec

ENTRYPOINT_GROUP = "spon_toolkit"
ENV_DISABLE_AUTOLOAD = "SPON_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "SPON_BLOCK_PLUGINS"
ENV_PLUGINS_DIR = "SPON_PLUGINS_DIR"

#: catalogue kind -> (hook name, human name of one entry)
KINDS: dict[str, tuple[str, str]] = {
    "architectures": ("spon_register_architectures", "architecture"),
    "model_loaders": ("spon_register_model_loaders", "model loader"),
    "sparsifiers": ("spon_register_sparsifiers", "sparsifier"),
    "allocations": ("spon_register_allocations", "allocation strategy"),
    "importance_methods": ("spon_register_importance_methods", "importance method"),
    "trainers": ("spon_register_trainers", "trainer"),
    "analyzers": ("spon_register_analyzers", "analyzer"),
    "report_sections": ("spon_register_report_sections", "report section"),
    "commands": ("spon_register_commands", "command"),
}


@dataclass
class PluginInfo:
    """Where a loaded plugin came from."""

    name: str
    source: str  # "builtin" | "entrypoint" | "plugins-dir"
    location: str = ""  # module path, distribution==version, or file path
    registers: dict[str, list[str]] = field(default_factory=dict)


def _env_truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _blocked_from_env() -> set[str]:
    return {n.strip() for n in os.environ.get(ENV_BLOCK, "").split(",") if n.strip()}


#: The built-in plugins, in load order (alphabetical): each is a module of :mod:`spon_toolkit.builtin`
#: registered as ``spon.<module>``. Listed, not discovered, so a stray file in the package is never loaded as a plugin
#: (``tests/test_plugins.py`` checks the list against the package).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "allocations", "analysis_sections", "analyzers", "architectures", "cmd_analyze", "cmd_doctor", "cmd_eval",
    "cmd_import_seed", "cmd_importance", "cmd_lmeval", "cmd_plugins", "cmd_run", "cmd_sae", "cmd_train", "downstream_sections",
    "importance", "loaders", "report_sections", "sae_analyzer", "seed_importance", "sparsifiers", "trainers",
)

#: Built-ins that cannot be blocked: every model needs the architecture table, and ``spon plugins`` must
#: always be able to say what is loaded.
UNBLOCKABLE: frozenset[str] = frozenset({"spon.architectures", "spon.cmd_plugins"})


def builtin_module_names() -> list[str]:
    """The modules of ``spon_toolkit.builtin`` that are plugins, in load order."""
    return list(BUILTIN_PLUGINS)


def _load_plugins_dir(pm: pluggy.PluginManager, directory: Path, infos: dict[str, PluginInfo]) -> None:
    if not directory.is_dir():
        raise PluginError(f"plugins directory '{directory}' does not exist; pass an existing --plugins-dir")
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = path.stem
        if pm.is_blocked(name):
            continue
        mod_name = f"spon_plugins_dir.{name}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a broken local plugin must say which file
            raise PluginError(f"plugin file '{path}' failed to import: {type(exc).__name__}: {exc}") from exc
        sys.modules[mod_name] = module
        pm.register(module, name=name)
        infos[name] = PluginInfo(name, "plugins-dir", str(path))


def _load_entrypoints(pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRYPOINT_GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"entry-point plugin '{ep.name}' ({ep.value}) failed to load: {type(exc).__name__}: {exc}; "
                f"fix or uninstall it, or block it with {ENV_BLOCK}={ep.name}"
            ) from exc
        pm.register(plugin, name=ep.name)
        dist = getattr(ep, "dist", None)
        location = f"{dist.metadata['Name']}=={dist.version}" if dist is not None else ep.value
        infos[ep.name] = PluginInfo(ep.name, "entrypoint", location)


def get_plugin_manager(
    plugins_dir: str | os.PathLike | None = None,
    *,
    load_entrypoints: bool | None = None,
    blocked: set[str] | None = None,
    extra_plugins: list[Any] = (),
) -> pluggy.PluginManager:
    """Build a fresh plugin manager with all plugins loaded.

    ``plugins_dir``: a directory of one-file plugins (default: ``$SPON_PLUGINS_DIR``, else ``./plugins``
    if present). ``load_entrypoints``: default is ``not $SPON_DISABLE_PLUGIN_AUTOLOAD``. ``blocked``: plugin
    names to block, added to ``$SPON_BLOCK_PLUGINS``. ``extra_plugins``: objects registered before the
    built-ins (tests use this).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    pm.spon_plugin_infos = infos  # type: ignore[attr-defined]
    for name in sorted(_blocked_from_env() | set(blocked or ())):
        if name in UNBLOCKABLE:
            raise PluginError(f"the built-in plugin '{name}' cannot be blocked (the toolkit needs it); remove it "
                              f"from {ENV_BLOCK} or the blocked set")
        pm.set_blocked(name)

    if plugins_dir is None:
        env_dir = os.environ.get(ENV_PLUGINS_DIR)
        if env_dir:
            plugins_dir = env_dir
        elif Path("plugins").is_dir():
            plugins_dir = "plugins"
    if plugins_dir is not None:
        _load_plugins_dir(pm, Path(plugins_dir), infos)

    if load_entrypoints is None:
        load_entrypoints = not _env_truthy(ENV_DISABLE_AUTOLOAD)
    if load_entrypoints:
        _load_entrypoints(pm, infos)

    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"extra-{i}"
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
            infos[name] = PluginInfo(name, "extra", repr(plugin))

    for mod in builtin_module_names():
        name = f"spon.{mod}"
        if pm.is_blocked(name):
            continue
        pm.register(importlib.import_module(f"spon_toolkit.builtin.{mod}"), name=name)
        infos[name] = PluginInfo(name, "builtin", f"spon_toolkit.builtin.{mod}")

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements an unknown hook: {exc}") from exc
    return pm


class Toolkit:
    """Typed access to what the plugins registered: ``toolkit.sparsifiers.get("magnitude")``.

    Each catalogue is filled on first access by calling every plugin's hook implementation with a
    ``register`` bound to that plugin, so duplicates are reported with both plugin names.
    """

    def __init__(self, pm: pluggy.PluginManager | None = None, **kwargs: Any):
        self.pm = pm if pm is not None else get_plugin_manager(**kwargs)

    def catalogue(self, kind: str) -> Registry:
        if kind not in KINDS:
            raise KeyError(kind)
        cache = self.__dict__.setdefault("_catalogues", {})
        if kind not in cache:
            hook_name, label = KINDS[kind]
            registry: Registry = Registry(label)
            hook = getattr(self.pm.hook, hook_name)
            # pluggy returns implementations in call order reversed; keep load order (plugins dir first).
            for impl in hook.get_hookimpls():
                try:
                    impl.function(register=registry.binder(impl.plugin_name))
                except PluginError:
                    raise
                except Exception as exc:  # a broken plugin is named, not a traceback
                    raise PluginError(
                        f"plugin '{impl.plugin_name}' failed in {hook_name}: {type(exc).__name__}: {exc}; "
                        f"fix it or block it with {ENV_BLOCK}={impl.plugin_name}") from exc
            cache[kind] = registry
        return cache[kind]

    @cached_property
    def architectures(self) -> Registry[ArchSpec]:
        return self.catalogue("architectures")

    @cached_property
    def model_loaders(self) -> Registry[ModelLoader]:
        return self.catalogue("model_loaders")

    @cached_property
    def sparsifiers(self) -> Registry[SparsifierFactory]:
        return self.catalogue("sparsifiers")

    @cached_property
    def allocations(self) -> Registry[AllocationStrategy]:
        return self.catalogue("allocations")

    @cached_property
    def importance_methods(self) -> Registry[ImportanceMethod]:
        return self.catalogue("importance_methods")

    @cached_property
    def trainers(self) -> Registry[TrainerFactory]:
        return self.catalogue("trainers")

    @cached_property
    def analyzers(self) -> Registry[Analyzer]:
        return self.catalogue("analyzers")

    @cached_property
    def report_sections(self) -> Registry[ReportSection]:
        return self.catalogue("report_sections")

    @cached_property
    def commands(self) -> Registry[Command]:
        return self.catalogue("commands")

    def plugin_infos(self) -> list[PluginInfo]:
        """Every loaded plugin with its source and what it registered, by kind."""
        infos: dict[str, PluginInfo] = self.pm.spon_plugin_infos  # type: ignore[attr-defined]
        for info in infos.values():
            info.registers = {}
        for kind in KINDS:
            for entry in self.catalogue(kind):
                infos[entry.plugin].registers.setdefault(kind, []).append(entry.name)
        return list(infos.values())


_default: Toolkit | None = None


def default_toolkit() -> Toolkit:
    """A process-wide toolkit for the convenience API (``load_model`` ...); tests build their own."""
    global _default
    if _default is None:
        _default = Toolkit()
    return _default
