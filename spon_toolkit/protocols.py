"""The plugin contracts as types: one :class:`typing.Protocol` per plugin kind.

A plugin registers a *factory* (or a function) with a catalogue hook (see :mod:`spon_toolkit.hookspecs`);
these Protocols say what that callable takes and returns. They are structural: a plugin needs no base
class, only the right shape. :mod:`spon_toolkit.contracts` checks the answers at run time (and names the
plugin when one is wrong); ``docs/plugins.md`` documents each hook with a minimal example, and
``tests/test_meta.py`` checks the signatures written there against these Protocols.

Engine-level module: imports only typing and the standard library (torch and transformers only for type
checkers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import torch
    import torch.nn as nn

    from .allocation import AllocationContext
    from .importance import ImportanceResult
    from .plugins import Toolkit
    from .sparse import SparseModel
    from .train import TrainResult

F = TypeVar("F", contravariant=True)


class Register(Protocol[F]):
    """The ``register`` callable a catalogue hook receives, bound to one registry and one plugin."""

    def __call__(self, name: str, factory: F, description: str = "", **meta: Any) -> None: ...


class ModelLoader(Protocol):
    """``spon_register_model_loaders``: load ``(model, tokenizer)``; the model is a transformers causal
    LM in eval mode on ``device``."""

    def __call__(self, name_or_path: str, *, dtype: Any = None, device: Any = "auto",
                 **options: Any) -> tuple[nn.Module, Any]: ...


@runtime_checkable
class SparsifierLike(Protocol):
    """What a sparsifier factory returns (the base class :class:`spon_toolkit.sparsifiers.Sparsifier`
    implements it)."""

    needs_calibration: bool

    def calibrate(self, model: nn.Module, sites: Iterable[str], batches: Iterable, sitemap: Any = None) -> None: ...

    def function(self, site: str) -> Callable[[torch.Tensor], torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SparsifierFactory(Protocol):
    """``spon_register_sparsifiers``: build a sparsifier at ``sparsity`` (a float in [0, 1] or a mapping
    site / module / ``"default"`` -> float)."""

    def __call__(self, sparsity: Any, **options: Any) -> SparsifierLike: ...


class AllocationStrategy(Protocol):
    """``spon_register_allocations``: the sites to bias, or ``{"biased_sites": [...], "sparse_sites":
    [...]}`` to change what is sparsified too."""

    def __call__(self, context: AllocationContext, **options: Any) -> Iterable[str] | Mapping[str, Any]: ...


class ImportanceMethod(Protocol):
    """``spon_register_importance_methods``: score players (``layers.3`` / ``layers.3.mlp``) on
    calibration batches; higher = more important. A method that declares a ``sitemap`` parameter gets the
    toolkit's :class:`spon_toolkit.sites.SiteMap` of the model."""

    def __call__(self, model: nn.Module, batches: Iterable, sparsifier: SparsifierLike | None,
                 sites: list[str], **options: Any) -> ImportanceResult: ...


@runtime_checkable
class TrainerLike(Protocol):
    """What a trainer factory returns: trains the biases attached to ``sparse_model`` in place."""

    def train(self, sparse_model: SparseModel, batches: Iterable, *,
              calibration_batches: Iterable | None = None) -> TrainResult: ...


class TrainerFactory(Protocol):
    """``spon_register_trainers``: build a trainer from its options (bad options raise
    :class:`spon_toolkit.errors.ConfigError` here, before any model work)."""

    def __call__(self, **options: Any) -> TrainerLike: ...


class Analyzer(Protocol):
    """``spon_register_analyzers``: analyse one item (an ``AnalysisRun``) or a sweep (a ``SweepRun``);
    returns a JSON object."""

    def __call__(self, run: Any, **options: Any) -> dict[str, Any]: ...


class AnalyzerCheck(Protocol):
    """The ``check=`` meta of an analyzer: raise ``ConfigError`` for bad options before any model work."""

    def __call__(self, options: dict[str, Any], context: dict[str, Any]) -> None: ...


class ReportSection(Protocol):
    """``spon_register_report_sections``: the notebook cells of one report section."""

    def __call__(self, results: Any) -> list[Any]: ...


class Command(Protocol):
    """``spon_register_commands``: run a ``spon`` sub-command; returns the exit status."""

    def __call__(self, args: argparse.Namespace, toolkit: Toolkit) -> int: ...


class CommandConfigure(Protocol):
    """The ``configure=`` meta of a command: add its arguments to the sub-command's parser."""

    def __call__(self, parser: argparse.ArgumentParser) -> None: ...


#: hook name -> the Protocol of what it registers (the meta-tests and docs/plugins.md use this table).
HOOK_CONTRACTS: dict[str, Any] = {
    "spon_register_architectures": "ArchSpec",  # a dataclass, not a callable: spon_toolkit.sites.ArchSpec
    "spon_register_model_loaders": ModelLoader,
    "spon_register_sparsifiers": SparsifierFactory,
    "spon_register_allocations": AllocationStrategy,
    "spon_register_importance_methods": ImportanceMethod,
    "spon_register_trainers": TrainerFactory,
    "spon_register_analyzers": Analyzer,
    "spon_register_report_sections": ReportSection,
    "spon_register_commands": Command,
}
