"""The seed repository's training API (``SPONConfig``, ``TrainingArgs``, ``SPONTrainer``) on top of the
toolkit's trainers; re-exported by :mod:`spon_toolkit.compat`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..contracts import build_sparsifier, build_trainer, run_trainer
from ..errors import ConfigError
from ..losses import DEFAULT_CHUNK_SIZE
from ..sparse import SparseModel, SponBiases
from .options import DEFAULT_LR, TrainResult


@dataclass
class SPONConfig:
    """Which layers get SPON biases, on which modules (the seed's allocation config).

    As in the seed, ``modules`` are sparsified in *every* layer and biases go on ``layer_mask x modules``.
    """

    name: str
    layer_mask: list[int]
    modules: list[str] = field(default_factory=lambda: ["down_proj"])
    capacity_multiplier: float = 1.0
    description: str = ""

    def bias_sites(self) -> list[str]:
        return [f"layers.{i}.{m}" for i in self.layer_mask for m in self.modules]


@dataclass
class TrainingArgs:
    """The seed's training arguments; fields after ``logit_l2_weight`` are this toolkit's additions.

    ``learning_rate`` defaults to :data:`DEFAULT_LR` (the seed's 1e-5 recovers little, see README),
    ``epochs`` to 1. ``distillation_loss`` takes the seed's values with the seed's meaning -- ``kl``,
    ``kl+logit_l2`` (weight ``logit_l2_weight``) and ``ce``, which in the seed is the cross-entropy to the
    dense distribution and therefore runs the ``soft_ce`` trainer -- or any other trainer plugin's name
    (``reverse_kl``, ``js``, ``hidden_mse``). ``kl_temperature`` is the distillation temperature,
    ``gradient_accumulation_steps`` joins batches into one optimiser step (same gradient as the joined
    batch); ``mixed_precision=False`` forces float32 (``autocast="off"``).
    """

    epochs: int = 1
    learning_rate: float = DEFAULT_LR
    batch_size: int = 8
    block_size: int = 128
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    kl_temperature: float = 1.0
    warmup_steps: int | None = None
    logging_steps: int = 10
    save_dir: str = "checkpoints"
    mixed_precision: bool = True
    device: str = "auto"
    distillation_loss: str = "kl"
    logit_l2_weight: float = 0.0
    # toolkit additions
    max_tokens: int | None = None
    init: str = "closed_form"
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    seed: int = 0
    sparsifier: str = "magnitude"
    metrics_csv: str | None = None
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    progress: bool = True

    #: the seed's distillation_loss values -> trainer plugins (others are trainer names already)
    SEED_LOSSES = {"kl": "kl", "ce": "soft_ce", "kl+logit_l2": "kl+logit_l2"}

    def trainer_name(self) -> str:
        """The trainer plugin that ``distillation_loss`` stands for (the seed's names keep their meaning)."""
        name = str(self.distillation_loss)
        return self.SEED_LOSSES.get(name.lower(), name)

    def trainer_options(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.trainer_name() == "kl+logit_l2":
            extra["logit_l2_weight"] = self.logit_l2_weight
        elif self.logit_l2_weight:
            raise ConfigError(f"logit_l2_weight={self.logit_l2_weight} only applies to "
                              f"distillation_loss='kl+logit_l2', not '{self.distillation_loss}'")
        return {**extra,
            "learning_rate": self.learning_rate, "epochs": self.epochs, "max_tokens": self.max_tokens,
            "warmup_steps": self.warmup_steps, "warmup_ratio": self.warmup_ratio, "schedule": self.schedule,
            "max_grad_norm": self.max_grad_norm, "init": self.init, "seed": self.seed,
            "logging_steps": self.logging_steps, "metrics_csv": self.metrics_csv, "chunk_size": self.chunk_size,
            "temperature": self.kl_temperature, "autocast": "auto" if self.mixed_precision else "off",
            "progress": self.progress, "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }


class SPONTrainer:
    """Seed-compatible trainer: ``SPONTrainer(model, config, sparsity, args).train(dataloader)``.

    Sparsifies ``config.modules`` in every layer with the ``args.sparsifier`` sparsifier (magnitude by
    default, as the seed), trains biases on ``config.layer_mask x config.modules`` with the trainer plugin
    named by ``args.distillation_loss``, and leaves the model dense (hooks removed) afterwards.
    """

    def __init__(self, model: nn.Module, config: SPONConfig, sparsity: float, args: TrainingArgs | None = None,
                 tokenizer=None):
        from ..plugins import default_toolkit
        from ..sites import SiteMap

        self.model = model
        self.config = config
        self.sparsity = sparsity
        self.args = args or TrainingArgs()
        self.tokenizer = tokenizer
        toolkit = default_toolkit()
        from ..models import resolve_device

        self.device = resolve_device(self.args.device)  # auto: CUDA > MPS > CPU, as the seed
        model.to(self.device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.sitemap = SiteMap(model)
        self.sparse_sites = self.sitemap.resolve(list(config.modules))
        self.sparsifier = build_sparsifier(toolkit, self.args.sparsifier, sparsity)
        bias_sites = self.sitemap.resolve(config.bias_sites()) if config.layer_mask else []
        self.biases = SponBiases(model, bias_sites, sitemap=self.sitemap)
        self.spon_params: list[nn.Parameter] = list(self.biases.params.values())
        self.trainer = build_trainer(toolkit, self.args.trainer_name(), self.args.trainer_options())
        self.result: TrainResult | None = None

    @property
    def spon_bias_map(self) -> dict[str, torch.Tensor]:
        return self.biases.seed_dict()

    def train(self, dataloader: Iterable) -> dict[str, Any]:
        """Train and return ``{'final_loss', 'training_loss', 'mean_loss', 'metrics', ...}``."""
        if getattr(self.sparsifier, "needs_calibration", False):
            self.sparsifier.calibrate(self.model, self.sparse_sites, dataloader, sitemap=self.sitemap)
        sm = SparseModel(self.model, self.sparsifier, self.sparse_sites, biases=self.biases, sitemap=self.sitemap)
        try:
            self.result = run_trainer(self.trainer, sm, dataloader)
        finally:
            sm.detach()
        return self.result.to_dict()

    def get_spon_biases(self) -> dict[str, torch.Tensor]:
        """Output-space biases keyed ``layer_{i}_{module}`` (detached copies), as the seed returns them."""
        return {k: v.detach().clone() for k, v in self.biases.seed_dict().items()}

    def save_spon_biases(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Write a safetensors checkpoint (see :mod:`spon_toolkit.checkpoint`)."""
        from ..checkpoint import save_checkpoint

        sm_sites = self.sparse_sites
        return save_checkpoint(
            path, self.biases, model=self.model, sparsifier=self.sparsifier, sparse_sites=sm_sites,
            training=dataclasses.asdict(self.args), extra={"config": dataclasses.asdict(self.config), **metadata},
        )

    def load_spon_biases(self, path: str | os.PathLike) -> None:
        from ..checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        ckpt.validate(self.model, sites=self.biases.sites, sparsity=self.sparsity)
        self.biases.load_tensors(ckpt.tensors)
