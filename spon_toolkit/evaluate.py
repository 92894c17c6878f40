"""Perplexity, dense or sparse, with the protocol recorded next to every number.

PPL = exp(token-weighted mean NLL over all predicted tokens): every block of ``T`` tokens predicts its
tokens 2..T from the ones before (no context from earlier blocks), the NLLs of all predicted tokens are
summed in float64 and divided by their count. Per-block mean NLLs are kept so that two configurations
evaluated on the same blocks can be compared pairwise.

Two entry points:

- :func:`evaluate_perplexity` (the toolkit's API): a model, blocks, optionally a sparsifier with a site
  set and SPON biases; returns a :class:`PerplexityResult` with the achieved sparsity per site and the
  protocol (block size, blocks, text source + sha256, dtype, model name + fingerprint).
- :func:`compute_perplexity`: the seed repository's signature (``use_sparse``, ``sparsity``,
  ``spon_biases``), magnitude top-k on ``down_proj`` by default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import batch_parts, model_device
from .errors import ConfigError
from .models import context_length, dtype_name, model_fingerprint, model_name
from .sites import MODULES, SiteMap, parse_site, site_name
from .sparse import SparseModel, SponBiases
from .sparsifiers import MagnitudeSparsifier, Sparsifier


@dataclass
class PerplexityResult:
    """One perplexity measurement and everything it depends on."""

    perplexity: float
    mean_nll: float  # token-weighted mean NLL (nats)
    n_tokens: int  # predicted tokens
    block_nlls: list[float] = field(default_factory=list)  # mean NLL of each block, in block order
    block_tokens: list[int] = field(default_factory=list)  # predicted tokens of each block
    achieved_sparsity: float | None = None  # zeros / entries over every sparsified input
    achieved_sparsity_by_site: dict[str, float] = field(default_factory=dict)  # site -> fraction of zeros
    achieved_sparsity_by_module: dict[str, float] = field(default_factory=dict)  # module -> over its sites
    protocol: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __getitem__(self, key: str) -> Any:  # the seed code reads results as dicts
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _n_batches(batches: Any) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


@torch.no_grad()
def block_nlls(
    model: nn.Module,
    batches: Iterable,
    *,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    desc: str = "perplexity",
) -> tuple[list[float], list[int]]:
    """Summed NLL and predicted-token count of every sequence in ``batches`` (in order).

    Batches are LongTensors ``[B, T]`` or dicts with ``input_ids`` (and optionally ``attention_mask``:
    masked positions are neither fed as real tokens nor predicted). Logits are scored in float32.
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    sums: list[float] = []
    counts: list[int] = []
    bar = tqdm(batches, total=_n_batches(batches), desc=desc, unit="batch", leave=False,
               disable=None if progress is None else not progress)
    try:
        for batch in bar:
            ids, mask = batch_parts(batch)
            ids = ids.to(device)
            if ids.shape[1] < 2:
                raise ConfigError("a sequence needs at least 2 tokens to predict one; use a block size >= 2")
            kwargs = {}
            if mask is not None:
                mask = mask.to(device)
                kwargs["attention_mask"] = mask
            logits = model(input_ids=ids, **kwargs).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            nll = nll.view(targets.shape).double()
            if mask is not None:
                valid = mask[:, 1:].bool()
                nll = nll * valid
                count = valid.sum(dim=1)
            else:
                count = torch.full((ids.shape[0],), targets.shape[1], device=device)
            sums.extend(nll.sum(dim=1).tolist())
            counts.extend(int(c) for c in count.tolist())
    finally:
        bar.close()
        model.train(was_training)
    return sums, counts


def _sparsity_summary(sm: SparseModel) -> tuple[dict[str, float], dict[str, float], float | None]:
    hooks = sm.sparsifier_hooks
    if hooks is None:
        return {}, {}, None
    per_site = hooks.achieved_sparsity_by_site()
    by_module: dict[str, float] = {}
    for module in MODULES:
        zeros = sum(hooks.zeros[s] for s in hooks.sites if parse_site(s)[1] == module)
        total = sum(hooks.total[s] for s in hooks.sites if parse_site(s)[1] == module)
        if total:
            by_module[module] = zeros / total
    total = sum(hooks.total.values())
    overall = sum(hooks.zeros.values()) / total if total else None
    return per_site, by_module, overall


def evaluate_perplexity(
    model: nn.Module,
    blocks: Any,
    *,
    sparsifier: Sparsifier | None = None,
    sites: str | Iterable[str] | None = None,
    biases: SponBiases | None = None,
    batch_size: int = 8,
    max_blocks: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    sitemap: SiteMap | None = None,
    desc: str | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``blocks``, optionally sparsified and with SPON biases.

    ``blocks``: a :class:`spon_toolkit.data.TokenBlocks` (its protocol is recorded; ``max_blocks`` takes
    its first blocks) or any iterable of batches. ``sparsifier`` + ``sites`` (a site spec, default
    ``"down_proj"``) sparsify those sites' inputs; a calibrating sparsifier must already be calibrated.
    ``biases`` are attached for the evaluation and detached afterwards (folded biases act as weights).
    The model is left as it was found.
    """
    from .data import TokenBlocks

    protocol: dict[str, Any] = {}
    if isinstance(blocks, TokenBlocks):
        blocks = blocks.head(max_blocks)
        limit = context_length(model)
        if limit is not None and blocks.block_size > limit:
            raise ConfigError(
                f"block size {blocks.block_size} is larger than the model's context of {limit} tokens; "
                f"use a block size of {limit} or less"
            )
        protocol.update(blocks.protocol())
        batches: Iterable = list(blocks.batches(batch_size))
    else:
        if max_blocks is not None:
            raise ConfigError("max_blocks needs TokenBlocks; slice your batches instead")
        batches = blocks
        protocol["text_source"] = "batches given by the caller"
    if sparsifier is not None and sites is None:
        sites = "down_proj"
    if sparsifier is not None and not isinstance(sites, str):
        sites = list(sites)
        if not sites:
            raise ConfigError("a sparsifier was given with an empty site list, so nothing would be sparsified; "
                              "name the sites (e.g. 'down_proj') or pass no sparsifier for dense numbers")

    dtype = next(model.parameters()).dtype
    protocol.update({
        "model": model_name(model),
        "model_fingerprint": model_fingerprint(model),
        "dtype": dtype_name(dtype),
        "device": str(device if device is not None else model_device(model)),
        "batch_size": batch_size,
        "sparsifier": sparsifier.describe() if sparsifier is not None else None,
        "sites": sites if isinstance(sites, str) or sites is None else list(sites),
        "biases": None if biases is None else {
            "sites": len(biases.sites), "parametrisation": biases.parametrisation,
            "parameters": biases.num_parameters(), "folded": biases.folded,
        },
    })

    start = time.perf_counter()
    sm = SparseModel(model, sparsifier, sites or (), biases=biases, record=True, sitemap=sitemap) \
        if (sparsifier is not None or biases is not None) else None
    if sm is not None:
        protocol["n_sparse_sites"] = len(sm.sparse_sites)
    label = desc or ("dense" if sparsifier is None else sparsifier.describe())
    try:
        sums, counts = block_nlls(model, batches, device=device, progress=progress, desc=label)
        per_site, by_module, overall = _sparsity_summary(sm) if sm is not None else ({}, {}, None)
    finally:
        if sm is not None:
            sm.detach()
    n_tokens = sum(counts)
    if n_tokens == 0:
        raise ConfigError("no tokens to predict: the evaluation data is empty")
    mean_nll = math.fsum(sums) / n_tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        n_tokens=n_tokens,
        block_nlls=[s / c if c else float("nan") for s, c in zip(sums, counts, strict=False)],
        block_tokens=counts,
        achieved_sparsity=overall,
        achieved_sparsity_by_site=per_site,
        achieved_sparsity_by_module=by_module,
        protocol=protocol,
        seconds=time.perf_counter() - start,
    )


def _biases_from_seed_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], sitemap: SiteMap) -> SponBiases:
    """Output-space :class:`SponBiases` from the seed's ``{"layer_{i}_{module}": beta}`` (or site-keyed) dict."""
    by_site: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("layer_"):
            layer, _, module = key.removeprefix("layer_").partition("_")
            if not layer.isdigit():
                raise ConfigError(f"SPON bias key '{key}' is not layer_<i>_<module> or layers.<i>.<module>")
            key = site_name(int(layer), module)
        parse_site(key)
        by_site[key] = value.detach().float().cpu()
    biases = SponBiases(model, list(by_site), sitemap=sitemap)
    biases.load_tensors(by_site)
    return biases


def compute_perplexity(
    model: nn.Module,
    dataloader: Iterable,
    device: torch.device | str | None = None,
    use_sparse: bool = False,
    sparsity: float | None = None,
    spon_biases: SponBiases | Mapping[str, torch.Tensor] | None = None,
    target_modules: Iterable[str] | str | None = None,
    sparsifier: Sparsifier | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """The seed repository's perplexity function, on the toolkit's protocol.

    ``use_sparse=True`` sparsifies ``target_modules`` (default ``down_proj`` of every layer) with per-token
    magnitude top-k at ``sparsity`` (or with ``sparsifier`` when given). ``spon_biases`` is a
    :class:`SponBiases` or the seed's dict ``{"layer_{i}_{module}": beta}``. ``dataloader`` yields tensors or
    dicts with ``input_ids``; a :class:`TokenBlocks` is accepted too (its protocol is then recorded).
    """
    sparse: Sparsifier | None = None
    if use_sparse:
        if sparsifier is not None:
            sparse = sparsifier
        elif sparsity is None:
            raise ConfigError("use_sparse=True needs a sparsity in [0, 1] (or a sparsifier)")
        else:
            sparse = MagnitudeSparsifier(sparsity)
    sitemap = SiteMap(model) if (sparse is not None or spon_biases is not None) else None
    biases = spon_biases
    if spon_biases is not None and not isinstance(spon_biases, SponBiases):
        biases = _biases_from_seed_dict(model, spon_biases, sitemap)
    sites = None
    if sparse is not None:
        sites = target_modules if target_modules is not None else "down_proj"
        sites = [sites] if isinstance(sites, str) else list(sites)
    return evaluate_perplexity(model, dataloader, sparsifier=sparse, sites=sites, biases=biases,
                               device=device, progress=progress, sitemap=sitemap)
