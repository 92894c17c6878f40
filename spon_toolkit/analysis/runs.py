"""Calling analyzer plugins: option checks before model work, answer validation, the cross-item run.

The analyzer contract (hook ``spon_register_analyzers``) is ``register(name, analyze, description, scope=...,
check=...)``: ``scope="item"`` (default) analyzers run once per finished item with a
:class:`spon_toolkit.runner.AnalysisRun`; ``scope="sweep"`` analyzers run once per sweep (or ``spon analyze``
call) with a :class:`SweepRun` over all finished items. ``check(options, context)`` raises
:class:`~spon_toolkit.errors.ConfigError` for bad options before any model work; ``context`` may hold
``biased_sites`` (list), ``dims`` ({site: bias dimension}) and ``n_layers`` when they are known. Options that
``analyze`` does not accept are refused here, from its signature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PluginError

SCOPES = ("item", "sweep")


def scope_of(entry) -> str:
    scope = entry.meta.get("scope", "item")
    if scope not in SCOPES:
        raise PluginError(f"analyzer '{entry.name}' (plugin '{entry.plugin}') registered scope={scope!r}; "
                          f"use one of {SCOPES}")
    return scope


def check_analyzer(toolkit, name: str, options: Mapping[str, Any], context: Mapping[str, Any] | None = None,
                   *, where: str = "") -> None:
    """Refuse options that ``analyze(run, **options)`` does not take and let the analyzer's own
    ``check(options, context)`` judge the values; one-line errors naming the analyzer and its plugin."""
    from ..contracts import bind_options, call, who

    entry = toolkit.analyzers.entry(name)
    scope_of(entry)
    label = who("analyzer", name, entry.plugin)
    prefix = f"{where}: " if where else ""
    try:
        bind_options(label, entry.factory, options)
        check = entry.meta.get("check")
        if check is not None:
            call(label, check, dict(options), dict(context or {}))
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


@dataclass
class SweepEntry:
    """One finished item (or checkpoint) seen by a sweep-scope analyzer."""

    id: str
    config: str
    seed: int | None
    sparsity: Any
    checkpoint: Any  # spon_toolkit.checkpoint.Checkpoint
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepRun:
    """What a ``scope="sweep"`` analyzer receives: every finished item with its checkpoint, and the model.

    ``calibration``: calibration token blocks (:class:`spon_toolkit.data.TokenBlocks`) for closed-form
    initialisations, or None; ``model`` is dense, no hooks attached.
    """

    entries: list[SweepEntry]
    model: Any
    tokenizer: Any
    sitemap: Any
    toolkit: Any
    calibration: Any
    run_dir: Path
    figures_dir: Path
