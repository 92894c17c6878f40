"""Reading the seed repository's SPON checkpoints (``.pt``) and converting them to toolkit checkpoints.

The seed saves ``torch.save({"config": {...}, "sparsity": s, "biases": {"layer_{i}_{module}": tensor},
"training_args": {...}})``. Only ``torch.load(..., weights_only=True)`` is used: it unpickles tensors and
plain containers and refuses every other object, so a file cannot run code. The structure is then checked
(a dict of 1-D finite float tensors under seed names) before anything is written; any problem is one line.

The seed sparsifies its ``config.modules`` in every layer with per-token magnitude top-k and adds output-space
biases: the imported checkpoint records exactly that (``magnitude`` sparsifier, all layers x those modules as
sparsified sites, the biases as output-space ``beta``), so ``Checkpoint.apply`` rebuilds the seed's model.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, save_checkpoint
from .sites import MODULES

_SEED_KEY = re.compile(r"^layer_(\d+)_([a-z_]+)$")


@dataclass
class SeedCheckpoint:
    """The content of a seed ``.pt``: biases by toolkit site name, the recorded sparsity, config, args."""

    path: Path
    biases: dict[str, torch.Tensor]
    sparsity: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    training_args: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def modules(self) -> list[str]:
        """The modules the seed sparsified: its config's, else those that carry biases (in site order)."""
        mods = self.config.get("modules")
        if isinstance(mods, list) and mods and all(isinstance(m, str) and m in MODULES for m in mods):
            return list(mods)
        present = {s.split(".")[-1] for s in self.biases}
        return [m for m in MODULES if m in present]


def _plain(value: Any, where: str) -> Any:
    """Config / training-args values must be JSON-like (numbers, strings, lists, dicts)."""
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise CheckpointError(f"{where} holds a {type(value).__name__}, not a number, string, list or dict")


def read_seed_checkpoint(path: str | os.PathLike) -> SeedCheckpoint:
    """Load a seed ``.pt`` with ``weights_only=True`` and check its structure (one-line errors)."""
    path = Path(path)
    where = f"seed checkpoint '{path}'"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist")
    data = path.read_bytes()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip().startswith(("Unsupported", "WeightsUnpickler"))),
                     str(exc).splitlines()[0] if str(exc) else "")
        raise CheckpointError(f"{where} holds objects other than tensors and plain containers, which are never "
                              f"unpickled here ({first.strip()[:160]})") from None
    except Exception as exc:  # truncated / not a torch file
        raise CheckpointError(f"{where} is not a readable torch file ({type(exc).__name__}: "
                              f"{(str(exc).splitlines() or ['no detail'])[0][:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}; the seed saves a dict with a 'biases' entry")
    raw = obj.get("biases")
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{where} has no non-empty 'biases' dict (keys found: {sorted(map(str, obj))[:6]})")
    biases: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        m = _SEED_KEY.match(str(key))
        if m is None or m.group(2) not in MODULES:
            raise CheckpointError(f"{where}: bias key {key!r} is not of the form layer_<i>_<module> with a module "
                                  f"of {', '.join(MODULES)}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: bias {key!r} is a {type(value).__name__}, not a tensor")
        if value.dim() != 1 or not value.is_floating_point():
            raise CheckpointError(f"{where}: bias {key!r} must be a 1-D float tensor, got shape "
                                  f"{tuple(value.shape)} of {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: bias {key!r} holds NaN or inf values")
        biases[f"layers.{int(m.group(1))}.{m.group(2)}"] = value.detach().to(torch.float32).contiguous()
    sparsity = obj.get("sparsity")
    if sparsity is not None:
        sparsity = _plain(sparsity, f"{where}: 'sparsity'")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
            raise CheckpointError(f"{where}: 'sparsity' is {sparsity!r}, not a number in [0, 1]")
        sparsity = float(sparsity)
    config = _plain(obj.get("config") or {}, f"{where}: 'config'")
    args = _plain(obj.get("training_args") or {}, f"{where}: 'training_args'")
    if not isinstance(config, dict) or not isinstance(args, dict):
        raise CheckpointError(f"{where}: 'config' and 'training_args' must be dicts")
    return SeedCheckpoint(path, dict(sorted(biases.items(), key=lambda kv: _order(kv[0]))), sparsity, config, args,
                          hashlib.sha256(data).hexdigest())


def _order(site: str) -> tuple[int, int]:
    _, layer, module = site.split(".")
    return int(layer), MODULES.index(module)


def import_seed_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    output: str | os.PathLike,
    *,
    toolkit,
    sparsity: float | None = None,
) -> Path:
    """Convert a seed ``.pt`` into a toolkit safetensors checkpoint for ``model``; returns the path written.

    ``sparsity`` must agree with the one the file records (the seed records it); it is needed only when the
    file has none. Every bias must fit the model's site (one-line error otherwise); nothing is written then.
    """
    from .contracts import build_sparsifier
    from .sites import SiteMap
    from .sparse import SponBiases
    from .sparsifiers import check_sparsity

    seed = read_seed_checkpoint(path)
    where = f"seed checkpoint '{seed.path}'"
    if sparsity is not None:
        sparsity = check_sparsity(sparsity, "--sparsity")
        if seed.sparsity is not None and abs(seed.sparsity - sparsity) > 1e-12:
            raise CheckpointError(f"{where} was trained at sparsity {seed.sparsity}, not {sparsity}; biases do not "
                                  f"transfer between sparsities -- give --sparsity {seed.sparsity}")
    elif seed.sparsity is None:
        raise CheckpointError(f"{where} records no sparsity; give the one it was trained at (--sparsity S)")
    sparsity = seed.sparsity if seed.sparsity is not None else sparsity
    sitemap = SiteMap(model, toolkit.architectures)
    for site, tensor in seed.biases.items():
        layer = int(site.split(".")[1])
        if layer >= sitemap.n_layers:
            raise CheckpointError(f"{where} has a bias for layer {layer}, but the model has {sitemap.n_layers} "
                                  f"layers; give the model it was trained on (--model)")
        want = sitemap.shape(site)[1]
        if tuple(tensor.shape) != (want,):
            raise CheckpointError(f"{where}: bias of {site} has {tensor.shape[0]} values, this model's "
                                  f"{site} has {want} outputs; give the model it was trained on (--model)")
    biases = SponBiases(model, list(seed.biases), sitemap=sitemap)
    biases.load_tensors(seed.biases)
    sparsifier = build_sparsifier(toolkit, "magnitude", sparsity)
    sparse_sites = sitemap.resolve(seed.modules)
    return save_checkpoint(
        output, biases, model=model, sparsifier=sparsifier, sparse_sites=sparse_sites,
        training={"trainer": "seed", **seed.training_args},
        extra={"imported_from": {"format": "seed .pt", "file": seed.path.name, "sha256": seed.sha256},
               "config": seed.config},
    )
