"""The seed repository's public helper names, as thin wrappers over the toolkit's engine.

A script written against the seed (``src.sparse_forward``, ``src.spon_trainer``, ``src.evaluation``) can
import these names from here instead. Where the toolkit's semantics differ (top-k ``k``, pre-hooks instead of
post-hooks, float32 bias addition, the default learning rate), the README's seed-compatibility table says so.

- :class:`SparseLinear`: ``y = W S(x) + b + spon_bias`` around an existing ``nn.Linear`` (the seed's drop-in
  module);
- :func:`patch_model_for_sparse_forward` / :func:`unpatch_model`: sparsify ``target_modules`` in every layer
  (with optional ``layer_{i}_{module}`` biases). The seed replaced the modules for good; here the engine's
  pre-hooks are attached and :func:`unpatch_model` removes them, leaving the model as it was;
- :func:`register_sparsification_hooks` / :func:`remove_hooks`: the non-destructive variant (engine hooks);
- :class:`ActivationCollector`: records each chosen module's input and output, keyed ``layer_{i}_{module}``;
- :func:`magnitude_sparsify`, :func:`compute_sparsity_stats`, :func:`get_device`;
- :class:`SPONConfig`, :class:`TrainingArgs`, :class:`SPONTrainer`, :func:`compute_perplexity`,
  :func:`create_calibration_dataloader`: the seed's training and evaluation API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import create_calibration_dataloader
from .evaluate import compute_perplexity
from .models import resolve_device
from .sites import MODULES, SiteMap, parse_site, site_name
from .sparse import register_sparsification_hooks, remove_hooks
from .sparsifiers import check_sparsity, compute_sparsity_stats, magnitude_sparsify
from .train.seed_api import SPONConfig, SPONTrainer, TrainingArgs

__all__ = [
    "SparseLinear", "patch_model_for_sparse_forward", "unpatch_model", "register_sparsification_hooks",
    "remove_hooks", "ActivationCollector", "magnitude_sparsify", "compute_sparsity_stats", "get_device",
    "SPONConfig", "TrainingArgs", "SPONTrainer", "compute_perplexity", "create_calibration_dataloader",
]

_PATCH_ATTR = "_spon_compat_hooks"


def get_device(device: str | None = "auto") -> torch.device:
    """The seed's ``get_device``: ``auto`` picks CUDA, then MPS, then CPU."""
    return resolve_device(device)


class SparseLinear(nn.Module):
    """``F.linear(S(x), W, b) + spon_bias`` with the weights of ``original_linear`` (shared, not copied).

    ``S`` is the toolkit's magnitude top-k (exactly ``d - round(s d)`` entries kept per token). The SPON bias is
    added in float32 and the sum cast back to the input's dtype (the seed cast the bias down first)."""

    def __init__(self, original_linear: nn.Linear, sparsity: float = 0.5, spon_bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(original_linear, nn.Linear):
            raise TypeError(f"SparseLinear wraps an nn.Linear, got {type(original_linear).__name__}")
        self.sparsity = check_sparsity(sparsity)
        self.weight = original_linear.weight
        self.original_bias = original_linear.bias
        self.in_features = original_linear.in_features
        self.out_features = original_linear.out_features
        if spon_bias is not None and tuple(spon_bias.shape) != (self.out_features,):
            raise ValueError(f"spon_bias has shape {tuple(spon_bias.shape)}, expected ({self.out_features},)")
        self.spon_bias = spon_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(magnitude_sparsify(x, self.sparsity), self.weight, self.original_bias)
        if self.spon_bias is None:
            return out
        return (out.float() + self.spon_bias.to(out.device, torch.float32)).to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.sparsity}, "
                f"has_spon={self.spon_bias is not None}")


def patch_model_for_sparse_forward(model: nn.Module, sparsity: float, target_modules: Iterable[str] | None = None,
                                   spon_biases: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Sparsify ``target_modules`` (default ``["down_proj"]``) of every layer, adding ``spon_biases``; returns
    ``model``. Call :func:`unpatch_model` to undo (patching twice replaces the first patch)."""
    unpatch_model(model)
    handles = register_sparsification_hooks(model, sparsity, target_modules, spon_biases=spon_biases)
    object.__setattr__(model, _PATCH_ATTR, handles)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove what :func:`patch_model_for_sparse_forward` attached (no-op on an unpatched model)."""
    handles = model.__dict__.pop(_PATCH_ATTR, None)
    if handles is not None:
        remove_hooks(handles)
    return model


class ActivationCollector:
    """Records the input and output of chosen modules on every forward (the seed's collector).

    ``register(model, layer_indices=None, module_names=("down_proj",))``; after a forward,
    ``get_activations()`` gives ``{"layer_{i}_{module}": {"input": tensor, "output": tensor}}`` (detached, on
    the CPU; each forward overwrites). ``clear()`` empties it; ``remove_hooks()`` detaches and empties. Also
    a context manager."""

    def __init__(self) -> None:
        self.activations: dict[str, dict[str, torch.Tensor]] = {}
        self.handles: list = []

    def register(self, model: nn.Module, layer_indices: Iterable[int] | None = None,
                 module_names: Iterable[str] = ("down_proj",), *, architectures=None) -> ActivationCollector:
        sitemap = SiteMap(model, architectures)
        layers = range(sitemap.n_layers) if layer_indices is None else list(layer_indices)
        modules = [m for m in module_names if m in MODULES]  # the seed skipped unknown names
        for i in layers:
            for m in modules:
                site = site_name(i, m)
                key = f"layer_{parse_site(site)[0]}_{m}"
                self.handles.append(sitemap.module(site).register_forward_hook(self._hook(key)))
        return self

    def _hook(self, key: str):
        def hook(module, args, output):
            self.activations[key] = {"input": args[0].detach().cpu(), "output": output.detach().cpu()}

        return hook

    def get_activations(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.activations

    def clear(self) -> None:
        self.activations = {}

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.activations = {}

    def __enter__(self) -> ActivationCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()
