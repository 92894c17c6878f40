"""The built-in trainers: the distillation loop (teacher cache, AdamW, schedule, clipping) and its objectives
(``kl``, ``reverse_kl``, ``js`` on the logits; ``hidden_mse`` on the sparsified sites' outputs)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..activations import iter_input_ids, model_device
from ..errors import ConfigError
from ..losses import chunked_cross_entropy, chunked_divergence, hidden_mse, kl_logit_l2_rows
from ..sparse import SparseModel
from ..teacher import nbytes
from .options import TrainingDivergedError, TrainOptions, TrainResult, _write_csv_atomic, lr_factor
from .surgery import HeadSplit, _SparsifierView, checkpointed_layers, split_head


def _rows(targets: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of batch-first teacher targets (a tensor or a dict of tensors)."""
    if isinstance(targets, torch.Tensor):
        return targets[start:stop]
    if isinstance(targets, dict):
        return {k: _rows(v, start, stop) for k, v in targets.items()}
    raise TypeError(f"teacher targets must be a tensor or a dict of tensors to be split by rows, "
                    f"got {type(targets).__name__}")


class DistillationTrainer:
    """The shared training loop. Subclasses define :meth:`teacher_targets` and :meth:`student_loss`."""

    objective = "base"
    options_class: type[TrainOptions] = TrainOptions
    #: a :class:`spon_toolkit.teacher.SharedTeacher` set by the runner: targets shared across items
    shared_teacher = None

    def __init__(self, **options: Any):
        self.options = self.options_class.from_options(options)

    def teacher_key(self, sm: SparseModel) -> tuple | None:
        """What the teacher targets depend on besides the batch, or ``None``: not shareable across items."""
        return None

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
        on_step: Callable[[int, int], None] | None = None,
    ) -> TrainResult:
        """Train ``sparse_model.biases`` on ``batches`` (token-id tensors or dicts with ``input_ids``).

        ``calibration_batches`` feed the closed-form initialisation (default: the training batches).
        ``on_step(step, tokens)`` is called after the initialisation (step 0) and after every optimiser
        step, with the biases in place (e.g. to evaluate a learning curve; it must not change them).
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
                layers = sm.sitemap.layers if opts.activation_checkpointing else ()
                with checkpointed_layers(layers):
                    return self._loop(sm, data, params, steps, warmup, gen, device, on_step)
            finally:
                self.finish(sm)
                for p, flag in frozen:
                    p.requires_grad_(flag)
                model.train(was_training)

    @staticmethod
    def _groups(micro_steps: int, n: int, accumulate: int) -> list[tuple[int, list[tuple[int, int]]]]:
        """Optimiser steps as ``(epoch, [(epoch, position), ...])``: ``accumulate`` consecutive batches of one
        epoch per step; an epoch's last group may be smaller (as in the seed: no batch is dropped)."""
        groups: list[tuple[int, list[tuple[int, int]]]] = []
        current: list[tuple[int, int]] = []
        for micro in range(micro_steps):
            epoch, pos = divmod(micro, n)
            current.append((epoch, pos))
            if len(current) == accumulate or pos == n - 1 or micro == micro_steps - 1:
                groups.append((epoch, current))
                current = []
        return groups

    def _loop(self, sm, data, params, micro_steps, warmup, gen, device, on_step=None) -> TrainResult:
        opts = self.options
        optimizer = torch.optim.AdamW(params, lr=opts.learning_rate, betas=tuple(opts.betas),
                                      weight_decay=opts.weight_decay)
        n = len(data)
        groups = self._groups(micro_steps, n, int(opts.gradient_accumulation_steps))
        steps = len(groups)
        if opts.gradient_accumulation_steps > 1 and opts.warmup_steps is None:
            warmup = int(opts.warmup_ratio * steps)  # in optimiser steps
        cache: dict[int, Any] = {}
        shared_keys = None
        base_key = self.teacher_key(sm) if self.shared_teacher is not None else None
        if base_key is not None:
            from ..teacher import batch_fingerprint

            shared_keys = [(*base_key, self.options.autocast, device.type, batch_fingerprint(ids)) for ids in data]
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
        if on_step is not None:
            on_step(0, 0)
        try:
            for step, (epoch, group) in enumerate(groups):
                lr = opts.learning_rate * lr_factor(step, steps, warmup, opts.schedule, opts.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                indices = []
                for _, pos in group:
                    if pos == 0:
                        order = (torch.randperm(n, generator=gen).tolist() if opts.shuffle else list(range(n)))
                    indices.append(order[pos])
                group_tokens = sum(data[i].numel() for i in indices)
                optimizer.zero_grad(set_to_none=True)
                value = 0.0
                for idx in indices:
                    ids = data[idx]
                    targets = cache.get(idx)
                    if targets is None and shared_keys is not None:
                        targets = self.shared_teacher.get(shared_keys[idx])
                        if targets is not None:
                            cache[idx] = targets
                    if targets is None:
                        with torch.no_grad(), sm.dense(), self._autocast(device):
                            targets = self.teacher_targets(sm, ids)
                        if shared_keys is not None and self.shared_teacher.put(shared_keys[idx], targets):
                            cache[idx] = targets  # counted in the shared budget, not this item's
                        else:
                            size = nbytes(targets)
                            if not cache_full and cache_bytes + size <= opts.teacher_cache_mb * 2**20:
                                cache[idx] = targets
                                cache_bytes += size
                            else:
                                cache_full = True

                    rows = ids.shape[0] if opts.micro_batch_size is None else int(opts.micro_batch_size)
                    for r in range(0, ids.shape[0], rows):
                        piece = ids[r:r + rows]
                        with self._autocast(device):
                            loss = self.student_loss(sm, piece, _rows(targets, r, r + rows))
                        micro = float(loss.detach())
                        if not math.isfinite(micro):
                            self._restore(params, last_good)
                            raise TrainingDivergedError(
                                f"loss became {micro} at step {step + 1}; biases reset to the last finite-loss "
                                f"values (lower the learning rate, currently {opts.learning_rate:g}, or use float32)")
                        # token-weighted, so accumulated batches and micro-batches give the gradient of the
                        # batch they join into
                        weight = piece.numel() / group_tokens
                        value += micro * weight
                        (loss * weight if weight != 1.0 else loss).backward()
                for p, good in zip(params, last_good, strict=True):
                    good.copy_(p.detach())
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

                tokens_seen += group_tokens
                if on_step is not None:  # its time is left out of tokens/s and elapsed time
                    t_cb = time.perf_counter()
                    on_step(step + 1, tokens_seen)
                    t_cb = time.perf_counter() - t_cb
                    start += t_cb
                    window_start += t_cb
                losses.append(value)
                window_loss += value
                window_norm += norm
                window_steps += 1
                window_tokens += group_tokens
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

    def teacher_key(self, sm: SparseModel) -> tuple | None:
        return ("final_hidden", id(sm.model))  # the dense model's final hidden states

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
        return chunked_divergence(teacher, hidden, divergence=self.row_divergence(), head=head,
                                  chunk_size=self.options.chunk_size, temperature=self.options.temperature)

    def row_divergence(self):
        """What :func:`spon_toolkit.losses.chunked_divergence` computes per token: a name or a function."""
        return self.divergence


class KLTrainer(LogitDistillationTrainer):
    """``KL(p_dense || p_sparse)`` per token, averaged over tokens: SPON's objective (the default)."""

    divergence = "kl"


class ReverseKLTrainer(LogitDistillationTrainer):
    """``KL(p_sparse || p_dense)``: mode-seeking; a loss ablation."""

    divergence = "reverse_kl"


class JSTrainer(LogitDistillationTrainer):
    """Jensen-Shannon divergence between dense and sparse next-token distributions; a loss ablation."""

    divergence = "js"


@dataclass
class HiddenMSEOptions(TrainOptions):
    """:class:`TrainOptions` with whole batches: the loss divides by the mean square of the whole batch's
    dense outputs, so micro-batches would change it."""

    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.micro_batch_size is not None:
            raise ConfigError("hidden_mse divides by the mean square of the whole batch's dense outputs, so "
                              "micro-batches would change the loss; leave micro_batch_size unset "
                              "(activation_checkpointing saves memory without changing it)")


class HiddenMSETrainer(DistillationTrainer):
    """Relative MSE between dense and sparse outputs of the sparsified sites (after the SPON bias).

    Targets are the dense outputs of every sparsified site (cached while they fit in ``teacher_cache_mb``,
    otherwise recomputed each step). A loss ablation: it matches what each layer emits rather than what
    the model predicts.
    """

    objective = "hidden_mse"
    options_class = HiddenMSEOptions

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

    def teacher_key(self, sm: SparseModel) -> tuple | None:
        return ("site_outputs", id(sm.model), tuple(sm.sparse_sites))  # dense outputs of these sites

    def student_loss(self, sm: SparseModel, ids: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden_mse(targets, self._run(sm, ids))


@dataclass
class KLLogitL2Options(TrainOptions):
    """:class:`TrainOptions` plus the weight of the logit L2 term."""

    logit_l2_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.logit_l2_weight) and self.logit_l2_weight >= 0):
            raise ConfigError(f"logit_l2_weight must be a finite number >= 0, got {self.logit_l2_weight}")


class KLLogitL2Trainer(LogitDistillationTrainer):
    """``KL(p_dense || p_sparse) + logit_l2_weight * mean (z_sparse - z_dense)^2`` (the seed's ``kl+logit_l2``):
    the KL plus an L2 pull of the raw logits towards the dense ones. With weight 0 it is ``kl``."""

    divergence = "kl+logit_l2"
    options_class = KLLogitL2Options

    def row_divergence(self):
        return kl_logit_l2_rows(self.options.logit_l2_weight)


class SoftCETrainer(LogitDistillationTrainer):
    """Cross-entropy to the dense model's distribution, ``-sum p_dense log p_sparse`` (the seed's ``ce``).

    It differs from ``kl`` by the teacher's entropy, a constant of the data: the gradients, hence the trained
    biases, are the ``kl`` ones; only the reported loss is larger."""

    divergence = "soft_ce"


class CETrainer(DistillationTrainer):
    """Next-token cross-entropy of the sparse model on the data itself (language modelling, no teacher).

    Biases learn to predict the text rather than to imitate the dense model; a loss ablation. Each block of
    ``T`` tokens gives ``T - 1`` predictions (as in perplexity). ``temperature`` must stay 1."""

    objective = "ce"

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.options.temperature != 1.0:
            raise ConfigError(f"the ce trainer has no teacher to soften; temperature must be 1, "
                              f"got {self.options.temperature}")
        self._split: HeadSplit | None = None

    def prepare(self, sm: SparseModel) -> None:
        self._split = split_head(sm.model)

    def teacher_targets(self, sm: SparseModel, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] < 2:
            raise ConfigError("the ce trainer needs blocks of at least 2 tokens (one next-token prediction)")
        return ids[..., 1:]

    def student_loss(self, sm: SparseModel, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        assert self._split is not None
        hidden = self._split.body(ids)[..., :-1, :]
        return chunked_cross_entropy(targets, hidden, head=self._split.head, chunk_size=self.options.chunk_size)
