"""spon-toolkit: TEAL-style activation sparsification with learned SPON biases.

Public names are imported lazily so that ``import spon_toolkit`` (done by the pytest plugin) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (pluggy only, cheap)

_EXPORTS: dict[str, str] = {
    # errors
    "SponError": "errors", "ConfigError": "errors", "PluginError": "errors", "UnknownNameError": "errors",
    # plugin core
    "Toolkit": "plugins", "get_plugin_manager": "plugins", "default_toolkit": "plugins", "Registry": "registry",
    # sites and engine
    "SiteMap": "sites", "ArchSpec": "sites", "MODULES": "sites",
    "magnitude_sparsify": "sparsifiers", "threshold_sparsify": "sparsifiers",
    "compute_sparsity_stats": "sparsifiers", "Sparsifier": "sparsifiers",
    "MagnitudeSparsifier": "sparsifiers", "ThresholdSparsifier": "sparsifiers",
    "attach_sparsifier": "sparse", "SponBiases": "sparse", "SparseModel": "sparse", "sparsified": "sparse",
    "register_sparsification_hooks": "sparse", "remove_hooks": "sparse",
    # allocation and layer importance
    "AllocationContext": "allocation", "AllocationPlan": "allocation", "allocate": "allocation",
    "load_overrides": "allocation", "compute_importance": "importance", "ImportanceResult": "importance",
    # models, data, evaluation
    "load_model": "models", "model_fingerprint": "models",
    "create_calibration_dataloader": "data", "compute_perplexity": "evaluate",
    "load_blocks": "data", "load_text": "data", "TokenBlocks": "data",
    "evaluate_perplexity": "evaluate", "PerplexityResult": "evaluate",
    # training
    "SPONConfig": "train", "TrainingArgs": "train", "SPONTrainer": "train",
    # experiments and results
    "compute_pareto_frontier": "results", "ExperimentManager": "results", "load_results": "results",
    "load_experiment": "experiment", "ExperimentRunner": "runner", "run_experiment": "runner",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spon_toolkit' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", "hookimpl", *_EXPORTS]
