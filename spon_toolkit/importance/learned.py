"""Importance methods that use gradients, from the seed repository: gradient-norm sensitivity and ILA,
plus the seed's layer-selection rules (top-k, threshold, elbow).

- :func:`gradient_norm`: per decoder layer, the norm of the gradient of the next-token loss with respect to
  the layer's output hidden states (Frobenius norm over the batch), averaged over batches. One forward and
  one backward per batch for all layers at once (the seed's "fast" method); a first-order proxy, with no
  ablation.
- :func:`ila`: learned per-layer scales ``s_i`` of each layer's residual contribution: the layer's output
  ``h_in + f_i(h_in)`` becomes ``h_in + s_i f_i(h_in)`` with ``s_i = 2 sigmoid(m_i)``, ``m_i = 0`` at the start,
  so ``s_i = 1`` and the model is unchanged at initialisation (the seed scaled the whole layer output by
  ``sigmoid(1) = 0.73``, which changes the model before any learning). The scales are trained for ``steps``
  Adam steps on the next-token loss plus ``penalty x mean(s)`` (pressure to shrink scales that the loss does
  not need, as in the seed); the score of a layer is its final ``s_i`` (in (0, 2); a layer the model relies on
  keeps a scale near or above 1).

Both run on the dense model (the sparsifier and sites of the importance contract are not used) and restore
every parameter's ``requires_grad`` flag and the model's train/eval mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations import model_device
from ..errors import ConfigError
from ..sites import SiteMap
from .methods import ImportanceResult, _first_blocks
from .shapley import _quiet

RULES = ("top_k", "threshold", "elbow")


def _next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


class _Frozen:
    """Parameters without gradients and the model in eval mode for the duration; both restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.training = self.model.training
        for p, _ in self.flags:
            p.requires_grad_(False)
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _layer_protocol(batches: list[torch.Tensor], sitemap: SiteMap) -> dict[str, Any]:
    return {"blocks": sum(int(b.shape[0]) for b in batches), "block_size": int(batches[0].shape[1]),
            "tokens_scored": sum(int(b[:, 1:].numel()) for b in batches), "players": [f"layers.{i}" for i in
                                                                                     range(sitemap.n_layers)],
            "loss": "next-token cross-entropy (dense model)"}


def _calibration_rows(model: nn.Module, batches: Iterable, blocks: int | None, sitemap: SiteMap | None,
                      method: str) -> tuple[torch.Tensor, SiteMap, torch.device]:
    """The first ``blocks`` calibration blocks as one ``[rows, T]`` tensor, the model's sites and device."""
    data = _first_blocks(batches, blocks)
    if not data:
        raise ConfigError(f"{method} needs at least one calibration block")
    return torch.cat(data), sitemap or SiteMap(model), model_device(model)


def gradient_norm(model: nn.Module, batches: Iterable, sparsifier=None, sites=None, *, blocks: int | None = None,
                  batch_size: int = 4, progress: bool | None = None, sitemap: SiteMap | None = None) -> ImportanceResult:
    """``||dL/dh_i||`` per decoder layer ``i`` (h_i: the layer's output), averaged over batches of
    ``batch_size`` blocks of the first ``blocks`` calibration blocks."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive number of blocks, got {batch_size!r}")
    start = time.perf_counter()
    rows, sitemap, device = _calibration_rows(model, batches, blocks, sitemap, "gradient_norm")
    captured: list[torch.Tensor | None] = [None] * sitemap.n_layers

    def record(i: int):
        def hook(module, args, output):
            captured[i] = _hidden(output)

        return hook

    embed = model.get_input_embeddings()
    handles = [embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))]
    handles += [layer.register_forward_hook(record(i)) for i, layer in enumerate(sitemap.layers)]
    totals = torch.zeros(sitemap.n_layers, dtype=torch.float64)
    n_batches = 0
    try:
        with _Frozen(model):
            for ids in tqdm(rows.split(batch_size), desc="gradient norm", disable=_quiet(progress), leave=False):
                loss = _next_token_loss(model, ids.to(device))
                outs = [c for c in captured]
                grads = torch.autograd.grad(loss, outs, allow_unused=True)
                totals += torch.tensor([0.0 if g is None else float(torch.linalg.vector_norm(g.float()))
                                        for g in grads], dtype=torch.float64)
                n_batches += 1
                captured[:] = [None] * sitemap.n_layers
    finally:
        for h in handles:
            h.remove()
    mean = (totals / n_batches).tolist()
    scores = {f"layers.{i}": float(v) for i, v in enumerate(mean)}
    meta = {"protocol": {**_layer_protocol([rows], sitemap), "batch_size": batch_size, "batches": n_batches},
            "score": "mean over batches of the Frobenius norm of dL/d(layer output)"}
    return ImportanceResult("gradient_norm", scores, None, None, n_batches, time.perf_counter() - start, meta)


class LayerScales(nn.Module):
    """``s_i = 2 sigmoid(m_i)`` scaling each decoder layer's residual contribution; ``m = 0`` gives ``s = 1``.

    Use as a context manager: hooks are installed on enter and removed on exit."""

    def __init__(self, sitemap: SiteMap, device: torch.device | None = None):
        super().__init__()
        self.sitemap = sitemap
        self.logits = nn.Parameter(torch.zeros(sitemap.n_layers, dtype=torch.float32, device=device))
        self._handles: list[Any] = []

    def scales(self) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.logits)

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = _hidden(output)
            s = self.scales()[i]
            scaled = (h_in.float() + s * (h_out.float() - h_in.float())).to(h_out.dtype)
            return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

        return hook

    def __enter__(self):
        self._handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True)
                         for i, layer in enumerate(self.sitemap.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


def ila(model: nn.Module, batches: Iterable, sparsifier=None, sites=None, *, steps: int = 20,
        learning_rate: float = 0.05, penalty: float = 0.1, blocks: int | None = None, batch_size: int = 4,
        seed: int = 0, progress: bool | None = None, sitemap: SiteMap | None = None) -> ImportanceResult:
    """Learned residual scales per layer (see the module docstring); score = final ``s_i``.

    ``steps`` Adam steps with ``learning_rate``, cycling over batches of ``batch_size`` of the first ``blocks``
    calibration blocks in a seeded order."""
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"ILA {name} must be an integer >= {low}, got {value!r}")
    for name, value in (("learning_rate", learning_rate), ("penalty", penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"ILA {name} must be a finite number >= 0, got {value!r}")
    if learning_rate <= 0:
        raise ConfigError(f"ILA learning_rate must be > 0, got {learning_rate}")
    start = time.perf_counter()
    rows, sitemap, device = _calibration_rows(model, batches, blocks, sitemap, "ILA")
    chunks = list(rows.split(batch_size))
    scales = LayerScales(sitemap, device)
    optimizer = torch.optim.Adam(scales.parameters(), lr=float(learning_rate))
    gen = torch.Generator().manual_seed(int(seed))
    order: list[int] = []
    losses = []
    with _Frozen(model), scales:
        for _ in tqdm(range(steps), desc="ILA", disable=_quiet(progress), leave=False):
            if not order:
                order = torch.randperm(len(chunks), generator=gen).tolist()
            ids = chunks[order.pop()].to(device)
            ce = _next_token_loss(model, ids)
            loss = ce + float(penalty) * scales.scales().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(ce.detach()))
    final = scales.scales().detach().cpu().tolist()
    scores = {f"layers.{i}": float(v) for i, v in enumerate(final)}
    meta = {"protocol": {**_layer_protocol([rows], sitemap), "batch_size": batch_size, "steps": steps,
                         "learning_rate": float(learning_rate), "penalty": float(penalty), "seed": int(seed)},
            "ce_first": losses[0], "ce_last": losses[-1],
            "score": "learned scale of the layer's residual contribution (1 = unchanged; init 1)"}
    return ImportanceResult("ila", scores, None, None, steps, time.perf_counter() - start, meta)


def select_layers(scores: Mapping[int, float], rule: str = "top_k", *, k: int | None = None,
                  fraction: float = 0.5, threshold: float = 0.5) -> list[int]:
    """Layers chosen from per-layer scores (higher = more important), sorted.

    - ``top_k``: the ``k`` best (default ``floor(fraction * n + 0.5)``, at least 1); ties: lower layer first;
    - ``threshold``: score strictly above ``threshold``;
    - ``elbow``: sort scores in decreasing order and cut at the largest drop between neighbours; the layers
      before the drop are chosen. (The seed's rule cut one position later, so it also took the first layer
      after the drop; a tie between drops takes the first.)
    """
    if rule not in RULES:
        raise ConfigError(f"selection rule must be one of {', '.join(RULES)}, got '{rule}'")
    if not scores:
        raise ConfigError("no layer scores to select from")
    items = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    if rule == "threshold":
        return sorted(i for i, v in scores.items() if v > threshold)
    if rule == "top_k":
        if k is None:
            from ..allocation import check_fraction, layer_count

            k = layer_count(check_fraction(fraction), len(items))
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive number of layers, got {k!r}")
        return sorted(i for i, _ in items[:k])
    if len(items) == 1:
        return [items[0][0]]
    drops = [items[j][1] - items[j + 1][1] for j in range(len(items) - 1)]
    cut = max(range(len(drops)), key=lambda j: (drops[j], -j)) + 1
    return sorted(i for i, _ in items[:cut])
