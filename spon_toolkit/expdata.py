"""The token blocks of one experiment and what an item's seed changes in them (the seed scope).

Seed scope ``training`` (the default): every item trains on the same sample of training blocks with the same
calibration sample; its seed changes the batch order and the trainer's randomness only. Seed scope
``data``: the seed also draws the item's own training and calibration samples (closed-form init, threshold
calibration and importance scores follow the calibration sample). Validation and eval blocks never depend
on the seed, so items stay paired block by block. Seed 0 draws the same samples under both scopes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: what an interval over seeds measures, by seed scope (statistics.json and the report's protocol line)
SEED_SCOPE_MEANING = {
    "training": "seeds change the batch order and trainer randomness only; training and calibration samples "
                "are shared, so the interval is a lower bound on the variance of a fresh run",
    "data": "seeds also draw the training and calibration samples; eval blocks fixed, comparisons paired",
}
SEED_SCOPES = tuple(SEED_SCOPE_MEANING)


def data_sample_seeds(seed: int, scope: str) -> tuple[int, int]:
    """The sampling seeds ``(calibration, training)`` of the blocks an item with ``seed`` uses."""
    if scope not in SEED_SCOPES:
        raise ConfigError(f"seed scope must be one of {', '.join(SEED_SCOPES)}, got {scope!r}")
    return (0, 1) if scope == "training" else (2 * seed, 2 * seed + 1)


@dataclass
class ExperimentData:
    """The token blocks of one experiment (see :mod:`spon_toolkit.data`); training never sees eval text.

    ``pool`` is the whole calibration split the calibration and training samples are drawn from."""

    calibration: Any
    train: Any
    validation: Any
    eval: Any
    pool: Any = None
    sample_seeds: tuple[int, int] = (0, 1)

    def protocol(self, split: str) -> dict[str, Any]:
        blocks = getattr(self, split)
        return {} if blocks is None else blocks.protocol()

    @property
    def calibration_key(self) -> int:
        """Identifies the calibration sample (for caches of what is computed from it)."""
        return self.sample_seeds[0]


def load_experiment_data(experiment, tokenizer, max_length: int | None) -> ExperimentData:
    """The blocks of the spec's ``data`` key with the seed-0 samples."""
    from .data import load_blocks

    d = experiment.spec.data
    opts = dict(d.options)

    def split_blocks(split: str):
        source = getattr(d, f"{split}_source") or d.source
        local = experiment.path.parent / source  # paths in a spec are relative to the spec file
        source = str(local) if not Path(source).is_absolute() and local.exists() else source
        return load_blocks(tokenizer, source, split, d.block_size, max_length=max_length, **opts)

    pool = split_blocks("calibration")
    calibration = pool.sample(d.calibration_blocks, 0)
    train = pool.sample(d.train_blocks, 1) if d.train_blocks else calibration
    validation = split_blocks("validation").sample(d.validation_blocks, 0) if d.validation_blocks else None
    evaluation = split_blocks("eval").sample(d.eval_blocks, 0)
    if evaluation.text_sha256 == calibration.text_sha256:
        raise ConfigError(
            f"{experiment.path}: key 'data': the calibration and eval text are the same "
            f"({evaluation.source}); give distinct texts with data.calibration_source / data.eval_source")
    return ExperimentData(calibration, train, validation, evaluation, pool)


def seeded_data(base: ExperimentData, experiment, seed: int) -> ExperimentData:
    """``base`` with the calibration and training samples of ``seed`` under the spec's seed scope."""
    seeds = data_sample_seeds(seed, experiment.spec.seed_scope)
    if seeds == base.sample_seeds:
        return base
    d = experiment.spec.data
    calibration = base.pool.sample(d.calibration_blocks, seeds[0])
    train = base.pool.sample(d.train_blocks, seeds[1]) if d.train_blocks else calibration
    return replace(base, calibration=calibration, train=train, sample_seeds=seeds)


__all__ = ["SEED_SCOPES", "SEED_SCOPE_MEANING", "ExperimentData", "data_sample_seeds", "load_experiment_data", "seeded_data"]
