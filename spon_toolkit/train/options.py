"""Training options (validated, strictly typed), the learning-rate schedule and the result of a run."""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError, SponError
from ..fileio import atomic_path
from ..losses import DEFAULT_CHUNK_SIZE

#: Default peak learning rate. Adam moves each element by at most about ``lr`` per step, while useful
#: SPON biases of SmolLM2's down_proj have norms ~0.6 (50%) to ~1.2 (60%) (closed form), so the seed's 1e-5
#: cannot get anywhere in a short run. Chosen from the learning curves (README, "Learning curves"): with
#: 8,192 training tokens and cosine decay, 1e-2 recovers 17 points more of the damage than 3e-3 at
#: sparsity 0.5, paired over 3 data seeds.
DEFAULT_LR = 1e-2


SCHEDULES = ("cosine", "linear", "constant")


INITS = ("zeros", "closed_form", "keep")


METRIC_FIELDS = ("step", "epoch", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")


class TrainingDivergedError(SponError):
    """The loss or gradient became NaN/inf; the biases were reset to the last finite-loss values."""


@dataclass
class TrainOptions:
    """Options shared by the built-in trainers (all keyword arguments of the trainer factories)."""

    learning_rate: float = DEFAULT_LR
    epochs: int | None = 1
    max_tokens: int | None = None  # a token budget; overrides epochs (cycles over the batches)
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    init: str = "closed_form"  # the mean error removed by sparsification (see SponBiases.init_closed_form)
    init_scale: float = 1.0  # multiplies the closed-form initial biases
    init_batches: int | None = 8  # calibration batches for the closed form (None: all)
    seed: int = 0
    shuffle: bool = True
    logging_steps: int = 10
    metrics_csv: str | None = None
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    temperature: float = 1.0
    autocast: str = "auto"  # auto | bf16 | off
    teacher_cache_mb: float = 1024.0
    progress: bool = True
    gradient_accumulation_steps: int = 1  # batches per optimiser step; the gradient equals the joined batch's
    #: rows per forward/backward within a batch (the same gradient up to float rounding): 2 rows took 1.4 GB
    #: less peak memory than whole 8-row batches at the same step time (benchmarks/bench_train.py)
    micro_batch_size: int | None = 2
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass (less memory)

    def __post_init__(self) -> None:
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
        if self.max_tokens is None and (self.epochs is None or int(self.epochs) < 1):
            raise ConfigError(f"epochs must be >= 1 (or give max_tokens), got {self.epochs!r}")
        if self.max_tokens is not None and int(self.max_tokens) < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got '{self.init}'")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and int(self.warmup_steps) < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be > 0 (or None for no clipping), got {self.max_grad_norm}")
        if int(self.logging_steps) < 1:
            raise ConfigError(f"logging_steps must be >= 1, got {self.logging_steps}")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ConfigError(f"chunk_size must be >= 1 token (or None), got {self.chunk_size}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ConfigError(f"autocast must be auto, bf16 or off, got '{self.autocast}'")
        if self.teacher_cache_mb < 0:
            raise ConfigError(f"teacher_cache_mb must be >= 0, got {self.teacher_cache_mb}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1) (Adam's decay rates), got {list(self.betas)}")
        if not math.isfinite(self.init_scale):
            raise ConfigError(f"init_scale must be a finite number, got {self.init_scale}")
        if self.init_batches is not None and self.init_batches < 1:
            raise ConfigError(f"init_batches must be >= 1 (or None for all), got {self.init_batches}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1 row (or None for whole batches), got {self.micro_batch_size}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        for name in ("warmup_ratio", "min_lr_ratio", "temperature", "teacher_cache_mb"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainOptions:
        """Options checked by type (strictly: ``epochs: 2.7``, ``lr: "abc"`` or ``progress: "no"`` are errors)
        and by range, one line per problem, before any model work."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(options) - names)
        if bad:
            raise ConfigError(f"unknown trainer option(s) {', '.join(bad)}; valid: {', '.join(sorted(names))}")
        options = dict(options)
        if isinstance(options.get("betas"), list):
            options["betas"] = tuple(options["betas"])
        adapters = _option_adapters(cls)
        for key, value in options.items():
            try:
                adapters[key].validate_python(value)
            except ValidationError as exc:
                want = exc.errors()[0]["msg"].removeprefix("Input should be ")
                if want.startswith("Field required"):
                    want = "a list of the documented length"
                raise ConfigError(f"trainer option '{key}' should be {want}, got {value!r} "
                                  f"({type(value).__name__})") from None
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@functools.cache
def _option_adapters(cls: type = None) -> dict[str, Any]:
    """One strict type check per field of ``cls`` (default :class:`TrainOptions`; ints are not fractions,
    strings not numbers)."""
    import typing

    from pydantic import ConfigDict, TypeAdapter

    cls = cls or TrainOptions
    hints = typing.get_type_hints(cls)
    return {f.name: TypeAdapter(hints[f.name], config=ConfigDict(strict=True)) for f in dataclasses.fields(cls)}


@dataclass
class TrainResult:
    """What a trainer returns: the loss curve, per-logging-step metrics and a summary."""

    final_loss: float  # mean loss over the last logging window
    mean_loss: float  # mean loss over all steps
    training_loss: list[float]  # the logged window means, in order
    metrics: list[dict[str, float]]
    steps: int
    tokens: int
    seconds: float
    objective: str
    options: dict[str, Any] = field(default_factory=dict)
    teacher_cached: bool = False
    metrics_csv: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _write_csv_atomic(path: str | os.PathLike, rows: Sequence[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in METRIC_FIELDS})


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay
