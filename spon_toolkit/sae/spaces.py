"""The space a SPON bias lives in, hooks that read (or replace) it, and cached dense activations of it."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..sites import SiteMap, parse_site

EXTRA = "sae"


MISSING = ("sae-lens is not installed; the SAE analysis needs the optional extra: "
           "pip install 'spon-toolkit[sae]'")


KINDS = ("resid_post", "resid_mid", "site_output", "site_input")


ARCHITECTURES = ("topk", "standard")


def require_sae_lens():
    """Import sae-lens or raise a one-line :class:`ConfigError` naming the extra to install."""
    try:
        import sae_lens
    except ImportError:
        raise ConfigError(MISSING) from None
    return sae_lens


def sae_lens_available() -> bool:
    try:
        require_sae_lens()
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class BiasSpace:
    """The activation space one bias is added to (see the module docstring)."""

    site: str
    kind: str

    @property
    def layer(self) -> int:
        return parse_site(self.site)[0]

    @property
    def module(self) -> str:
        return parse_site(self.site)[1]

    @property
    def name(self) -> str:
        return f"{self.site}:{self.kind}"

    def dim(self, sitemap: SiteMap) -> int:
        d_in, d_out = sitemap.shape(self.site)
        return d_in if self.kind == "site_input" else d_out


def bias_space(site: str, parametrisation: str = "output") -> BiasSpace:
    """The space a bias on ``site`` with ``parametrisation`` ("output" | "input") lives in."""
    _, module = parse_site(site)
    if parametrisation == "input":
        return BiasSpace(site, "site_input")
    if parametrisation != "output":
        raise ConfigError(f"parametrisation must be 'output' or 'input', got '{parametrisation}'")
    if module == "down_proj":
        return BiasSpace(site, "resid_post")
    if module == "o_proj":
        return BiasSpace(site, "resid_mid")
    return BiasSpace(site, "site_output")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextlib.contextmanager
def space_hooks(model: nn.Module, sitemap: SiteMap, spaces: Sequence[BiasSpace],
                fn: Callable[[BiasSpace, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn(space, x)`` with each space's activation ``x`` ``[B, T, d]`` on every forward.

    When ``fn`` returns a tensor, it replaces the activation downstream (splicing). Hooks registered here
    run after hooks already on the same modules (sparsifiers, SPON biases), so they see what those produce.
    """
    handles = []
    try:
        for space in spaces:
            layer = sitemap.layers[space.layer]
            module = sitemap.module(space.site)
            if space.kind == "resid_post":
                def hook(mod, args, output, space=space):
                    new = fn(space, _first(output))
                    return None if new is None else _replace_first(output, new)
                handles.append(layer.register_forward_hook(hook))
            elif space.kind == "resid_mid":
                held: dict[str, torch.Tensor] = {}

                def pre(mod, args, kwargs, held=held):
                    held["h"] = args[0] if args else kwargs["hidden_states"]

                def post(mod, args, output, space=space, held=held):
                    h = held.pop("h")
                    new = fn(space, h + output)
                    return None if new is None else (new - h).to(output.dtype)
                handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post))
            elif space.kind == "site_output":
                def out_hook(mod, args, output, space=space):
                    return fn(space, output)
                handles.append(module.register_forward_hook(out_hook))
            elif space.kind == "site_input":
                def in_hook(mod, args, space=space):
                    new = fn(space, args[0])
                    return None if new is None else (new, *args[1:])
                handles.append(module.register_forward_pre_hook(in_hook))
            else:
                raise ConfigError(f"unknown space kind '{space.kind}'; use one of {', '.join(KINDS)}")
        yield
    finally:
        for h in handles:
            h.remove()


def _progress(iterable, total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not progress if progress is not None else None)


@torch.no_grad()
def collect_activations(model: nn.Module, sitemap: SiteMap, spaces: Sequence[BiasSpace], ids: torch.Tensor, *,
                        skip_first: int = 1, batch_size: int = 8, progress: bool | None = None,
                        desc: str = "activations") -> dict[str, torch.Tensor]:
    """Activations of ``spaces`` over token blocks ``ids`` ``[N, T]``: ``{space.name: [N, T - skip_first, d]}``
    (float32, CPU). Whatever hooks are on the model (sparsifier, biases) act during the forward passes."""
    chunks: dict[str, list[torch.Tensor]] = {s.name: [] for s in spaces}

    def grab(space: BiasSpace, x: torch.Tensor) -> None:
        chunks[space.name].append(x[:, skip_first:].detach().to("cpu", torch.float32))
        return None

    device = next(model.parameters()).device
    batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    with space_hooks(model, sitemap, spaces, grab):
        for batch in _progress(batches, len(batches), desc, progress):
            model(input_ids=batch.to(device))
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def sae_cache_dir() -> Path:
    from ..models import user_cache_dir

    return user_cache_dir() / "sae"


def ids_hash(ids: torch.Tensor) -> str:
    """sha256 (16 hex digits) of token ids: the data part of every cache key."""
    t = ids.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}|".encode() + t.numpy().tobytes()).hexdigest()[:16]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _fingerprint(model: nn.Module) -> str:
    from ..models import model_fingerprint

    fp = getattr(model, "_spon_sae_fingerprint", None)
    if fp is None:
        fp = model_fingerprint(model)
        with contextlib.suppress(AttributeError):
            model._spon_sae_fingerprint = fp  # weights are frozen during an analysis
    return fp


def cached_activations(model: nn.Module, sitemap: SiteMap, spaces: Sequence[BiasSpace], ids: torch.Tensor, *,
                       skip_first: int = 1, batch_size: int = 8, cache: bool = True, progress: bool | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Dense activations of ``spaces`` on ``ids`` from the cache, collecting (in one pass) the missing ones.

    Returns ``({space.name: [N, T - skip_first, d]}, {space.name: cache key})``.
    """
    from safetensors.torch import load_file, save_file

    from ..fileio import atomic_path

    fp, data = _fingerprint(model), ids_hash(ids)
    keys = {s.name: _key("acts", fp, s.name, data, skip_first) for s in spaces}
    out: dict[str, torch.Tensor] = {}
    root = sae_cache_dir() / "acts"
    if cache:
        for s in spaces:
            path = root / f"{keys[s.name]}.safetensors"
            if path.is_file():
                with contextlib.suppress(Exception):  # an unreadable cache file is recomputed
                    out[s.name] = load_file(str(path))["acts"]
    missing = [s for s in spaces if s.name not in out]
    if missing:
        got = collect_activations(model, sitemap, missing, ids, skip_first=skip_first, batch_size=batch_size,
                                  progress=progress, desc="SAE activations (dense)")
        for s in missing:
            out[s.name] = got[s.name]
            if cache:
                with atomic_path(root / f"{keys[s.name]}.safetensors") as tmp:
                    save_file({"acts": got[s.name].contiguous()}, tmp,
                              metadata={"model_fingerprint": fp, "space": s.name, "ids_sha256": data,
                                        "skip_first": str(skip_first)})
    return out, keys


def check_bias_site(site: str, biased: Sequence[str]) -> None:
    if site not in biased:
        shown = ", ".join(list(biased)[:4]) + (" ..." if len(biased) > 4 else "")
        raise ConfigError(f"site '{site}' has no SPON bias in this run (biased: {shown or 'none'}); "
                          f"pick one of the biased sites")
