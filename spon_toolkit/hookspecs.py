"""The hook specifications of spon-toolkit: every extension point in one module.

Plugins implement these with ``@spon_toolkit.hookimpl``. Each *catalogue* hook receives one argument,
``register``, a callable ``register(name, factory, description="", **meta)`` bound to a typed registry and
to the plugin being loaded; registering a name twice is an error that names both plugins.
Hooks are always called with keyword arguments, and new arguments are only ever appended, so a plugin
written against an older version keeps working.

The factories' contracts are summarised per hook below, typed in :mod:`spon_toolkit.protocols` and
detailed with a minimal example each in ``docs/plugins.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .protocols import (
        AllocationStrategy,
        Analyzer,
        Command,
        ImportanceMethod,
        ModelLoader,
        Register,
        ReportSection,
        SparsifierFactory,
        TrainerFactory,
    )
    from .sites import ArchSpec

PROJECT = "spon_toolkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def spon_register_architectures(register: Register[ArchSpec]) -> None:
    """Register how a decoder architecture names its layers and linear modules.

    ``register(model_type, ArchSpec(...))`` where ``model_type`` is ``config.model_type`` of a
    transformers model and :class:`spon_toolkit.sites.ArchSpec` maps the toolkit's seven canonical
    modules (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) onto the model's attribute paths.
    """


@hookspec
def spon_register_model_loaders(register: Register[ModelLoader]) -> None:
    """Register model loaders.

    ``register(name, load)`` with ``load(name_or_path, *, dtype=None, device="auto", **options)``
    returning ``(model, tokenizer)``. The model is a transformers causal LM in eval mode on ``device``.
    """


@hookspec
def spon_register_sparsifiers(register: Register[SparsifierFactory]) -> None:
    """Register activation sparsifiers.

    ``register(name, factory)`` with ``factory(sparsity, **options)`` returning an object that follows
    :class:`spon_toolkit.sparsifiers.Sparsifier`: ``calibrate(model, sites, batches)``,
    ``function(site) -> (Tensor -> Tensor)`` and ``state_dict()`` / ``load_state_dict()``.
    ``sparsity`` is a float in [0, 1] or a mapping site -> float.
    """


@hookspec
def spon_register_allocations(register: Register[AllocationStrategy]) -> None:
    """Register allocation strategies: which sites get a SPON bias.

    ``register(name, allocate)`` with ``allocate(context, **options)`` returning the sites to bias
    (an iterable of site names), or ``{"biased_sites": [...], "sparse_sites": [...]}`` to change what is
    sparsified too; ``context`` is a :class:`spon_toolkit.allocation.AllocationContext` (layers, sparsified
    sites, parameter counts, importance scores). ``spon_toolkit.allocation.allocate`` validates the result.
    """


@hookspec
def spon_register_importance_methods(register: Register[ImportanceMethod]) -> None:
    """Register layer-importance methods (sensitivity, Shapley, cornerstone ...).

    ``register(name, score)`` with ``score(model, batches, sparsifier, sites, **options)`` returning a
    :class:`spon_toolkit.importance.ImportanceResult`: player (``layers.3`` or ``layers.3.mlp``) -> score,
    higher = more important, plus metadata. Optional meta ``feeds="<allocation>"`` names the allocation
    it serves; an allocation's meta ``requires="<method>"`` makes a sweep compute that method for it.
    """


@hookspec
def spon_register_trainers(register: Register[TrainerFactory]) -> None:
    """Register SPON trainers (the KL trainer and loss ablations).

    ``register(name, factory)`` with ``factory(**options)`` returning an object whose
    ``train(sparse_model, batches, *, calibration_batches=None)`` trains the biases attached to
    ``sparse_model`` (a :class:`spon_toolkit.sparse.SparseModel`; ``sparse_model.biases`` holds the
    parameters, ``with sparse_model.dense():`` gives the teacher) in place and returns a
    :class:`spon_toolkit.train.TrainResult` (``final_loss``, ``mean_loss``, ``training_loss``, per-step
    ``metrics``, ``steps``, ``tokens``, ``seconds``, ``objective``, ``options``). ``batches`` are token-id
    tensors ``[B, T]`` or dicts with ``input_ids``; ``calibration_batches`` feed a closed-form
    initialisation. Bad options raise :class:`spon_toolkit.errors.ConfigError` from the factory, before
    any model work. Built-ins: ``kl`` (default), ``reverse_kl``, ``js``, ``hidden_mse``.
    """


@hookspec
def spon_register_analyzers(register: Register[Analyzer]) -> None:
    """Register analyzers of trained biases and runs (PCA alignment, bias statistics, probes ...).

    ``register(name, analyze, description, scope="item", check=None)`` with ``analyze(run, **options)``
    returning a JSON-serialisable dict with string keys (validated; anything else is an error naming the
    plugin). ``scope="item"`` analyzers get a :class:`spon_toolkit.runner.AnalysisRun` per item (their answers
    land in the item record and ``analysis/<name>.json``); ``scope="sweep"`` analyzers run once per sweep or
    ``spon analyze`` call with a :class:`spon_toolkit.analysis.runs.SweepRun` over the finished items.
    ``check(options, context)`` raises :class:`spon_toolkit.errors.ConfigError` for bad options before any
    model work (``context`` may hold ``biased_sites``, ``dims`` per site and ``n_layers``); option names that
    ``analyze`` does not accept are refused from its signature. A report section registered under the
    analyzer's name shows its answers. Built-ins: ``pca_alignment``, ``bias_statistics``,
    ``hidden_state_shift``, ``category_probes``, ``cross_config`` (sweep).
    """


@hookspec
def spon_register_report_sections(register: Register[ReportSection]) -> None:
    """Register notebook report sections.

    ``register(name, build, order=100)`` with ``build(results) -> list`` of nbformat cells; sections
    are emitted in ascending ``order`` (the built-in summary is 5; ``order >= 1000`` is the appendix).
    """


@hookspec
def spon_register_commands(register: Register[Command]) -> None:
    """Register ``spon`` sub-commands.

    ``register(name, run, description, configure=configure)``: ``configure(parser)`` adds arguments to
    an ``argparse.ArgumentParser``; ``run(args, toolkit) -> int`` executes the command and returns the
    exit status. ``description`` is the one-line help shown by ``spon --help``.
    """
