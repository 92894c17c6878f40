"""Allocation strategies: which sites get a SPON bias, and what that costs in parameters.

An allocation strategy is a plugin (hook ``spon_register_allocations``) with the contract
``allocate(context, **options) -> sites``: it receives an :class:`AllocationContext` (the model's layers
and sites, the sparsified sites, per-site bias sizes, layer-importance scores) and returns the site names
that get a bias. It may instead return a mapping ``{"biased_sites": [...], "sparse_sites": [...]}`` to
change what is sparsified as well (the seed's ATTN-ONLY does this: it sparsifies ``o_proj`` only).

:func:`allocate` calls the plugin and validates its answer (every site exists in the model, no site twice);
a wrong answer is a one-line :class:`~spon_toolkit.errors.PluginError` naming the strategy and its plugin.
The result is an :class:`AllocationPlan` with the sparsified and biased sites and an honest parameter count:
each biased site costs ``out_features`` parameters (output-space bias, the default) or ``in_features``
(input-space ``alpha``), so an ``o_proj`` bias costs as much as a ``down_proj`` bias (both hidden-size).
The count is compared with UNIF-ALL *in the same context*: a bias on every sparsified site.

Layer fractions (TOP-25 ...) become a number of layers with :func:`layer_count`: ``floor(f * n + 0.5)``
(round half up), at least one layer when ``f > 0``. On 30 layers TOP-25/50/75 bias 8/15/23 layers; on 32
layers 8/16/24.

Data-driven allocations (CRITICAL-ONLY, SHAPLEY-GUIDED, CORNERSTONE) read importance scores from
``context.importance`` or take explicit layers from an override file written by ``spon importance``
(:func:`load_overrides`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from .errors import ConfigError, PluginError, SponError
from .sites import MODULES, SiteMap, parse_site
from .sparsifiers import check_unit_interval

PARAMETRISATIONS = ("output", "input")

#: How a data-driven allocation finds its scores in ``context.importance``.
SCORE_METHODS = ("sensitivity", "shapley", "cornerstone")


# --- small validated helpers ----------------------------------------------------------------------

def check_fraction(value: Any, what: str = "fraction") -> float:
    """``value`` as a float in [0, 1], or a one-line :class:`ConfigError`."""
    return check_unit_interval(value, what, "a fraction of the layers")


def layer_count(fraction: float, n_layers: int) -> int:
    """How many of ``n_layers`` a layer fraction selects: round half up, at least 1 when ``fraction > 0``.

    Written with integer arithmetic on the fraction's decimal value where possible, so ``0.75 * 30``
    (22.5) reliably rounds to 23 instead of depending on binary floating point.
    """
    fraction = check_fraction(fraction)
    if fraction == 0.0:
        return 0
    k = math.floor(round(fraction * n_layers, 9) + 0.5)
    return max(1, min(n_layers, k))


def layer_of(player_or_site: str) -> int:
    """The layer index in ``"layers.3"``, ``"layers.3.mlp"`` or ``"layers.3.down_proj"``."""
    parts = player_or_site.split(".")
    if len(parts) < 2 or parts[0] != "layers" or not parts[1].isdigit():
        raise ConfigError(f"'{player_or_site}' does not name a layer; use layers.<i>[.<module or attn/mlp>]")
    return int(parts[1])


def sublayer_of(module: str) -> str:
    """``"attn"`` for q/k/v/o_proj, ``"mlp"`` for gate/up/down_proj."""
    return "attn" if module in MODULES[:4] else "mlp"


# --- the context handed to a strategy ------------------------------------------------------------

@dataclass(frozen=True)
class AllocationContext:
    """Everything a strategy may look at to choose biased sites. Build it with :meth:`from_model`.

    - ``n_layers``: decoder layers of the model.
    - ``site_shapes``: every site of the model -> ``(in_features, out_features)``, in model order.
    - ``sparse_sites``: the sites the experiment sparsifies (the default candidates for biases).
    - ``parametrisation``: ``"output"`` (bias of ``out_features`` values) or ``"input"`` (``in_features``).
    - ``importance``: method name -> {player -> score}; players are ``layers.{i}`` or ``layers.{i}.attn/mlp``.
    - ``options``: free-form facts a plugin may use (model name ...).
    """

    n_layers: int
    site_shapes: Mapping[str, tuple[int, int]]
    sparse_sites: tuple[str, ...]
    parametrisation: str = "output"
    importance: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.parametrisation not in PARAMETRISATIONS:
            raise ConfigError(f"parametrisation must be one of {PARAMETRISATIONS}, got '{self.parametrisation}'")
        missing = [s for s in self.sparse_sites if s not in self.site_shapes]
        if missing:
            raise ConfigError(f"sparse site '{missing[0]}' is not a site of this model")

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        sparse_sites: str | Iterable[str] = "down_proj",
        *,
        parametrisation: str = "output",
        importance: Mapping[str, Mapping[str, float]] | None = None,
        sitemap: SiteMap | None = None,
        **options: Any,
    ) -> AllocationContext:
        """The context of a loaded model; ``sparse_sites`` is any site specification (``"down_proj"`` ...)."""
        sitemap = sitemap or SiteMap(model)
        shapes = {site: sitemap.shape(site) for site in sitemap.names}
        sparse = tuple(sitemap.resolve(sparse_sites)) if sparse_sites else ()
        return cls(sitemap.n_layers, shapes, sparse, parametrisation, dict(importance or {}), dict(options))

    # sites ------------------------------------------------------------------------------------------
    @property
    def all_sites(self) -> list[str]:
        return list(self.site_shapes)

    @property
    def sparse_modules(self) -> list[str]:
        """The modules that are sparsified in at least one layer, in canonical order."""
        present = {parse_site(s)[1] for s in self.sparse_sites}
        return [m for m in MODULES if m in present]

    def sites(self, layers: Iterable[int] | None = None, modules: Iterable[str] | None = None,
              *, sparse_only: bool = True) -> list[str]:
        """Sites in ``layers`` (default all) of ``modules`` (default all), in model order.

        With ``sparse_only`` (the default) only sparsified sites are returned: the usual bias candidates.
        """
        layer_set = set(range(self.n_layers)) if layers is None else {int(i) for i in layers}
        bad = sorted(i for i in layer_set if not 0 <= i < self.n_layers)
        if bad:
            raise ConfigError(f"layer {bad[0]} is out of range: this model has layers 0-{self.n_layers - 1}")
        module_set = set(MODULES) if modules is None else set(modules)
        unknown_modules = sorted(module_set - set(MODULES))
        if unknown_modules:
            raise ConfigError(f"unknown module '{unknown_modules[0]}'; modules: {', '.join(MODULES)}")
        pool = self.sparse_sites if sparse_only else self.site_shapes
        return [s for s in pool if parse_site(s)[0] in layer_set and parse_site(s)[1] in module_set]

    def module_sites(self, modules: Iterable[str]) -> list[str]:
        """All sites of ``modules`` in every layer, sparsified or not (ATTN-ONLY, HYBRID-*)."""
        return self.sites(modules=modules, sparse_only=False)

    # parameters -------------------------------------------------------------------------------------
    def bias_params(self, site: str) -> int:
        """Parameters of one SPON bias: ``out_features`` (output space) or ``in_features`` (input space)."""
        d_in, d_out = self.site_shapes[site]
        return d_out if self.parametrisation == "output" else d_in

    def params(self, sites: Iterable[str]) -> int:
        return sum(self.bias_params(s) for s in sites)

    @property
    def unif_all_params(self) -> int:
        """The reference: UNIF-ALL, a bias on every sparsified site."""
        return self.params(self.sparse_sites)

    # layers -----------------------------------------------------------------------------------------
    def first_layers(self, fraction: float) -> list[int]:
        return list(range(layer_count(fraction, self.n_layers)))

    def last_layers(self, fraction: float) -> list[int]:
        k = layer_count(fraction, self.n_layers)
        return list(range(self.n_layers - k, self.n_layers))

    def layer_scores(self, method: str) -> dict[int, float]:
        """Scores of ``method`` per layer; sublayer players (``layers.3.attn``/``.mlp``) are summed."""
        scores = self.importance.get(method)
        if not scores:
            raise ConfigError(
                f"no '{method}' importance scores in the allocation context; run "
                f"`spon importance --method {method} -o overrides.yaml` and pass that file, or give layers=[...]"
            )
        out: dict[int, float] = {}
        for player, value in scores.items():
            i = layer_of(player)
            if not 0 <= i < self.n_layers:
                raise ConfigError(
                    f"'{method}' scores name {player}, but this model has layers 0-{self.n_layers - 1}"
                )
            out[i] = out.get(i, 0.0) + float(value)
        return out

    def site_score(self, method: str, site: str) -> float | None:
        """The score of the player that owns ``site``: its sublayer if scored, else its layer, else None."""
        scores = self.importance.get(method) or {}
        layer, module = parse_site(site)
        for player in (f"layers.{layer}.{sublayer_of(module)}", f"layers.{layer}"):
            if player in scores:
                return float(scores[player])
        return None


# --- the validated result -------------------------------------------------------------------------

@dataclass(frozen=True)
class AllocationPlan:
    """What a strategy chose, validated: sparsified sites, biased sites and their parameter count."""

    name: str
    plugin: str
    sparse_sites: tuple[str, ...]
    biased_sites: tuple[str, ...]
    n_params: int
    unif_all_params: int
    options: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        """SPON parameters relative to UNIF-ALL in the same context (NaN when UNIF-ALL has none)."""
        return self.n_params / self.unif_all_params if self.unif_all_params else math.nan

    @property
    def biased_layers(self) -> list[int]:
        return sorted({parse_site(s)[0] for s in self.biased_sites})

    @property
    def unsparsified_biased_sites(self) -> list[str]:
        sparse = set(self.sparse_sites)
        return [s for s in self.biased_sites if s not in sparse]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "plugin": self.plugin,
            "sparse_sites": list(self.sparse_sites), "biased_sites": list(self.biased_sites),
            "biased_layers": self.biased_layers,
            "spon_params": self.n_params, "unif_all_params": self.unif_all_params,
            "ratio_vs_unif_all": self.ratio, "options": dict(self.options), "notes": list(self.notes),
        }

    def describe(self) -> str:
        text = (f"{self.name}: {len(self.biased_sites)} biased sites, {self.n_params} SPON params "
                f"({self.ratio:.2f}x UNIF-ALL), {len(self.sparse_sites)} sparsified sites")
        return text + "".join(f"; {n}" for n in self.notes)


def check_allocation_options(toolkit, name: str, options: Mapping[str, Any]) -> None:
    """Bind ``options`` against the strategy's signature, before any model work (lists what it takes)."""
    from .contracts import bind_options

    entry = toolkit.allocations.entry(name)
    who = f"allocation '{name}' (plugin '{entry.plugin}')"
    bind_options(who, entry.factory, options)
    if options.get("sparsify") == "biased" and name == "BASELINE-TEAL":
        raise ConfigError(f"{who} with sparsify: biased sparsifies no site (it biases none), so its numbers "
                          f"would be the dense model's; drop the option")


def allocate(toolkit, name: str, context: AllocationContext, **options: Any) -> AllocationPlan:
    """Run the allocation strategy ``name`` on ``context`` and validate what it returns.

    Errors from the strategy keep their one line, prefixed by the strategy and plugin; a return value that
    names missing sites, repeats a site or has the wrong type is a :class:`PluginError` naming the plugin.
    """
    entry = toolkit.allocations.entry(name)
    who = f"allocation '{name}' (plugin '{entry.plugin}')"
    check_allocation_options(toolkit, name, options)
    try:
        result = entry.factory(context, **options)
    except SponError as exc:
        raise type(exc)(f"{who}: {exc}") from exc
    except Exception as exc:
        raise PluginError(f"{who} failed: {type(exc).__name__}: {exc}") from exc

    sparse_result = None
    if isinstance(result, Mapping):
        extra = set(result) - {"biased_sites", "sparse_sites"}
        if "biased_sites" not in result or extra:
            raise PluginError(f"{who} returned a mapping with keys {sorted(result)}; "
                              f"use 'biased_sites' and optionally 'sparse_sites'")
        biased_result, sparse_result = result["biased_sites"], result.get("sparse_sites")
    else:
        biased_result = result
    biased = _validated_sites(biased_result, context, who, "biased")
    sparse = context.sparse_sites if sparse_result is None else _validated_sites(sparse_result, context, who, "sparse")
    if not sparse:
        raise ConfigError(f"{who} sparsifies no site (options {dict(options)}), so its numbers would be the dense "
                          f"model's; keep at least one sparsified site (e.g. drop sparsify: biased)")
    order = {s: i for i, s in enumerate(context.site_shapes)}
    biased = tuple(sorted(biased, key=order.__getitem__))
    sparse = tuple(sorted(sparse, key=order.__getitem__))

    notes = []
    if sparse != context.sparse_sites:
        notes.append(f"changes what is sparsified ({len(sparse)} sites instead of {len(context.sparse_sites)}); "
                     f"compare with TEAL on the same sites")
    dense_biased = [s for s in biased if s not in set(sparse)]
    if dense_biased:
        notes.append(f"{len(dense_biased)} biased sites are not sparsified")
    return AllocationPlan(name, entry.plugin, sparse, biased, context.params(biased), context.unif_all_params,
                          dict(options), tuple(notes))


def _validated_sites(value: Any, context: AllocationContext, who: str, what: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise PluginError(f"{who} returned {type(value).__name__} for its {what} sites; "
                          f"return a list of site names such as 'layers.0.down_proj'")
    seen: set[str] = set()
    for site in value:
        if not isinstance(site, str):
            raise PluginError(f"{who} returned {site!r} among its {what} sites; site names are strings "
                              f"such as 'layers.0.down_proj'")
        if site not in context.site_shapes:
            raise PluginError(f"{who} returned {what} site '{site}', which this model does not have "
                              f"(layers 0-{context.n_layers - 1}, modules {', '.join(MODULES)})")
        if site in seen:
            raise PluginError(f"{who} returned {what} site '{site}' twice; return each site once")
        seen.add(site)
    return tuple(seen)


# --- override files written by `spon importance` -------------------------------------------------

@dataclass(frozen=True)
class Overrides:
    """Explicit layer choices (and the scores behind them) for data-driven allocations, from a YAML file.

    The file's ``allocations`` map an allocation name to its options (``{layers: [...]}``); a bare list is
    read as ``layers``. ``scores`` maps an importance method to ``{player: score}``.
    """

    path: str
    allocations: Mapping[str, Mapping[str, Any]]
    scores: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def options_for(self, name: str) -> dict[str, Any]:
        return dict(self.allocations.get(name, {}))


def load_overrides(path: str | Path, n_layers: int | None = None) -> Overrides:
    """Read and validate an override file; with ``n_layers``, every layer must exist in the model.

    Errors are one line and name the file and the offending entry.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"override file '{path}' does not exist; write one with `spon importance -o {path}`") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"override file '{path}' cannot be read: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("allocations"), Mapping):
        raise ConfigError(f"override file '{path}' needs a mapping 'allocations: {{NAME: {{layers: [...]}}}}'")
    file_layers = data.get("n_layers")
    if n_layers is not None and file_layers is not None and int(file_layers) != n_layers:
        raise ConfigError(f"override file '{path}' was written for a model with {file_layers} layers; "
                          f"this model has {n_layers}")
    allocations: dict[str, dict[str, Any]] = {}
    for name, options in data["allocations"].items():
        options = {"layers": options} if isinstance(options, list) else options
        if not isinstance(options, Mapping):
            raise ConfigError(f"override file '{path}': allocations.{name} must be a list of layers or a mapping")
        options = dict(options)
        if "layers" in options:
            options["layers"] = _check_layers(options["layers"], n_layers, f"override file '{path}': "
                                              f"allocations.{name}")
        allocations[str(name)] = options
    scores = data.get("scores") or {}
    if not isinstance(scores, Mapping) or not all(isinstance(v, Mapping) for v in scores.values()):
        raise ConfigError(f"override file '{path}': 'scores' must map a method to {{player: score}}")
    for method, table in scores.items():
        for player in table:
            where = f"override file '{path}': scores.{method}"
            try:
                i = layer_of(str(player))
            except ConfigError:
                raise ConfigError(f"{where} has player '{player}'; players look like layers.3 or layers.3.mlp") from None
            _check_layers([i], n_layers, where)
    meta = {k: v for k, v in data.items() if k not in ("allocations", "scores")}
    return Overrides(str(path), allocations, {m: dict(t) for m, t in scores.items()}, meta)


def _check_layers(layers: Any, n_layers: int | None, where: str) -> list[int]:
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in layers):
        raise ConfigError(f"{where}: layers must be a list of layer indices, got {layers!r}")
    for i in layers:
        if i < 0 or (n_layers is not None and i >= n_layers):
            limit = f"layers 0-{n_layers - 1}" if n_layers is not None else "non-negative layer indices"
            raise ConfigError(f"{where} names layer {i}, which the model lacks (it has {limit})")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{where} names a layer twice: {list(layers)}")
    return sorted(layers)


def layers_to_sites(context: AllocationContext, layers: Iterable[int],
                    modules: Iterable[str] | None = None) -> list[str]:
    """The sparsified sites of ``layers`` (optionally only ``modules``): the usual layer-mask allocation."""
    return context.sites(layers=layers, modules=modules)


def median_split(scores: Mapping[int, float]) -> list[int]:
    """Layers whose score is strictly above the median of all layer scores."""
    if not scores:
        return []
    med = statistics.median(scores.values())
    return sorted(i for i, v in scores.items() if v > med)


def top_layers(scores: Mapping[int, float], k: int) -> list[int]:
    """The ``k`` highest-scoring layers (ties: lower layer first), in layer order."""
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


__all__ = [
    "AllocationContext", "AllocationPlan", "Overrides", "allocate", "check_fraction", "layer_count",
    "layers_to_sites", "load_overrides", "median_split", "top_layers",
]
