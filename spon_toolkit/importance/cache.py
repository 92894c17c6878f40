"""Running an importance method through a toolkit's registry with an on-disk cache keyed by model
fingerprint, token-data hash, method, options, sparsifier state and sites."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..activations import iter_input_ids
from ..errors import PluginError
from ..fileio import atomic_write_json, to_jsonable
from ..sites import SiteMap
from ..sparsifiers import Sparsifier
from .methods import ImportanceResult

CACHE_VERSION = 1


def hash_batches(batches: Iterable) -> str:
    """A short hash of the token ids (shapes and values) of the calibration blocks."""
    h = hashlib.sha256()
    for ids in iter_input_ids(batches):
        ids = ids.detach().to("cpu", torch.int64).contiguous()
        h.update(repr(tuple(ids.shape)).encode())
        h.update(ids.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def cache_key(*, fingerprint: str, data_hash: str, method: str, options: Mapping[str, Any],
              sparsifier: Sparsifier | None, sites: Sequence[str]) -> str:
    """The cache key of one importance computation (a hex digest over everything that changes the result)."""
    payload = {
        "version": CACHE_VERSION, "fingerprint": fingerprint, "data": data_hash, "method": method,
        "options": to_jsonable({k: v for k, v in options.items() if k != "progress"}),
        "sparsifier": to_jsonable(sparsifier.state_dict()) if sparsifier is not None else None,
        "sites": list(sites),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _with_defaults(fn: Callable, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` completed with the method's keyword defaults, so that spelling out a default option
    and leaving it out give the same cache key."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(options)
    defaults = {p.name: p.default for p in params
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
                and p.name != "sitemap"}  # the sites are in the key already, resolved
    return {**defaults, **options}


def default_cache_dir() -> Path:
    from ..models import user_cache_dir

    return user_cache_dir() / "importance"


def compute_importance(method: str, model: nn.Module, batches: Iterable, sparsifier: Sparsifier | None = None,
                       sites: str | Iterable[str] | None = "down_proj", *, toolkit,
                       cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                       **options: Any) -> ImportanceResult:
    """Run importance method ``method`` (a plugin) with an on-disk cache.

    The cache key covers the model fingerprint, a hash of the token blocks, the method, its options, the
    sparsifier's state (thresholds included) and the resolved sites. ``meta["cache"]`` says ``"hit"`` or
    ``"miss"``; a hit keeps the wall time of the run that computed it.
    """
    from ..models import model_fingerprint

    entry = toolkit.importance_methods.entry(method)
    batches = list(iter_input_ids(batches))
    sitemap = SiteMap(model, toolkit.architectures)
    resolved = sitemap.resolve(sites) if sites else []
    path = None
    if use_cache:
        key = cache_key(fingerprint=model_fingerprint(model), data_hash=hash_batches(batches), method=method,
                        options=_with_defaults(entry.factory, options), sparsifier=sparsifier, sites=resolved)
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"{method}-{key[:24]}.json"
        if path.is_file():
            try:
                result = ImportanceResult.from_dict(json.loads(path.read_text()))
                result.meta["cache"] = "hit"
                return result
            except (OSError, ValueError, TypeError):
                pass  # a damaged cache entry is recomputed and overwritten
    if "sitemap" in inspect.signature(entry.factory).parameters:  # the toolkit's sites, for methods that take them
        options = {**options, "sitemap": sitemap}
    result = entry.factory(model, batches, sparsifier, resolved, **options)
    if not isinstance(result, ImportanceResult):
        raise PluginError(f"importance method '{method}' (plugin '{entry.plugin}') returned "
                          f"{type(result).__name__}, not an ImportanceResult")
    result.meta["cache"] = "miss" if use_cache else "off"
    if path is not None:
        atomic_write_json(path, result.to_dict(), indent=1)
    return result
