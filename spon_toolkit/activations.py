"""Token batches and activations: the device of a model, the ids of a batch, and the inputs that reach a
model's sites on a dense forward (what sparsifier calibration and closed-form initialisation read).

Engine layer: imports only :mod:`spon_toolkit.errors` and :mod:`spon_toolkit.sites`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError
from .sites import SiteMap


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_parts(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask or None)`` of a batch: a tensor, a dict with ``input_ids`` (and
    optionally ``attention_mask``), or a tuple/list whose first item is the ids. Both come back 2-D."""
    mask = None
    if isinstance(batch, Mapping):
        batch, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ConfigError(f"a batch must be a tensor of token ids or a dict with 'input_ids', got {type(batch).__name__}")
    if mask is not None and mask.dim() == 1:
        mask = mask.unsqueeze(0)
    return (batch if batch.dim() == 2 else batch.unsqueeze(0)), mask


def iter_input_ids(batches: Iterable) -> Iterator[torch.Tensor]:
    """Yield the 2-D ``input_ids`` of each batch (see :func:`batch_parts`)."""
    for batch in batches:
        yield batch_parts(batch)[0]


@torch.no_grad()
def collect_site_inputs(
    model: nn.Module,
    sites: Iterable[str],
    batches: Iterable,
    *,
    sitemap: SiteMap | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Flattened input values of each site over ``batches`` (dense forward), optionally ``transform``-ed.

    With ``max_samples``, each site keeps a seeded uniform sample of about that many values
    (all values when they fit). Sites fed the same tensor (q/k/v, gate/up) get the same sample, so
    statistics derived from it (e.g. thresholds) are identical across them.
    """
    sitemap = sitemap or SiteMap(model)
    sites = sitemap.resolve(sites)
    batches = list(iter_input_ids(batches))
    if not batches:
        raise ConfigError("no calibration batches given; provide at least one batch of token ids")
    n_tokens = sum(b.numel() for b in batches)
    gen = torch.Generator().manual_seed(seed)
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    last: list = [None, None]  # the input tensor seen last and the sample taken from it

    def make_hook(site: str, width: int):
        keep_prob = 1.0 if max_samples is None else min(1.0, max_samples / (n_tokens * width))

        def pre_hook(module, args):
            if args[0] is last[0]:
                chunks[site].append(last[1])
                return
            x = args[0].detach().reshape(-1)
            if transform is not None:
                x = transform(x)
            if keep_prob < 1.0:
                mask = torch.rand(x.numel(), generator=gen) < keep_prob
                x = x[mask.to(x.device)]
            last[:] = [args[0], x.float().cpu()]
            chunks[site].append(last[1])

        return pre_hook

    handles = [
        sitemap.module(s).register_forward_pre_hook(make_hook(s, sitemap.shape(s)[0])) for s in sites
    ]
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for ids in batches:
            model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        last[:] = [None, None]
    return {s: torch.cat(chunks[s]) for s in sites}
