"""Evaluating existing checkpoints instead of training (the seed's ``--skip_training --checkpoint_dir``).

A sweep whose spec has ``checkpoints: DIR`` runs every item as usual (calibration, allocation, TEAL, dense,
evaluation, analyzers) but, where it would train, loads ``DIR/<item slug>.safetensors`` -- the file a sweep
with the same items wrote to ``runs/run_*/checkpoints/`` -- and validates it against the item: same model
(architecture, depth, fingerprint), the plan's biased sites, the item's sparsity. The evaluation then uses
the sweep's own sparsifier, calibrated on the same data with the same seed as the sweep that trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, load_checkpoint


def checkpoint_dir(spec_path: Path | None, directory: str) -> Path:
    """``directory`` relative to the spec file (like data sources), else as given; must exist.

    It is a run's ``checkpoints/`` folder, or an experiment's results directory (``<output-dir>/<experiment>``,
    the one holding ``metadata.json``): then the checkpoints of its latest run."""
    local = (spec_path.parent / directory) if spec_path is not None else Path(directory)
    path = local if local.is_dir() else Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoints: '{directory}' is not a directory (relative to the spec file or the "
                              f"working directory); point it at a run's checkpoints/ folder or an experiment's results directory")
    if (path / "metadata.json").is_file():
        from .results import latest_run_dir

        _, run_dir = latest_run_dir(path)
        if run_dir is None:
            raise CheckpointError(f"checkpoints: '{path / 'metadata.json'}' names no latest run; point "
                                  f"checkpoints at a run's checkpoints/ folder")
        path = run_dir / "checkpoints"
        if not path.is_dir():
            raise CheckpointError(f"checkpoints: the latest run has no checkpoints folder '{path}'; re-run the "
                                  f"sweep that trains them")
    return path


def load_item_biases(directory: Path, slug: str, biases, *, model, sparsity: float) -> dict[str, Any]:
    """Fill ``biases`` (a SponBiases on the plan's biased sites) from ``directory/<slug>.safetensors``.

    Returns the training information to record: the checkpoint's own ``training`` metadata plus
    ``from_checkpoint`` (the file's path)."""
    path = directory / f"{slug}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoints: no '{path.name}' in '{directory}' for this item; evaluate-only sweeps "
                              f"need the checkpoints of a sweep with the same configs, sparsities and seeds")
    ckpt = load_checkpoint(path)
    ckpt.validate(model, sites=biases.sites, sparsity=sparsity)
    if ckpt.parametrisation != biases.parametrisation:
        raise CheckpointError(f"checkpoint '{path}' holds {ckpt.parametrisation}-space biases, the sweep "
                              f"{biases.parametrisation}-space ones")
    biases.load_tensors(ckpt.tensors)
    training = {k: v for k, v in dict(ckpt.metadata.get("training") or {}).items() if k != "trainer"}
    return {**training, "from_checkpoint": str(path)}
