"""Errors the toolkit raises for bad input.

Every :class:`SponError` carries a one-line message that says what is wrong and how to fix it.
The CLI prints that line (no traceback) and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SponError(Exception):
    """Base class of the toolkit's user-facing errors (one line: what is wrong, how to fix it)."""


class ConfigError(SponError, ValueError):
    """A value given by the user (sparsity, site, option) is out of range or malformed."""


class UnknownNameError(SponError, KeyError):
    """A name (plugin, site, module) is not known."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class PluginError(SponError):
    """A plugin misbehaved: a duplicate name, a bad return value, a failed import."""


def suggest(name: str, known: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest known name, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    """Build the standard one-line error for an unknown name of some kind."""
    known = sorted(known)
    listing = ", ".join(known) if known else "(none registered)"
    return UnknownNameError(f"unknown {kind} '{name}'.{suggest(name, known)} Known: {listing}.")
