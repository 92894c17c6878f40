"""Activation sparsifiers (TEAL-style) and their math.

Reference semantics (``shared`` design notes, fixed):

- magnitude, sparsity ``s``: per token vector of size ``d`` keep exactly ``k = d - round(s * d)`` entries
  of largest ``|x|``; ties at the cut are broken towards the lower index; ``s = 0`` is the identity and
  ``s = 1`` gives zeros. Python's ``round`` (half to even) is used for ``round``.
- threshold: per site a threshold ``t`` calibrated so that a fraction ``s`` of calibration ``|x|`` lies
  below it; at run time ``x * (|x| > t)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from numbers import Real
from typing import Any

import torch

from .errors import ConfigError, SponError

SparsitySpec = float | Mapping[str, float]


def check_unit_interval(value: Any, what: str, meaning: str) -> float:
    """Return ``value`` as a float in [0, 1] or raise a one-line :class:`ConfigError`.

    ``what`` names the value, ``meaning`` says what the fraction is of (shown in the error).
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{what} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{what} must be in [0, 1] ({meaning}), got {value}")
    return value


def check_sparsity(value: Any, where: str = "sparsity") -> float:
    """Return ``value`` as a float in [0, 1] or raise a one-line :class:`ConfigError`."""
    return check_unit_interval(value, where, "fraction of entries zeroed")


def kept_count(d: int, sparsity: float) -> int:
    """How many of ``d`` entries the magnitude sparsifier keeps: ``d - round(sparsity * d)``."""
    return d - round(sparsity * d)


def magnitude_sparsify(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``k = d - round(sparsity*d)`` largest-magnitude entries of each vector along the last dim.

    Ties at the cut keep the lower indices, so exactly ``k`` entries survive in every row.
    Dtype, device and shape are preserved; ``sparsity=0`` returns ``x`` itself.
    """
    sparsity = check_sparsity(sparsity)
    d = x.shape[-1]
    k = kept_count(d, sparsity)
    if k >= d:
        return x
    if k <= 0:
        return torch.zeros_like(x)
    mag = x.abs()
    cut = mag.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    keep = mag >= cut
    if bool((keep.sum(dim=-1) != k).any()):
        # Ties at the cut: keep every entry above it, then the lowest-index tied entries up to k.
        above = mag > cut
        tied = keep & ~above
        room = k - above.sum(dim=-1, keepdim=True)
        keep = above | (tied & (tied.cumsum(dim=-1) <= room))
    return x * keep


def threshold_sparsify(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries with ``|x| <= threshold`` (TEAL's run-time rule).

    The 0/1 mask is built in ``x``'s dtype in place (one temporary), then multiplied in; without autograd
    the product is written into the mask too. This is about 2x faster than ``x * (x.abs() > t)`` on CPU.
    """
    keep = x.detach().abs().gt_(threshold)
    if x.requires_grad:
        return x * keep
    return keep.mul_(x)


def compute_sparsity_stats(x: torch.Tensor) -> dict[str, float]:
    """Sparsity statistics of a tensor: fraction of exact zeros (``sparsity``) and magnitudes."""
    n = x.numel()
    zeros = int((x == 0).sum()) if n else 0
    mag = x.detach().abs().float()
    return {
        "sparsity": zeros / n if n else 0.0,
        "num_zeros": zeros,
        "num_elements": n,
        "mean_abs": float(mag.mean()) if n else 0.0,
        "max_abs": float(mag.max()) if n else 0.0,
    }


def calibrated_threshold(sorted_abs: torch.Tensor, sparsity: float) -> float:
    """Threshold ``t`` with a fraction ``sparsity`` of the (sorted) calibration magnitudes below it.

    ``t`` is the midpoint between the ``k``-th and ``(k+1)``-th smallest magnitudes (``k = round(s*n)``),
    so without ties exactly ``k`` calibration values satisfy ``|x| <= t``; ``s = 0`` gives ``-inf``
    (identity) and ``s = 1`` gives ``+inf`` (all zeros).
    """
    n = sorted_abs.numel()
    k = round(sparsity * n)
    if k <= 0:
        return -math.inf
    if k >= n:
        return math.inf
    lo, hi = float(sorted_abs[k - 1]), float(sorted_abs[k])
    return lo + (hi - lo) / 2


@cache
def _magnitude_fn(sparsity: float) -> Callable[[torch.Tensor], torch.Tensor]:
    # One function object per sparsity level, so sites that share an input (q/k/v, gate/up) and a
    # sparsity share the engine's per-input cache.
    def fn(x: torch.Tensor) -> torch.Tensor:
        return magnitude_sparsify(x, sparsity)

    fn.__qualname__ = f"magnitude[{sparsity}]"
    return fn


class Sparsifier:
    """Base class of sparsifiers. ``sparsity`` is a float or a mapping of site / module / ``"default"``
    to a float; the most specific key wins."""

    name = "base"
    needs_calibration = False

    def __init__(self, sparsity: SparsitySpec):
        if isinstance(sparsity, Mapping):
            self.sparsity: SparsitySpec = {
                str(k): check_sparsity(v, f"sparsity of '{k}'") for k, v in sparsity.items()
            }
        else:
            self.sparsity = check_sparsity(sparsity)

    def sparsity_for(self, site: str) -> float:
        if not isinstance(self.sparsity, Mapping):
            return self.sparsity
        module = site.rsplit(".", 1)[-1]
        for key in (site, module, "default"):
            if key in self.sparsity:
                return self.sparsity[key]
        raise ConfigError(
            f"no sparsity given for site '{site}'; add it (or its module '{module}', or 'default') to the mapping"
        )

    def calibrate(self, model: torch.nn.Module, sites: Iterable[str], batches: Iterable, sitemap=None) -> None:
        """Fit per-site state on calibration batches (no-op for stateless sparsifiers)."""

    def function(self, site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sparsity": self.sparsity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise SponError(f"sparsifier state is for '{state.get('name')}', not '{self.name}'")
        self.__init__(state["sparsity"])  # type: ignore[misc]

    def describe(self) -> str:
        return f"{self.name}(sparsity={self.sparsity})"


class MagnitudeSparsifier(Sparsifier):
    """Per-token top-k by magnitude; needs no calibration."""

    name = "magnitude"

    def function(self, site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return _magnitude_fn(self.sparsity_for(site))


class ThresholdSparsifier(Sparsifier):
    """Per-site magnitude thresholds calibrated on calibration activations (TEAL).

    ``max_samples`` bounds the magnitudes kept per site during calibration: when the calibration set
    holds more, a seeded uniform sample of about that size is used.
    """

    name = "threshold"
    needs_calibration = True

    def __init__(self, sparsity: SparsitySpec, max_samples: int = 1 << 19, seed: int = 0):
        super().__init__(sparsity)
        if int(max_samples) < 1:
            raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = int(max_samples)
        self.seed = int(seed)
        self.thresholds: dict[str, float] = {}
        self.calibration_sparsity: dict[str, float] = {}
        self._fns: dict[float, Callable] = {}

    def calibration_key(self) -> tuple:
        """What the collected calibration statistics depend on besides the model, sites and batches: two
        sparsifiers with equal keys can share one :meth:`collect_calibration` (the runner does, across
        sparsity levels)."""
        return (self.name, "abs-sorted", self.max_samples, self.seed)

    def collect_calibration(self, model, sites, batches, sitemap=None) -> dict[str, torch.Tensor]:
        """The sorted calibration magnitudes ``|x|`` of each site (a seeded sample of at most
        ``max_samples``): what :meth:`fit_calibration` fits any sparsity level from."""
        from .activations import collect_site_inputs
        from .sites import SiteMap

        sitemap = sitemap or SiteMap(model)
        sites = sitemap.resolve(sites)
        samples = collect_site_inputs(
            model, sites, batches, sitemap=sitemap, max_samples=self.max_samples, seed=self.seed,
            transform=torch.abs,
        )
        return {site: samples[site].float().sort().values for site in sites}

    def fit_calibration(self, statistics: Mapping[str, torch.Tensor]) -> None:
        """Set each site's threshold from its sorted calibration magnitudes at this sparsifier's sparsity."""
        for site, values in statistics.items():
            t = calibrated_threshold(values, self.sparsity_for(site))
            self.thresholds[site] = t
            self.calibration_sparsity[site] = float((values <= t).float().mean()) if values.numel() else 0.0
        self._fns.clear()

    def calibrate(self, model, sites, batches, sitemap=None) -> None:
        self.fit_calibration(self.collect_calibration(model, sites, batches, sitemap=sitemap))

    def function(self, site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if site not in self.thresholds:
            raise SponError(
                f"threshold sparsifier is not calibrated for site '{site}'; call calibrate() on calibration data first"
            )
        t = self.thresholds[site]
        if t not in self._fns:

            def fn(x: torch.Tensor, t: float = t) -> torch.Tensor:
                return threshold_sparsify(x, t)

            self._fns[t] = fn
        return self._fns[t]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "max_samples": self.max_samples,
            "seed": self.seed,
            "thresholds": dict(self.thresholds),
            "calibration_sparsity": dict(self.calibration_sparsity),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise SponError(f"sparsifier state is for '{state.get('name')}', not '{self.name}'")
        self.__init__(state["sparsity"], state.get("max_samples", 1 << 19), state.get("seed", 0))
        self.thresholds = {k: float(v) for k, v in state.get("thresholds", {}).items()}
        self.calibration_sparsity = dict(state.get("calibration_sparsity", {}))
