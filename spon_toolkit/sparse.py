"""The sparsification engine: sparsifiers and SPON biases attached to a model's sites.

- :func:`attach_sparsifier` puts a forward *pre*-hook on each site's linear layer that replaces its input
  by the sparsified input, so the layer runs one matmul on ``S(x)``. Sites fed the same tensor
  (q/k/v, gate/up) with the same sparsity function sparsify it once per forward.
- :class:`SponBiases` holds one learned bias per biased site and adds ``beta`` to the layer output with a
  forward hook (``y = W S(x) + b + beta``). ``beta`` lives in output space (default) or is ``W @ alpha``
  with ``alpha`` in input space. :meth:`SponBiases.fold` writes ``beta`` into the layers' biases.
- :class:`SparseModel` owns both for one model: ``with sm.dense():`` switches both off (the teacher).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import iter_input_ids, model_device
from .errors import ConfigError, SponError
from .sites import SiteMap, parse_site, site_name
from .sparsifiers import MagnitudeSparsifier, Sparsifier, check_sparsity

PARAMETRISATIONS = ("output", "input")


class HookGroup:
    """Hooks installed together; ``enabled`` switches them off without removing them."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.enabled = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self.handles)


class SparsifierHooks(HookGroup):
    """Sparsifier pre-hooks on a set of sites (see :func:`attach_sparsifier`)."""

    def __init__(self, sites: list[str], record: bool) -> None:
        super().__init__()
        self.sites = sites
        self.record = record
        self.zeros: dict[str, int] = dict.fromkeys(sites, 0) if record else {}
        self.total: dict[str, int] = dict.fromkeys(sites, 0) if record else {}
        self._memo: tuple[Callable, torch.Tensor, int, torch.Tensor] | None = None

    def _sparsify(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # Inference-mode tensors have no version counter (and cannot be changed in place outside it).
        version = -1 if x.is_inference() else x._version
        memo = self._memo
        if memo is not None and memo[0] is fn and memo[1] is x and memo[2] == version:
            return memo[3]
        out = fn(x)
        # One entry only: q/k/v (and gate/up) are called back to back on the same tensor, and a single
        # entry keeps at most one extra activation alive. The strong reference to x keeps its storage
        # alive, so "is" cannot match a recycled tensor.
        self._memo = (fn, x, version, out)
        return out

    def make_hook(self, site: str, fn: Callable[[torch.Tensor], torch.Tensor]):
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            if not self.enabled:
                return None
            out = self._sparsify(fn, args[0])
            if self.record:
                self.zeros[site] += int((out == 0).sum())
                self.total[site] += out.numel()
            return (out, *args[1:])

        return pre_hook

    def remove(self) -> None:
        super().remove()
        self._memo = None

    def clear_cache(self) -> None:
        self._memo = None

    def achieved_sparsity_by_site(self) -> dict[str, float]:
        """Fraction of zeros in the sparsified inputs seen so far, per site (needs ``record=True``)."""
        if not self.record:
            raise SponError("achieved sparsity was not recorded; attach the sparsifier with record=True")
        return {s: (self.zeros[s] / self.total[s] if self.total[s] else float("nan")) for s in self.sites}

    def reset_counts(self) -> None:
        for s in self.sites:
            self.zeros[s] = self.total[s] = 0


def attach_sparsifier(
    model: nn.Module,
    sparsifier: Sparsifier,
    sites: Iterable[str],
    *,
    sitemap: SiteMap | None = None,
    record: bool = False,
) -> SparsifierHooks:
    """Sparsify the inputs of ``sites`` with forward pre-hooks. Remove with ``.remove()``.

    ``record=True`` counts the zeros of each sparsified input (see ``achieved_sparsity_by_site``).
    """
    sitemap = sitemap or SiteMap(model)
    sites = sitemap.resolve(sites)
    fns = {site: sparsifier.function(site) for site in sites}  # fails before any hook is installed
    hooks = SparsifierHooks(sites, record)
    for site in sites:
        hooks.handles.append(sitemap.module(site).register_forward_pre_hook(hooks.make_hook(site, fns[site])))
    return hooks


class SponBiases(nn.Module):
    """One learned bias per biased site.

    ``parametrisation="output"``: ``beta`` (out_features values) is the parameter.
    ``parametrisation="input"``: ``alpha`` (in_features values) is the parameter and ``beta = W @ alpha``.
    Parameters are kept in ``dtype`` (float32 by default); the hook adds them in float32 and casts the
    sum back to the layer's dtype, so small biases are not rounded away before the addition.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Iterable[str],
        *,
        parametrisation: str = "output",
        dtype: torch.dtype = torch.float32,
        sitemap: SiteMap | None = None,
    ):
        super().__init__()
        if parametrisation not in PARAMETRISATIONS:
            raise ConfigError(f"parametrisation must be one of {PARAMETRISATIONS}, got '{parametrisation}'")
        self.sitemap = sitemap or SiteMap(model)
        self.sites = self.sitemap.resolve(sites)
        self.parametrisation = parametrisation
        device = model_device(model)
        self.params = nn.ParameterDict()
        for site in self.sites:
            d_in, d_out = self.sitemap.shape(site)
            size = d_out if parametrisation == "output" else d_in
            self.params[self._key(site)] = nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
        self.hooks = HookGroup()
        self._folded: dict[str, torch.Tensor | None] | None = None

    @staticmethod
    def _key(site: str) -> str:
        return site.replace(".", "__")

    def param(self, site: str) -> nn.Parameter:
        return self.params[self._key(site)]

    def beta(self, site: str) -> torch.Tensor:
        """The output-space bias of a site (float32, differentiable)."""
        p = self.param(site)
        if self.parametrisation == "output":
            return p
        weight = self.sitemap.module(site).weight
        return F.linear(p.to(torch.float32), weight.detach().to(torch.float32))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())

    # --- initialisation -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_closed_form(self, model: nn.Module, sparsifier: Sparsifier, batches: Iterable) -> None:
        """Set ``beta0 = mean over tokens of W (x - S(x))``: the mean contribution sparsification removes.

        Inputs are those of the dense model. For the input parametrisation, ``alpha0 = mean(x - S(x))``,
        which gives the same ``beta0``.
        """
        sums: dict[str, torch.Tensor] = {}
        count = [0]

        def make_hook(site: str):
            fn = sparsifier.function(site)

            def pre_hook(module, args):
                x = args[0].detach()
                removed = (x - fn(x)).reshape(-1, x.shape[-1]).to(torch.float32).sum(0)
                sums[site] = sums.get(site, 0) + removed
                if site == self.sites[0]:
                    count[0] += x.numel() // x.shape[-1]

            return pre_hook

        if not self.sites:
            return
        handles = [self.sitemap.module(s).register_forward_pre_hook(make_hook(s)) for s in self.sites]
        device = model_device(model)
        try:
            for ids in iter_input_ids(batches):
                model(input_ids=ids.to(device))
        finally:
            for h in handles:
                h.remove()
        if count[0] == 0:
            raise ConfigError("closed-form initialisation needs at least one calibration batch")
        for site in self.sites:
            mean_removed = sums[site] / count[0]
            if self.parametrisation == "input":
                self.param(site).copy_(mean_removed)
            else:
                weight = self.sitemap.module(site).weight.to(torch.float32)
                self.param(site).copy_(F.linear(mean_removed, weight))

    # --- attaching ------------------------------------------------------------------------------------
    def _make_hook(self, site: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.hooks.enabled:
                return None
            beta = self.beta(site)
            if output.dtype == torch.float32:
                return output + beta
            return (output.to(torch.float32) + beta).to(output.dtype)

        return hook

    def attach(self) -> HookGroup:
        """Add the biases to the sites' outputs with forward hooks (idempotent)."""
        if self._folded is not None:
            raise SponError("biases are folded into the model; call unfold() before attaching them as hooks")
        if not self.hooks.attached:
            for site in self.sites:
                self.hooks.handles.append(self.sitemap.module(site).register_forward_hook(self._make_hook(site)))
        return self.hooks

    def detach(self) -> None:
        self.hooks.remove()

    # --- folding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> None:
        """Write ``beta`` into each biased layer's ``bias`` (creating it where absent) and drop the hooks.

        The folded model is an ordinary model whose output equals the hooked one within float tolerance.
        """
        if self._folded is not None:
            return
        self.detach()
        self._folded = {}
        for site in self.sites:
            lin = self.sitemap.module(site)
            beta = self.beta(site).detach()
            self._folded[site] = None if lin.bias is None else lin.bias.detach().clone()
            if lin.bias is None:
                lin.bias = nn.Parameter(beta.to(lin.weight.dtype), requires_grad=False)
            else:
                lin.bias.copy_((lin.bias.to(torch.float32) + beta).to(lin.bias.dtype))

    @torch.no_grad()
    def unfold(self) -> None:
        """Restore the layers' original biases exactly (undo :meth:`fold`)."""
        if self._folded is None:
            return
        for site, original in self._folded.items():
            lin = self.sitemap.module(site)
            if original is None:
                lin.bias = None
            else:
                lin.bias.copy_(original)
        self._folded = None

    @property
    def folded(self) -> bool:
        return self._folded is not None

    # --- export ---------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """``{site: parameter}`` (detached, CPU), e.g. for safetensors."""
        return {site: self.param(site).detach().cpu().contiguous() for site in self.sites}

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing = [s for s in self.sites if s not in tensors]
        if missing:
            raise SponError(f"bias tensors lack sites {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for site in self.sites:
            p = self.param(site)
            t = tensors[site]
            if tuple(t.shape) != tuple(p.shape):
                raise SponError(f"bias for '{site}' has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))

    def seed_dict(self) -> dict[str, torch.Tensor]:
        """Output-space biases keyed ``layer_{i}_{module}`` as the seed repository names them."""
        out = {}
        for site in self.sites:
            layer, module = parse_site(site)
            out[f"layer_{layer}_{module}"] = self.beta(site)
        return out


class SparseModel:
    """A model with a sparsifier on some sites and (optionally) SPON biases on others.

    Use as a context manager or call :meth:`detach`. ``with sm.dense():`` runs the dense model (both
    sparsifier and biases off) without removing hooks, e.g. for the KL teacher.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsifier: Sparsifier | None,
        sparse_sites: Iterable[str] | str = (),
        *,
        biases: SponBiases | None = None,
        record: bool = False,
        sitemap: SiteMap | None = None,
    ):
        self.model = model
        self.sitemap = sitemap or (biases.sitemap if biases is not None else SiteMap(model))
        self.sparsifier = sparsifier
        self.sparse_sites = self.sitemap.resolve(sparse_sites) if sparse_sites else []
        if self.sparse_sites and sparsifier is None:
            raise ConfigError("sparse sites were given without a sparsifier")
        self.biases = biases
        self.sparsifier_hooks: SparsifierHooks | None = None
        if sparsifier is not None and self.sparse_sites:
            self.sparsifier_hooks = attach_sparsifier(
                model, sparsifier, self.sparse_sites, sitemap=self.sitemap, record=record
            )
        if biases is not None and not biases.folded:
            biases.attach()

    def _groups(self) -> list[HookGroup]:
        groups: list[HookGroup] = []
        if self.sparsifier_hooks is not None:
            groups.append(self.sparsifier_hooks)
        if self.biases is not None:
            groups.append(self.biases.hooks)
        return groups

    @contextlib.contextmanager
    def dense(self) -> Iterator[nn.Module]:
        """Temporarily switch sparsification and biases off."""
        if self.biases is not None and self.biases.folded:
            raise SponError("biases are folded into the weights; a dense pass needs unfold() first")
        states = [(g, g.enabled) for g in self._groups()]
        for g, _ in states:
            g.enabled = False
        try:
            yield self.model
        finally:
            for g, state in states:
                g.enabled = state

    def __call__(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)

    def achieved_sparsity_by_site(self) -> dict[str, float]:
        """Fraction of zeros in the sparsified inputs seen so far, per site (needs ``record=True``)."""
        if self.sparsifier_hooks is None:
            return {}
        return self.sparsifier_hooks.achieved_sparsity_by_site()

    def detach(self) -> None:
        """Remove every hook; the model computes dense logits again (biases stay folded if folded)."""
        if self.sparsifier_hooks is not None:
            self.sparsifier_hooks.remove()
        if self.biases is not None:
            self.biases.detach()

    def __enter__(self) -> SparseModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


@contextlib.contextmanager
def sparsified(model: nn.Module, sparsifier: Sparsifier, sites: Iterable[str] | str, **kwargs: Any):
    """``with sparsified(model, MagnitudeSparsifier(0.5), "down_proj") as sm: model(ids)``."""
    sm = SparseModel(model, sparsifier, sites, **kwargs)
    try:
        yield sm
    finally:
        sm.detach()


# --- the seed repository's function API ------------------------------------------------------------

def _seed_bias_for(spon_biases: Mapping[str, torch.Tensor], layer: int, module: str) -> torch.Tensor | None:
    for key in (f"layer_{layer}_{module}", site_name(layer, module)):
        if key in spon_biases:
            return spon_biases[key]
    return None


def register_sparsification_hooks(
    model: nn.Module,
    sparsity: float,
    target_modules: Iterable[str] | None = None,
    spon_biases: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Magnitude-sparsify ``target_modules`` (default ``["down_proj"]``) of every layer, adding
    ``spon_biases`` (keyed ``layer_{i}_{module}`` or ``layers.{i}.{module}``) to their outputs.

    Returns a dict of site -> ``{"handle": ..., "bias_handle": ...}`` for :func:`remove_hooks`. Biases
    given as ``nn.Parameter`` receive gradients.
    """
    sparsity = check_sparsity(sparsity)
    sitemap = SiteMap(model)
    modules = list(target_modules) if target_modules is not None else ["down_proj"]
    sites = sitemap.resolve(modules)
    hooks = attach_sparsifier(model, MagnitudeSparsifier(sparsity), sites, sitemap=sitemap)
    out: dict[str, dict[str, Any]] = {}
    for site, handle in zip(sites, hooks.handles, strict=False):
        entry: dict[str, Any] = {"handle": handle, "group": hooks}
        layer, module = parse_site(site)
        bias = _seed_bias_for(spon_biases or {}, layer, module)
        if bias is not None:
            def add_bias(mod, args, output, bias=bias):
                return (output.to(torch.float32) + bias.to(output.device, torch.float32)).to(output.dtype)

            entry["bias_handle"] = sitemap.module(site).register_forward_hook(add_bias)
        out[site] = entry
    return out


def remove_hooks(handles: Mapping[str, Mapping[str, Any]] | Iterable[Any]) -> None:
    """Remove hooks returned by :func:`register_sparsification_hooks` (or any iterable of handles)."""
    items = handles.values() if isinstance(handles, Mapping) else handles
    for item in items:
        if isinstance(item, Mapping):
            for key in ("handle", "bias_handle"):
                if key in item:
                    item[key].remove()
            if "group" in item:
                item["group"].clear_cache()
        else:
            item.remove()
