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

import inspect
import json
import math
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
    """Refuse unknown option names and let the analyzer's own ``check`` judge the values (one-line errors)."""
    entry = toolkit.analyzers.entry(name)
    scope_of(entry)
    prefix = f"{where}: " if where else ""
    params = inspect.signature(entry.factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [n for n, p in list(params.items())[1:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        for key in options:
            if key not in allowed:
                raise ConfigError(f"{prefix}analyzer '{name}' has no option '{key}'; its options: "
                                  f"{', '.join(allowed) or '(none)'}")
    check = entry.meta.get("check")
    if check is None:
        return
    try:
        check(dict(options), dict(context or {}))
    except ConfigError as exc:
        raise ConfigError(f"{prefix}analyzer '{name}': {exc}") from None


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def call_analyzer(toolkit, name: str, run: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Run one analyzer and validate its answer: a dict with string keys that JSON can hold."""
    entry = toolkit.analyzers.entry(name)
    answer = entry.factory(run, **dict(options))
    who = f"analyzer '{name}' (plugin '{entry.plugin}')"
    if not isinstance(answer, dict) or not all(isinstance(k, str) for k in answer):
        raise PluginError(f"{who} returned {type(answer).__name__}; it must return a dict with string keys")
    try:
        json.dumps(_finite(answer), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{who} returned an answer that is not JSON-serialisable: {exc}") from None
    return answer


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
