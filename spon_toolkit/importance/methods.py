"""The built-in importance methods on a model: ``sensitivity``, ``cornerstone`` and ``shapley``, and their
result type."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..activations import iter_input_ids
from ..errors import ConfigError
from ..sites import SiteMap
from ..sparsifiers import Sparsifier
from .players import CoalitionValue, make_players
from .shapley import ESTIMATORS, _exp, _quiet, exact_shapley, permutation_shapley, proximity_shapley


@dataclass
class ImportanceResult:
    """Scores per player (higher = more important) with the protocol that produced them.

    ``std_errors``: per player, for Monte-Carlo Shapley. ``selected``: players a method singles out
    (cornerstone layers). ``evaluations``: distinct model evaluations (passes over the blocks).
    """

    method: str
    scores: dict[str, float]
    std_errors: dict[str, float] | None = None
    selected: list[str] | None = None
    evaluations: int = 0
    wall_time_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def layer_scores(self) -> dict[int, float]:
        """Scores summed per layer (sublayer players are added up)."""
        out: dict[int, float] = {}
        for player, value in self.scores.items():
            i = int(player.split(".")[1])
            out[i] = out.get(i, 0.0) + value
        return out

    def ranking(self) -> list[str]:
        """Players from most to least important (ties: model order)."""
        order = list(self.scores)
        return sorted(order, key=lambda p: (-self.scores[p], order.index(p)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImportanceResult:
        return cls(**{k: data[k] for k in ("method", "scores", "std_errors", "selected", "evaluations",
                                            "wall_time_s", "meta") if k in data})


def _protocol(value: CoalitionValue, sparsifier: Sparsifier | None, sites: list[str]) -> dict[str, Any]:
    b = value.batches
    return {
        "blocks": sum(x.shape[0] for x in b), "block_size": int(b[0].shape[1]), "tokens_scored": value.tokens,
        "ablation": value.ablation, "players": [p.name for p in value.players], "value": value.value,
        "sparsifier": sparsifier.describe() if sparsifier is not None else None, "sites": sites,
    }


def _first_blocks(batches: Iterable, blocks: int | None) -> list[torch.Tensor]:
    """The first ``blocks`` sequences of ``batches`` (all when None): importance needs only a few."""
    ids = list(iter_input_ids(batches))
    if blocks is None:
        return ids
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ConfigError(f"blocks must be a positive number of calibration blocks, got {blocks!r}")
    rows = torch.cat([b.cpu() for b in ids])[:blocks] if ids else torch.empty(0, 0, dtype=torch.long)
    return [rows] if rows.numel() else []


def _setup(model, batches, sparsifier, sites, players, ablation, value="neg_nll", blocks=None, sitemap=None):
    batches = _first_blocks(batches, blocks)
    sitemap = sitemap or SiteMap(model)
    sparse = sitemap.resolve(sites) if sites else []
    player_list = make_players(sitemap, players, ablation, sparse)
    return CoalitionValue(model, batches, player_list, ablation=ablation, sparsifier=sparsifier,
                          sitemap=sitemap, value=value), sparse


def _single_ablations(v: CoalitionValue, progress: bool | None) -> tuple[float, dict[str, float]]:
    """NLL with nothing ablated and with each player ablated alone."""
    everyone = set(range(v.n))
    base = v.nll(everyone)
    nll = {}
    for i, p in enumerate(tqdm(v.players, desc=f"ablating ({v.ablation})", disable=_quiet(progress),
                               leave=False)):
        nll[p.name] = v.nll(everyone - {i})
    return base, nll


def sensitivity(model: nn.Module, batches: Iterable, sparsifier: Sparsifier | None = None,
                sites: str | Iterable[str] = "down_proj", *, players: str = "layers", ablation: str = "sparsify",
                blocks: int | None = None, progress: bool | None = None,
                sitemap: SiteMap | None = None) -> ImportanceResult:
    """Relative PPL increase ``PPL(only player ablated) / PPL(nothing ablated) - 1`` per player.

    ``blocks``: use only the first that many calibration blocks (all by default).
    """
    start = time.perf_counter()
    v, sparse = _setup(model, batches, sparsifier, sites, players, ablation, blocks=blocks, sitemap=sitemap)
    base, nll = _single_ablations(v, progress)
    scores = {p: _exp(x - base) - 1.0 for p, x in nll.items()}
    meta = {"protocol": _protocol(v, sparsifier, sparse), "base_nll": base, "base_ppl": _exp(base),
            "ppl": {p: _exp(x) for p, x in nll.items()}, "score": "relative PPL increase"}
    return ImportanceResult("sensitivity", scores, None, None, v.evaluations, time.perf_counter() - start, meta)


def cornerstone(model: nn.Module, batches: Iterable, sparsifier: Sparsifier | None = None,
                sites: str | Iterable[str] | None = None, *, threshold: float = 0.5, players: str = "layers",
                blocks: int | None = None, progress: bool | None = None,
                sitemap: SiteMap | None = None) -> ImportanceResult:
    """Layers whose removal alone raises PPL by more than ``threshold`` (relative; 0.5 = +50%).

    Scores are the relative PPL increase on removal; ``selected`` lists the cornerstone players.
    Sparsifier and sites are not used (removal is not sparsification) and may be omitted.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ConfigError(f"cornerstone threshold must be a relative PPL increase >= 0 (0.5 = +50%), got {threshold!r}")
    start = time.perf_counter()
    v, _ = _setup(model, batches, None, None, players, "remove", blocks=blocks, sitemap=sitemap)
    base, nll = _single_ablations(v, progress)
    scores = {p: _exp(x - base) - 1.0 for p, x in nll.items()}
    selected = [p for p, s in scores.items() if s > threshold]
    meta = {"protocol": _protocol(v, None, []), "base_nll": base, "base_ppl": _exp(base),
            "ppl": {p: _exp(x) for p, x in nll.items()}, "threshold": float(threshold),
            "score": "relative PPL increase when the player alone is removed"}
    return ImportanceResult("cornerstone", scores, None, selected, v.evaluations, time.perf_counter() - start, meta)


def shapley(model: nn.Module, batches: Iterable, sparsifier: Sparsifier | None = None,
            sites: str | Iterable[str] = "down_proj", *, players: str = "layers", ablation: str = "sparsify",
            estimator: str = "permutation", budget: int | None = None, level: int = 2, seed: int = 0,
            value: str = "neg_nll", blocks: int | None = None, progress: bool | None = None,
            sitemap: SiteMap | None = None) -> ImportanceResult:
    """Shapley values of the players for ``v(S) = -NLL`` (or ``-PPL``) with the players outside ``S`` ablated.

    ``budget`` (permutation estimator): model evaluations; default ``10 * (n + 1)``. ``level``: proximity
    estimator's maximum number of missing players. Efficiency holds: the values sum to
    ``v(all intact) - v(all ablated)`` for the exact and permutation estimators.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {ESTIMATORS}, got '{estimator}'")
    start = time.perf_counter()
    v, sparse = _setup(model, batches, sparsifier, sites, players, ablation, value, blocks, sitemap)
    n = v.n
    if estimator == "exact":
        est = exact_shapley(v, n, progress=progress)
    elif estimator == "proximity":
        est = proximity_shapley(v, n, level, progress=progress)
    else:
        est = permutation_shapley(v, n, 10 * (n + 1) if budget is None else budget, seed=seed, progress=progress)
    names = [p.name for p in v.players]
    meta = {"protocol": _protocol(v, sparsifier, sparse), "estimator": est.estimator, **est.detail,
            "samples_per_player": dict(zip(names, est.samples, strict=True)) if est.samples else None,
            "v_full": v(frozenset(range(n))), "score": f"Shapley value of {value}"}
    if estimator != "proximity":  # the proximity estimator never evaluates the all-ablated coalition
        meta["v_empty"] = v(frozenset())
    std = dict(zip(names, est.std_errors, strict=True)) if estimator == "permutation" else None
    return ImportanceResult("shapley", dict(zip(names, est.values, strict=True)), std, None, v.evaluations,
                            time.perf_counter() - start, meta)
