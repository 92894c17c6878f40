"""Checked calls into plugins: every answer a plugin gives is validated, and an error names the plugin.

The core never calls a registered factory directly; it goes through these helpers, which

- turn a :class:`~spon_toolkit.errors.SponError` raised by the plugin into the same error prefixed with
  the plugin's name (one line for the CLI),
- turn any other exception into a :class:`~spon_toolkit.errors.PluginError` naming the plugin, and
- check the type and shape of what the plugin returned (a sparsifier must have ``calibrate``/``function``
  /``state_dict``, a trainer's result must be a ``TrainResult`` with finite numbers, an analyzer's answer
  must be a JSON object, a model loader must return ``(model, tokenizer)``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError, PluginError, SponError

SPARSIFIER_METHODS = ("calibrate", "function", "state_dict")


def who(kind: str, name: str, plugin: str) -> str:
    return f"{kind} '{name}' (plugin '{plugin}')"


def call(label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a plugin function; its errors become one line that names ``label`` (the plugin)."""
    try:
        return fn(*args, **kwargs)
    except SponError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(label) else f"{label}: {message}") from exc
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        raise PluginError(f"{label} failed: {type(exc).__name__}: {exc}") from exc


def bind_options(label: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Bind ``options`` against ``factory(first, **options)`` without calling it; a mismatch is one line
    listing the options the plugin takes. Callables without an introspectable signature pass."""
    import inspect

    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, **options)
    except TypeError as exc:
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        accepted = [p for p in list(signature.parameters)[1:] if signature.parameters[p].kind in kinds]
        unknown = [k for k in options if k not in accepted]
        problem = (f"has no option{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}"
                   if unknown else f"cannot take options {sorted(options)} ({exc})")
        raise ConfigError(f"{label} {problem}; its options: {', '.join(accepted) or 'none'}") from None


def build_sparsifier(toolkit, name: str, sparsity: Any, options: Mapping[str, Any] | None = None):
    """``toolkit.sparsifiers[name](sparsity, **options)``, checked to be a sparsifier."""
    entry = toolkit.sparsifiers.entry(name)
    label = who("sparsifier", name, entry.plugin)
    obj = call(label, entry.factory, sparsity, **dict(options or {}))
    missing = [m for m in SPARSIFIER_METHODS if not callable(getattr(obj, m, None))]
    if obj is None or missing:
        raise PluginError(f"{label} returned {type(obj).__name__}, not a sparsifier (missing "
                          f"{', '.join(missing)}); its factory must return an object with "
                          f"{', '.join(SPARSIFIER_METHODS)}")
    return obj


def build_trainer(toolkit, name: str, options: Mapping[str, Any] | None = None):
    """``toolkit.trainers[name](**options)``, checked to have ``train``."""
    entry = toolkit.trainers.entry(name)
    label = who("trainer", name, entry.plugin)
    obj = call(label, entry.factory, **dict(options or {}))
    if obj is None or not callable(getattr(obj, "train", None)):
        raise PluginError(f"{label} returned {type(obj).__name__}, not a trainer; its factory must return an "
                          f"object with train(sparse_model, batches, *, calibration_batches=None)")
    obj.spon_label = label
    return obj


def run_trainer(trainer, sparse_model, batches, **kwargs: Any):
    """``trainer.train(...)`` with its result checked (a TrainResult with finite numbers and finite biases)."""
    from .train import TrainResult

    label = getattr(trainer, "spon_label", f"trainer {type(trainer).__name__}")
    result = call(label, trainer.train, sparse_model, batches, **kwargs)
    if not isinstance(result, TrainResult):
        raise PluginError(f"{label} returned {type(result).__name__} from train(); return a "
                          f"spon_toolkit.train.TrainResult")
    for key in ("final_loss", "mean_loss"):
        value = getattr(result, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise PluginError(f"{label} returned {key}={value!r}; it must be a finite number")
    if sparse_model.biases is not None:
        for site, tensor in sparse_model.biases.tensors().items():
            if not bool(tensor.isfinite().all()):
                raise PluginError(f"{label} left non-finite values in the SPON bias of {site}")
    return result


def check_json(value: Any, label: str) -> dict[str, Any]:
    """An analyzer's answer: a JSON object (dict with string keys); NaN/inf are allowed as numbers."""
    if not isinstance(value, dict):
        raise PluginError(f"{label} returned {type(value).__name__}; an analyzer returns a JSON object (dict)")
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{label} returned a value that is not JSON-serialisable ({exc}); return dicts, "
                          f"lists, strings, numbers, booleans and None only") from None
    return value


def run_analyzer(toolkit, name: str, run: Any, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    entry = toolkit.analyzers.entry(name)
    label = who("analyzer", name, entry.plugin)
    return check_json(call(label, entry.factory, run, **dict(options or {})), label)


def check_loaded(result: Any, label: str) -> tuple[Any, Any]:
    """A model loader's answer: ``(model, tokenizer)`` with a torch module that has parameters."""
    import torch.nn as nn

    if not isinstance(result, tuple) or len(result) != 2:
        raise PluginError(f"{label} returned {type(result).__name__}; a model loader returns (model, tokenizer)")
    model, tokenizer = result
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise PluginError(f"{label} returned a {type(model).__name__} as the model; it must be a torch "
                          f"nn.Module with parameters (a transformers causal LM)")
    if tokenizer is None or not callable(tokenizer):
        raise PluginError(f"{label} returned {type(tokenizer).__name__} as the tokenizer; return the "
                          f"model's (callable) tokenizer")
    return model, tokenizer
