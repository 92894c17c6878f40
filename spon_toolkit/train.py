"""SPON training: learn the attached biases so the sparse model's next-token distribution matches the dense one.

The trainer contract (hook ``spon_register_trainers``): ``factory(**options)`` returns an object with
``train(sparse_model, batches, *, calibration_batches=None) -> TrainResult``. The built-in trainers are
:class:`DistillationTrainer` subclasses that differ only in their objective:

- ``kl`` (default): ``KL(p_dense || p_sparse)`` per token, averaged (SPON's loss);
- ``reverse_kl``, ``js``: the same with ``KL(p_sparse || p_dense)`` / Jensen-Shannon;
- ``hidden_mse``: relative MSE between dense and sparse outputs of the sparsified sites.

One training step: the teacher (``with sm.dense()``, no gradients) gives targets for the batch; those are
cached per batch when they fit in ``teacher_cache_mb`` (they usually do: for the logit losses the cache
holds the teacher's final hidden states, ``tokens x hidden``, and teacher logits are re-derived from them
chunk by chunk through the frozen head), so later epochs do not run the teacher again. The student (the
sparse model with biases) runs with gradients and the loss is computed in token chunks
(:mod:`spon_toolkit.losses`). Only the SPON parameters train: every model weight has
``requires_grad=False`` while training (restored afterwards). AdamW, linear warm-up then cosine (or linear /
constant) decay, gradient clipping, a length in epochs or in tokens, seeded. A non-finite loss or gradient
stops training with :class:`TrainingDivergedError` after restoring the last biases that gave a finite loss.

Precision: biases are float32 and added in float32 (see :class:`spon_toolkit.sparse.SponBiases`). On CUDA,
``autocast="auto"`` runs a float32 model under bf16 autocast; on CPU it does not autocast (casting every
weight on every forward costs more than it saves) -- load the model in bfloat16 instead for a ~2.5x faster
forward (measured in ``benchmarks/bench_train.py``).

The seed repository's API (:class:`SPONConfig`, :class:`TrainingArgs`, :class:`SPONTrainer`) is kept at the
end of this module on top of the same machinery.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import ValidationError

from .atomic import atomic_path
from .contracts import build_sparsifier, build_trainer, run_trainer
from .errors import ConfigError, SponError
from .losses import DEFAULT_CHUNK_SIZE, chunked_divergence, hidden_mse
from .sparse import SparseModel, SponBiases, iter_input_ids, model_device

#: Default peak learning rate. Adam moves each element by at most about ``lr`` per step, while useful
#: SPON biases of SmolLM2's down_proj have norms ~0.6 (50%) to ~1.2 (60%) (closed form), so the seed's 1e-5
#: cannot get anywhere in a short run. The runs behind the defaults are in the README ("Training").
DEFAULT_LR = 3e-3
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
    init: str = "closed_form"  # measured: most of the recovery in short runs comes from it
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
        adapters = _option_adapters()
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
def _option_adapters() -> dict[str, Any]:
    """One strict type check per :class:`TrainOptions` field (ints are not fractions, strings not numbers)."""
    import typing

    from pydantic import ConfigDict, TypeAdapter

    hints = typing.get_type_hints(TrainOptions)
    return {f.name: TypeAdapter(hints[f.name], config=ConfigDict(strict=True)) for f in dataclasses.fields(TrainOptions)}


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


# --- the model split into body + head --------------------------------------------------------------

@dataclass
class HeadSplit:
    """``model(ids).logits == head(body(ids))`` for causal LMs whose logits are a plain linear head."""

    body: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]


#: config attributes that put a non-linear (or scaled) step between the decoder and the logits
_LOGIT_POSTPROCESSING = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def split_head(model: nn.Module) -> HeadSplit:
    """Split a causal LM into its decoder (-> final hidden states) and its output head.

    Falls back to ``body = full model logits, head = identity`` for models where that split is not
    known to be exact, so the loss is right for any model; only memory is saved by the split.
    """
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    post = [a for a in _LOGIT_POSTPROCESSING if getattr(config, a, None) not in (None, 1, 1.0)]
    if base is None or base is model or not isinstance(head, nn.Module) or post:
        return HeadSplit(lambda ids: model(input_ids=ids, use_cache=False).logits, lambda x: x)
    softcap = getattr(config, "final_logit_softcapping", None)

    def body(ids: torch.Tensor) -> torch.Tensor:
        return base(input_ids=ids, use_cache=False).last_hidden_state

    if softcap:
        def capped(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(head(x) / softcap) * softcap

        return HeadSplit(body, capped)
    return HeadSplit(body, head)


# --- trainers ----------------------------------------------------------------------------------------

class _SparsifierView:
    """A sparsifier restricted to some sites: identity elsewhere (closed-form init of unsparsified sites)."""

    def __init__(self, sparsifier, sites: Iterable[str]):
        self.sparsifier = sparsifier
        self.sites = set(sites)

    def function(self, site: str):
        if site in self.sites:
            return self.sparsifier.function(site)
        return lambda x: x


class DistillationTrainer:
    """The shared training loop. Subclasses define :meth:`teacher_targets` and :meth:`student_loss`."""

    objective = "base"

    def __init__(self, **options: Any):
        self.options = TrainOptions.from_options(options)

    # -- objective interface ----------------------------------------------------------------------------
    def prepare(self, sm: SparseModel) -> None:
        """Called once before training (e.g. to split the model or install capture hooks)."""

    def finish(self, sm: SparseModel) -> None:
        """Called once after training, also on errors (undo :meth:`prepare`)."""

    def teacher_targets(self, sm: SparseModel, ids: torch.Tensor) -> Any:
        """Targets from the dense model for one batch (called under ``no_grad`` and ``sm.dense()``)."""
        raise NotImplementedError

    def student_loss(self, sm: SparseModel, ids: torch.Tensor, targets: Any) -> torch.Tensor:
        """The scalar loss of the sparse model with biases on one batch (with gradients)."""
        raise NotImplementedError

    @staticmethod
    def _nbytes(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(DistillationTrainer._nbytes(v) for v in obj.values())
        return 0

    # -- the loop ---------------------------------------------------------------------------------------
    def _autocast(self, device: torch.device):
        mode = self.options.autocast
        if mode == "off" or (mode == "auto" and device.type != "cuda"):
            return contextlib.nullcontext()
        if mode == "auto" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _init_biases(self, sm: SparseModel, batches: list[torch.Tensor]) -> None:
        opts = self.options
        biases = sm.biases
        assert biases is not None
        if opts.init == "keep":
            return
        with torch.no_grad():
            for p in biases.params.values():
                p.zero_()
        if opts.init == "closed_form":
            if sm.sparsifier is None:
                raise ConfigError("closed-form initialisation needs a sparsifier on the model")
            calib = batches if opts.init_batches is None else batches[: int(opts.init_batches)]
            view = _SparsifierView(sm.sparsifier, sm.sparse_sites)
            with sm.dense(), torch.no_grad():
                biases.init_closed_form(sm.model, view, calib)
                if opts.init_scale != 1.0:
                    for p in biases.params.values():
                        p.mul_(opts.init_scale)

    def train(
        self,
        sparse_model: SparseModel,
        batches: Iterable,
        *,
        calibration_batches: Iterable | None = None,
    ) -> TrainResult:
        """Train ``sparse_model.biases`` on ``batches`` (token-id tensors or dicts with ``input_ids``).

        ``calibration_batches`` feed the closed-form initialisation (default: the training batches).
        Returns a :class:`TrainResult`; writes the metrics CSV when ``metrics_csv`` is set.
        """
        opts = self.options
        sm = sparse_model
        if sm.biases is None or not sm.biases.sites:
            raise ConfigError("no sites carry a SPON bias, so there is nothing to train; give bias sites "
                              "(e.g. --bias-sites down_proj)")
        model = sm.model
        device = model_device(model)
        data = [ids.to(device) for ids in iter_input_ids(batches)]
        if not data:
            raise ConfigError("no training batches; give at least one batch of token ids")
        params = [p for p in sm.biases.params.values()]
        tokens_per_batch = [ids.numel() for ids in data]
        n = len(data)
        if opts.max_tokens is not None:
            steps = 0
            budget = int(opts.max_tokens)
            while budget > 0:
                budget -= tokens_per_batch[steps % n]
                steps += 1
        else:
            steps = int(opts.epochs) * n
        warmup = int(opts.warmup_steps) if opts.warmup_steps is not None else int(opts.warmup_ratio * steps)

        frozen = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            gen = torch.Generator().manual_seed(opts.seed)
            try:
                for p, _ in frozen:
                    p.requires_grad_(False)
                for p in params:
                    p.requires_grad_(True)
                model.eval()
                self.prepare(sm)
                self._init_biases(sm, list(iter_input_ids(calibration_batches)) if calibration_batches
                                  is not None else data)
                return self._loop(sm, data, params, steps, warmup, gen, device)
            finally:
                self.finish(sm)
                for p, flag in frozen:
                    p.requires_grad_(flag)
                model.train(was_training)

    def _loop(self, sm, data, params, steps, warmup, gen, device) -> TrainResult:
        opts = self.options
        optimizer = torch.optim.AdamW(params, lr=opts.learning_rate, betas=tuple(opts.betas),
                                      weight_decay=opts.weight_decay)
        n = len(data)
        cache: dict[int, Any] = {}
        cache_bytes = 0
        cache_full = False
        metrics: list[dict[str, float]] = []
        losses: list[float] = []
        window_loss, window_norm, window_steps, window_tokens = 0.0, 0.0, 0, 0
        last_good = [p.detach().clone() for p in params]
        tokens_seen = 0
        start = window_start = time.perf_counter()
        order: list[int] = []
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train {self.objective}", unit="step",
                   disable=None if opts.progress else True, leave=False)
        try:
            for step in range(steps):
                epoch, pos = divmod(step, n)
                if pos == 0:
                    order = (torch.randperm(n, generator=gen).tolist() if opts.shuffle else list(range(n)))
                idx = order[pos]
                ids = data[idx]
                lr = opts.learning_rate * lr_factor(step, steps, warmup, opts.schedule, opts.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                targets = cache.get(idx)
                if targets is None:
                    with torch.no_grad(), sm.dense(), self._autocast(device):
                        targets = self.teacher_targets(sm, ids)
                    size = self._nbytes(targets)
                    if not cache_full and cache_bytes + size <= opts.teacher_cache_mb * 2**20:
                        cache[idx] = targets
                        cache_bytes += size
                    else:
                        cache_full = True

                with self._autocast(device):
                    loss = self.student_loss(sm, ids, targets)
                value = float(loss.detach())
                if not math.isfinite(value):
                    self._restore(params, last_good)
                    raise TrainingDivergedError(
                        f"loss became {value} at step {step + 1}; biases reset to the last finite-loss values "
                        f"(lower the learning rate, currently {opts.learning_rate:g}, or use float32)")
                for p, good in zip(params, last_good, strict=True):
                    good.copy_(p.detach())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if opts.max_grad_norm is not None:
                    norm = float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm))
                else:
                    norm = float(torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])))
                if not math.isfinite(norm):
                    self._restore(params, last_good)
                    raise TrainingDivergedError(
                        f"gradient norm became {norm} at step {step + 1}; biases reset to the last "
                        f"finite-loss values (lower the learning rate or use float32)")
                optimizer.step()

                tokens_seen += ids.numel()
                losses.append(value)
                window_loss += value
                window_norm += norm
                window_steps += 1
                window_tokens += ids.numel()
                bar.update(1)
                if (step + 1) % opts.logging_steps == 0 or step + 1 == steps:
                    now = time.perf_counter()
                    row = {
                        "step": step + 1, "epoch": epoch + 1, "tokens": tokens_seen,
                        "loss": window_loss / window_steps, "lr": lr, "grad_norm": window_norm / window_steps,
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "elapsed_s": now - start,
                    }
                    metrics.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    window_loss, window_norm, window_steps, window_tokens = 0.0, 0.0, 0, 0
                    window_start = now
        finally:
            bar.close()
            if opts.metrics_csv and metrics:
                _write_csv_atomic(opts.metrics_csv, metrics)
        return TrainResult(
            final_loss=metrics[-1]["loss"], mean_loss=sum(losses) / len(losses),
            training_loss=[m["loss"] for m in metrics], metrics=metrics, steps=steps, tokens=tokens_seen,
            seconds=time.perf_counter() - start, objective=self.objective, options=opts.to_dict(),
            teacher_cached=len(cache) == n, metrics_csv=opts.metrics_csv,
        )

    @staticmethod
    @torch.no_grad()
    def _restore(params: list[torch.Tensor], good: list[torch.Tensor]) -> None:
        for p, g in zip(params, good, strict=True):
            p.copy_(g)


class LogitDistillationTrainer(DistillationTrainer):
    """Match next-token distributions with a divergence of :mod:`spon_toolkit.losses` (``kl`` ...).

    Teacher targets are the final hidden states of the dense model (``tokens x hidden``, cheap to cache);
    the loss re-derives teacher logits chunk by chunk through the frozen head.
    """

    divergence = "kl"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.objective = self.divergence
        self._split: HeadSplit | None = None

    def prepare(self, sm: SparseModel) -> None:
        self._split = split_head(sm.model)

    def teacher_targets(self, sm: SparseModel, ids: torch.Tensor) -> torch.Tensor:
        assert self._split is not None
        return self._split.body(ids).detach()

    def student_loss(self, sm: SparseModel, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        assert self._split is not None
        head = self._split.head
        flat_t = targets.reshape(-1, targets.shape[-1])

        def teacher(sl: slice) -> torch.Tensor:
            with torch.no_grad():
                return head(flat_t[sl])

        hidden = self._split.body(ids)
        return chunked_divergence(teacher, hidden, divergence=self.divergence, head=head,
                                  chunk_size=self.options.chunk_size, temperature=self.options.temperature)


class KLTrainer(LogitDistillationTrainer):
    """``KL(p_dense || p_sparse)`` per token, averaged over tokens: SPON's objective (the default)."""

    divergence = "kl"


class ReverseKLTrainer(LogitDistillationTrainer):
    """``KL(p_sparse || p_dense)``: mode-seeking; a loss ablation."""

    divergence = "reverse_kl"


class JSTrainer(LogitDistillationTrainer):
    """Jensen-Shannon divergence between dense and sparse next-token distributions; a loss ablation."""

    divergence = "js"


class HiddenMSETrainer(DistillationTrainer):
    """Relative MSE between dense and sparse outputs of the sparsified sites (after the SPON bias).

    Targets are the dense outputs of every sparsified site (cached while they fit in ``teacher_cache_mb``,
    otherwise recomputed each step). A loss ablation: it matches what each layer emits rather than what
    the model predicts.
    """

    objective = "hidden_mse"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def prepare(self, sm: SparseModel) -> None:
        if not sm.sparse_sites:
            raise ConfigError("hidden_mse compares the outputs of sparsified sites, but none are sparsified")

        def make_hook(site: str):
            def hook(module, args, output):
                self._captured[site] = output

            return hook

        # Registered after the bias hooks, so the student's captured output includes its bias.
        self._handles = [sm.sitemap.module(s).register_forward_hook(make_hook(s)) for s in sm.sparse_sites]

    def finish(self, sm: SparseModel) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._captured = {}

    def _run(self, sm: SparseModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        base = getattr(sm.model, "base_model", sm.model)
        base(input_ids=ids, use_cache=False)
        out, self._captured = self._captured, {}
        return out

    def teacher_targets(self, sm: SparseModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s: t.detach() for s, t in self._run(sm, ids).items()}

    def student_loss(self, sm: SparseModel, ids: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden_mse(targets, self._run(sm, ids))


# --- the seed repository's API -----------------------------------------------------------------------

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
    ``epochs`` to 1. ``distillation_loss`` names a trainer plugin (``kl``, ``reverse_kl``, ``js``,
    ``hidden_mse``); ``mixed_precision=False`` forces float32 (``autocast="off"``).
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

    def trainer_options(self) -> dict[str, Any]:
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps other than 1 is not supported; use a larger batch_size")
        if self.logit_l2_weight:
            raise ConfigError("logit_l2_weight is not supported; use distillation_loss='kl' with weight 0")
        return {
            "learning_rate": self.learning_rate, "epochs": self.epochs, "max_tokens": self.max_tokens,
            "warmup_steps": self.warmup_steps, "warmup_ratio": self.warmup_ratio, "schedule": self.schedule,
            "max_grad_norm": self.max_grad_norm, "init": self.init, "seed": self.seed,
            "logging_steps": self.logging_steps, "metrics_csv": self.metrics_csv, "chunk_size": self.chunk_size,
            "temperature": self.kl_temperature, "autocast": "auto" if self.mixed_precision else "off",
            "progress": self.progress,
        }


class SPONTrainer:
    """Seed-compatible trainer: ``SPONTrainer(model, config, sparsity, args).train(dataloader)``.

    Sparsifies ``config.modules`` in every layer with the ``args.sparsifier`` sparsifier (magnitude by
    default, as the seed), trains biases on ``config.layer_mask x config.modules`` with the trainer plugin
    named by ``args.distillation_loss``, and leaves the model dense (hooks removed) afterwards.
    """

    def __init__(self, model: nn.Module, config: SPONConfig, sparsity: float, args: TrainingArgs | None = None,
                 tokenizer=None):
        from .plugins import default_toolkit
        from .sites import SiteMap

        self.model = model
        self.config = config
        self.sparsity = sparsity
        self.args = args or TrainingArgs()
        self.tokenizer = tokenizer
        toolkit = default_toolkit()
        if self.args.device not in ("auto", None):
            model.to(self.args.device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.sitemap = SiteMap(model)
        self.sparse_sites = self.sitemap.resolve(list(config.modules))
        self.sparsifier = build_sparsifier(toolkit, self.args.sparsifier, sparsity)
        bias_sites = self.sitemap.resolve(config.bias_sites()) if config.layer_mask else []
        self.biases = SponBiases(model, bias_sites, sitemap=self.sitemap)
        self.spon_params: list[nn.Parameter] = list(self.biases.params.values())
        self.trainer = build_trainer(toolkit, self.args.distillation_loss, self.args.trainer_options())
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
        from .checkpoint import save_checkpoint

        sm_sites = self.sparse_sites
        return save_checkpoint(
            path, self.biases, model=self.model, sparsifier=self.sparsifier, sparse_sites=sm_sites,
            training=dataclasses.asdict(self.args), extra={"config": dataclasses.asdict(self.config), **metadata},
        )

    def load_spon_biases(self, path: str | os.PathLike) -> None:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        ckpt.validate(self.model, sites=self.biases.sites, sparsity=self.sparsity)
        self.biases.load_tensors(ckpt.tensors)


__all__ = [
    "DEFAULT_LR", "TrainOptions", "TrainResult", "TrainingDivergedError", "DistillationTrainer",
    "LogitDistillationTrainer", "KLTrainer", "ReverseKLTrainer", "JSTrainer", "HiddenMSETrainer",
    "split_head", "lr_factor", "SPONConfig", "TrainingArgs", "SPONTrainer",
]
