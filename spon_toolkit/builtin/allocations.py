"""Built-in allocation strategies: the seed's list, model-agnostic, plus data-driven ones.

Every strategy takes ``(context, **options)`` and returns the biased sites (see
:mod:`spon_toolkit.allocation`). Options shared by the static strategies:

- ``modules``: restrict the biased sites to these modules (default: every module the strategy targets);
- ``sparsify``: ``"context"`` (default) keeps the experiment's sparsified sites, ``"biased"`` sparsifies
  exactly the biased sites (the seed's ATTN-ONLY sparsified ``o_proj`` only; that is ``sparsify="biased"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from spon_toolkit.allocation import (
    SCORE_METHODS,
    AllocationContext,
    check_fraction,
    layer_count,
    median_split,
    top_layers,
)
from spon_toolkit.errors import ConfigError
from spon_toolkit.hookspecs import hookimpl
from spon_toolkit.sites import parse_site

SPARSIFY = ("context", "biased")


def _result(context: AllocationContext, biased: list[str], sparsify: str):
    if sparsify not in SPARSIFY:
        raise ConfigError(f"sparsify must be one of {SPARSIFY}, got '{sparsify}'")
    if sparsify == "biased":
        return {"biased_sites": biased, "sparse_sites": biased}
    return biased


def _layer_mask(context: AllocationContext, layers: Iterable[int], modules=None, sparsify="context"):
    return _result(context, context.sites(layers=layers, modules=modules), sparsify)


def baseline_teal(context, sparsify="context"):
    """No biases: sparsification alone."""
    return _result(context, [], sparsify)


def unif_all(context, modules=None, sparsify="context"):
    """A bias on every sparsified site."""
    return _layer_mask(context, range(context.n_layers), modules, sparsify)


def first_fraction(context, fraction, modules=None, sparsify="context"):
    """Biases on the sparsified sites of the first ``layer_count(fraction)`` layers."""
    return _layer_mask(context, context.first_layers(check_fraction(fraction)), modules, sparsify)


def last_fraction(context, fraction, modules=None, sparsify="context"):
    """Biases on the sparsified sites of the last ``layer_count(fraction)`` layers."""
    return _layer_mask(context, context.last_layers(check_fraction(fraction)), modules, sparsify)


def module_set(context, targets, modules=None, sparsify="context"):
    """Biases on ``targets`` modules in every layer, sparsified or not (ATTN-ONLY, HYBRID-*)."""
    chosen = [m for m in targets if modules is None or m in modules]
    return _result(context, context.module_sites(chosen), sparsify)


def _ranking(context: AllocationContext, scores: str | None) -> tuple[str, dict[str, float]]:
    """A score per sparsified site (higher = bias first) and the name of the ranking used."""
    if scores == "auto":
        scores = next((m for m in SCORE_METHODS if context.importance.get(m)), None)
    if scores is None:  # the seed's prior: earlier layers matter more
        return "layer order (earliest first)", {s: -float(parse_site(s)[0]) for s in context.sparse_sites}
    if not context.importance.get(scores):
        raise ConfigError(f"no '{scores}' importance scores in the context; run `spon importance --method "
                          f"{scores}` or use scores=None for layer order")
    ranked = {}
    for site in context.sparse_sites:
        value = context.site_score(scores, site)
        ranked[site] = float("-inf") if value is None else value
    return f"{scores} scores", ranked


def adaptive(context, capacity=0.75, scores="auto", sparsify="context"):
    """Spend ``capacity`` x UNIF-ALL's parameters on the most important sparsified sites.

    Sites are ranked by their layer's (or sublayer's) importance score (``scores="auto"`` takes the first
    of sensitivity, shapley, cornerstone present in the context; ``None`` ranks earlier layers first) and
    taken greedily while the parameter budget allows; a site that does not fit is skipped and smaller ones
    may still fit. Without scores and with equal-sized sites this is TOP-``capacity``; with scores it
    follows the data, and with sites of mixed sizes (all 7 modules) the budget is honoured in parameters.
    """
    capacity = check_fraction(capacity, "ADAPTIVE capacity (fraction of UNIF-ALL's SPON parameters)")
    _, ranked = _ranking(context, scores)
    budget = capacity * context.unif_all_params
    order = {s: i for i, s in enumerate(context.sparse_sites)}
    chosen, spent = [], 0
    for site in sorted(ranked, key=lambda s: (-ranked[s], order[s])):
        cost = context.bias_params(site)
        if spent + cost <= budget + 1e-9:
            chosen.append(site)
            spent += cost
    return _result(context, chosen, sparsify)


def _explicit_layers(context, layers):
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) for i in layers):
        raise ConfigError(f"layers must be a list of layer indices, got {layers!r}")
    return list(layers)


def critical_only(context, layers=None, scores="sensitivity", modules=None, sparsify="context"):
    """Biases on layers whose ``scores`` (default sensitivity) are strictly above the median."""
    chosen = _explicit_layers(context, layers)
    if chosen is None:
        chosen = median_split(context.layer_scores(scores))
    return _layer_mask(context, chosen, modules, sparsify)


def shapley_guided(context, layers=None, fraction=0.5, scores="shapley", modules=None, sparsify="context"):
    """Biases on the top ``fraction`` of layers by Shapley value (``layer_count`` rounding)."""
    chosen = _explicit_layers(context, layers)
    if chosen is None:
        table = context.layer_scores(scores)
        chosen = top_layers(table, layer_count(check_fraction(fraction, "SHAPLEY-GUIDED fraction"), len(table)))
    return _layer_mask(context, chosen, modules, sparsify)


def cornerstone(context, layers=None, threshold=0.5, modules=None, sparsify="context"):
    """Biases on cornerstone layers: removing one alone raises PPL by more than ``threshold`` (relative).

    The scores are those of the ``cornerstone`` importance method (relative PPL increase on removal).
    """
    chosen = _explicit_layers(context, layers)
    if chosen is None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise ConfigError(f"CORNERSTONE threshold must be a relative PPL increase >= 0, got {threshold!r}")
        chosen = sorted(i for i, v in context.layer_scores("cornerstone").items() if v > threshold)
    return _layer_mask(context, chosen, modules, sparsify)


def _fixed(strategy, fraction):
    """``strategy`` with its fraction fixed (TOP-25 ...): a ``fraction`` option is then an error."""

    def allocate(context, modules=None, sparsify="context"):
        return strategy(context, fraction, modules, sparsify)

    allocate.__doc__ = f"{strategy.__doc__} (fraction {fraction})"
    return allocate


@hookimpl
def spon_register_allocations(register):
    static = {"kind": "static"}
    register("BASELINE-TEAL", baseline_teal, "no SPON biases (sparsification only)", **static)
    register("UNIF-ALL", unif_all, "a bias on every sparsified site", **static)
    for pct in (25, 50, 75):
        register(f"TOP-{pct}", _fixed(first_fraction, pct / 100),
                 f"biases on the sparsified sites of the first {pct}% of layers (round half up)", **static)
    register("BOTTOM-50", _fixed(last_fraction, 0.5),
             "biases on the sparsified sites of the last 50% of layers", **static)
    register("TOP", first_fraction, "biases on the first `fraction` of layers (option fraction=...)", **static)
    register("BOTTOM", last_fraction, "biases on the last `fraction` of layers (option fraction=...)", **static)
    register("ATTN-ONLY", partial(module_set, targets=("o_proj",)),
             "biases on o_proj of every layer (sparsify='biased' also sparsifies only o_proj, as the seed)", **static)
    register("HYBRID-OD", partial(module_set, targets=("o_proj", "down_proj")),
             "biases on o_proj and down_proj of every layer", **static)
    register("HYBRID-QD", partial(module_set, targets=("q_proj", "down_proj")),
             "biases on q_proj and down_proj of every layer", **static)
    data = {"kind": "data-driven"}
    register("ADAPTIVE", adaptive,
             "capacity x UNIF-ALL's parameters on the most sensitive sites (without scores: earliest layers)",
             requires="sensitivity", **data)
    register("CRITICAL-ONLY", critical_only, "layers with above-median sensitivity", requires="sensitivity", **data)
    register("SHAPLEY-GUIDED", shapley_guided, "top 50% of layers by Shapley value", requires="shapley", **data)
    register("CORNERSTONE", cornerstone, "layers whose removal alone raises PPL by > threshold (default 50%)",
             requires="cornerstone", **data)
