"""Model surgery for training: the model split at its output head, and the sparsifier seen through the trained sites."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn


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


class _SparsifierView:
    """A sparsifier restricted to some sites: identity elsewhere (closed-form init of unsparsified sites)."""

    def __init__(self, sparsifier, sites: Iterable[str]):
        self.sparsifier = sparsifier
        self.sites = set(sites)

    def function(self, site: str):
        if site in self.sites:
            return self.sparsifier.function(site)
        return lambda x: x


@contextlib.contextmanager
def checkpointed_layers(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Activation checkpointing of ``layers`` while the block runs: under autograd each layer keeps only its
    inputs and is recomputed (hooks included) in the backward pass. The layers are given back unchanged:
    the wrapper is an instance attribute that shadows ``forward`` and is deleted on exit."""
    from torch.utils.checkpoint import checkpoint

    wrapped: list[nn.Module] = []
    try:
        for layer in layers:
            if "forward" in vars(layer):
                raise RuntimeError(f"{type(layer).__name__} already has an instance-level forward; "
                                   f"cannot checkpoint it")
            original = layer.forward

            def forward(*args, _original=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            layer.forward = forward
            wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            del layer.forward
