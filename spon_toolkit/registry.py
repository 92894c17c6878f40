"""Typed registries that catalogue hooks fill.

Each catalogue hook (``spon_register_sparsifiers`` ...) receives a ``register`` callable bound to one
:class:`Registry` and to the plugin that is registering, so the toolkit always knows who registered what.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import PluginError, unknown

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing: its name, the factory that builds it and the plugin it came from."""

    name: str
    factory: T
    plugin: str
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A name -> :class:`Entry` map for one plugin kind (e.g. ``"sparsifier"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, factory: T, *, plugin: str, description: str = "", **meta: Any) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered a {self.kind} with an empty or non-string name")
        if name in self._entries:
            first = self._entries[name].plugin
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by plugin '{first}' and by plugin '{plugin}'; "
                f"rename one of them or block a plugin with SPON_BLOCK_PLUGINS"
            )
        self._entries[name] = Entry(name, factory, plugin, description, dict(meta))

    def binder(self, plugin: str) -> Callable[..., None]:
        """The ``register(name, factory, description="", **meta)`` callable handed to one plugin."""

        def register(name: str, factory: T, description: str = "", **meta: Any) -> None:
            self.add(name, factory, plugin=plugin, description=description, **meta)

        return register

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise unknown(self.kind, name, self._entries) from None

    def get(self, name: str) -> T:
        """The factory registered under ``name``; an unknown name lists the known ones."""
        return self.entry(name).factory

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
