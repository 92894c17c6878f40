"""Layer importance: which layers (or attention/MLP sublayers) matter, measured on calibration text.

Players are layers (``layers.3``) or sublayers (``layers.3.attn``, ``layers.3.mlp``). A player is
*ablated* in one of two ways:

- ``"sparsify"``: the sparsifier acts on the player's sparsified sites (the sites of the experiment that
  lie in that layer/sublayer); everything else stays dense. This asks "where does sparsification hurt".
- ``"remove"``: the player is skipped. A removed layer returns its input hidden states unchanged (a forward
  hook replaces its output, so the residual stream passes through); a removed sublayer contributes zero to
  the residual stream (its output projection, ``o_proj`` or ``down_proj``, returns zeros).

The value of a coalition ``S`` (the players left intact) is ``v(S) = -NLL`` (default, token-weighted mean
over the calibration blocks) or ``-PPL``, with every player outside ``S`` ablated. Negative NLL is the
default because a coalition with many layers removed can reach perplexities in the thousands, which would
dominate a ``-PPL`` game; Shapley values of ``-NLL`` split ``log PPL`` additively.

Methods (registered as plugins by :mod:`spon_toolkit.builtin.importance`):

- :func:`sensitivity`: relative PPL increase when only that player is ablated.
- :func:`shapley`: Shapley values of ``v``. Estimators: ``"exact"`` (all ``2^n`` coalitions, n <= 16),
  ``"permutation"`` (Monte-Carlo over random orders, a budget of model evaluations, a standard error per
  player) and ``"proximity"`` (the cornerstone-layer paper's estimator: only coalitions that miss at most
  ``level`` players, i.e. that lie near the full model; ``level = n`` is exact).
- :func:`cornerstone`: layers whose removal alone raises PPL by more than ``threshold`` (default 0.5 = 50%).

:func:`compute_importance` runs a method through the plugin registry with an on-disk cache keyed by
(model fingerprint, token-data hash, method, options, sparsifier state, sites).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .errors import ConfigError, PluginError
from .sites import SiteMap, parse_site, site_name
from .sparse import attach_sparsifier, iter_input_ids
from .sparsifiers import Sparsifier

ABLATIONS = ("sparsify", "remove")
PLAYER_KINDS = ("layers", "sublayers")
VALUES = ("neg_nll", "neg_ppl")
ESTIMATORS = ("permutation", "proximity", "exact")
MAX_EXACT_PLAYERS = 16
CACHE_VERSION = 1


# --- players and ablation --------------------------------------------------------------------------

@dataclass(frozen=True)
class Player:
    """A layer (``part="layer"``) or a sublayer (``"attn"``/``"mlp"``) and the sparsified sites it owns."""

    name: str
    layer: int
    part: str
    sites: tuple[str, ...] = ()


def make_players(sitemap: SiteMap, kind: str = "layers", ablation: str = "sparsify",
                 sparse_sites: Iterable[str] = ()) -> list[Player]:
    """The players of a game. Under ``"sparsify"`` a player without sparsified sites is left out."""
    if kind not in PLAYER_KINDS:
        raise ConfigError(f"players must be one of {PLAYER_KINDS}, got '{kind}'")
    if ablation not in ABLATIONS:
        raise ConfigError(f"ablation must be one of {ABLATIONS}, got '{ablation}'")
    sparse = sitemap.resolve(sparse_sites) if sparse_sites else []
    parts = ("layer",) if kind == "layers" else ("attn", "mlp")
    players = []
    for i in range(sitemap.n_layers):
        for part in parts:
            name = f"layers.{i}" if part == "layer" else f"layers.{i}.{part}"
            owned = tuple(s for s in sparse if parse_site(s)[0] == i and
                          (part == "layer" or _sublayer(parse_site(s)[1]) == part))
            if ablation == "sparsify" and not owned:
                continue
            players.append(Player(name, i, part, owned))
    if not players:
        raise ConfigError("no players: ablation 'sparsify' needs sparsified sites (e.g. sites='down_proj')")
    return players


def _sublayer(module: str) -> str:
    return "attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def _skip_layer_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _zero_output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


@contextlib.contextmanager
def removed(model: nn.Module, players: Iterable[Player], *, sitemap: SiteMap | None = None) -> Iterator[None]:
    """Skip these players while the context is open (hooks removed on exit, even on error).

    A layer returns its input hidden states; a sublayer's output projection returns zeros, so the residual
    stream passes through it unchanged.
    """
    sitemap = sitemap or SiteMap(model)
    handles = []
    try:
        for p in players:
            if p.part == "layer":
                handles.append(sitemap.layers[p.layer].register_forward_hook(_skip_layer_hook, with_kwargs=True))
            else:
                proj = "o_proj" if p.part == "attn" else "down_proj"
                handles.append(sitemap.module(site_name(p.layer, proj)).register_forward_hook(_zero_output_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def removed_layers(model: nn.Module, layers: Iterable[int], *, sitemap: SiteMap | None = None) -> Iterator[None]:
    """``with removed_layers(model, [3, 7]): ...`` runs the model with decoder layers 3 and 7 skipped."""
    with removed(model, [Player(f"layers.{i}", int(i), "layer") for i in layers], sitemap=sitemap):
        yield


@contextlib.contextmanager
def ablated(model: nn.Module, players: Sequence[Player], *, ablation: str, sparsifier: Sparsifier | None,
            sitemap: SiteMap) -> Iterator[None]:
    """Ablate ``players`` (sparsify their sites, or remove them) while the context is open."""
    if ablation == "remove":
        with removed(model, players, sitemap=sitemap):
            yield
        return
    sites = [s for p in players for s in p.sites]
    if not sites:
        yield
        return
    hooks = attach_sparsifier(model, sparsifier, sites, sitemap=sitemap)
    try:
        yield
    finally:
        hooks.remove()


# --- the value function ---------------------------------------------------------------------------

def mean_nll(model: nn.Module, batches: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Token-weighted mean next-token NLL over ``batches`` (each block scored on its own) and the token count."""
    from .evaluate import block_nlls

    sums, counts = block_nlls(model, batches, progress=False)
    total = sum(counts)
    return sum(sums) / max(total, 1), total


class _PrefixReuse:
    """Reuse the decoder-layer outputs of the previous evaluation for the layers it shares.

    Layer ``k``'s output depends only on which players of layers ``<= k`` are ablated. When the next
    coalition ablates the same players up to layer ``j - 1`` (a permutation walk adds one layer at a time;
    a sensitivity sweep ablates one layer of an otherwise intact model), layers ``0..j-1`` are not run:
    their ``forward`` returns the stored output, and the model's own forward does the rest (embeddings,
    masks, final norm, head), so nothing architecture-specific is re-implemented. Exact: the same
    operations run on the same inputs. Memory: one hidden-state tensor per layer and batch.
    """

    def __init__(self, layers: nn.ModuleList, n_batches: int):
        self.layers = layers
        self.signature: list[frozenset[str]] | None = None
        self.outputs: list[dict[int, Any]] = [{} for _ in range(n_batches)]
        self.layers_run = 0
        self.layers_skipped = 0

    def first_changed(self, signature: list[frozenset[str]]) -> int:
        if self.signature is None:
            return 0
        for k, (old, new) in enumerate(zip(self.signature, signature, strict=True)):
            if old != new:
                return k
        return len(signature)

    @contextlib.contextmanager
    def run(self, batch: int, start: int) -> Iterator[None]:
        """Skip layers ``< start`` (stored outputs) and record the outputs of the others for ``batch``."""
        stored = self.outputs[batch]
        handles = []

        def record(k: int):
            def hook(module, args, output):
                stored[k] = output
            return hook

        try:
            for k, layer in enumerate(self.layers):
                if k < start:
                    layer.forward = (lambda out: (lambda *a, **kw: out))(stored[k])
                else:
                    handles.append(layer.register_forward_hook(record(k)))
            yield
        finally:
            for k, layer in enumerate(self.layers):
                if k < start:
                    del layer.forward
            for h in handles:
                h.remove()
        self.layers_run += len(self.layers) - start
        self.layers_skipped += start


class CoalitionValue:
    """``v(S)`` for a coalition of player indices (the intact players), memoised by coalition.

    ``evaluations`` counts the distinct coalitions evaluated: each costs one pass over the calibration
    blocks, the unit in which Shapley budgets are given. ``reuse_prefix`` (default) skips the layers an
    evaluation shares with the previous one (see :class:`_PrefixReuse`); it changes cost, not values.
    """

    def __init__(self, model: nn.Module, batches: Iterable, players: Sequence[Player], *, ablation: str,
                 sparsifier: Sparsifier | None, sitemap: SiteMap, value: str = "neg_nll",
                 reuse_prefix: bool = True):
        if value not in VALUES:
            raise ConfigError(f"value must be one of {VALUES}, got '{value}'")
        self.model, self.players, self.ablation = model, list(players), ablation
        self.sparsifier, self.sitemap, self.value = sparsifier, sitemap, value
        self.batches = [b.cpu() for b in iter_input_ids(batches)]
        if not self.batches:
            raise ConfigError("importance needs at least one calibration block")
        if ablation == "sparsify" and sparsifier is None:
            raise ConfigError("ablation 'sparsify' needs a sparsifier; pass one or use ablation='remove'")
        self.cache: dict[frozenset[int], float] = {}
        self.nlls: dict[frozenset[int], float] = {}
        self.tokens = 0
        self.prefix = _PrefixReuse(sitemap.layers, len(self.batches)) if reuse_prefix else None

    @property
    def n(self) -> int:
        return len(self.players)

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def _signature(self, off: Sequence[Player]) -> list[frozenset[str]]:
        return [frozenset(p.name for p in off if p.layer <= k) for k in range(self.sitemap.n_layers)]

    def _evaluate(self, off: list[Player]) -> float:
        if self.prefix is None:
            with ablated(self.model, off, ablation=self.ablation, sparsifier=self.sparsifier, sitemap=self.sitemap):
                nll, self.tokens = mean_nll(self.model, self.batches)
            return nll
        from .evaluate import block_nlls

        signature = self._signature(off)
        start = self.prefix.first_changed(signature)
        active = [p for p in off if p.layer >= start]  # ablations inside skipped layers are baked in
        sums, counts = [], []
        with ablated(self.model, active, ablation=self.ablation, sparsifier=self.sparsifier, sitemap=self.sitemap):
            for b, ids in enumerate(self.batches):
                with self.prefix.run(b, start):
                    s, c = block_nlls(self.model, [ids], progress=False)
                sums += s
                counts += c
        self.prefix.signature = signature
        self.tokens = sum(counts)
        return sum(sums) / max(self.tokens, 1)

    def nll(self, coalition: Iterable[int]) -> float:
        key = frozenset(coalition)
        if key not in self.nlls:
            off = [p for i, p in enumerate(self.players) if i not in key]
            was_training = self.model.training
            self.model.eval()
            try:
                self.nlls[key] = self._evaluate(off)
            except BaseException:
                if self.prefix is not None:  # an interrupted pass leaves partial outputs: start afresh
                    self.prefix.signature = None
                raise
            finally:
                self.model.train(was_training)
            nll = self.nlls[key]
            self.cache[key] = -nll if self.value == "neg_nll" else -_exp(nll)
        return self.nlls[key]

    def __call__(self, coalition: Iterable[int]) -> float:
        key = frozenset(coalition)
        if key not in self.cache:
            self.nll(key)
        return self.cache[key]


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


# --- Shapley estimators (pure functions of a value function over player indices) ----------------------

@dataclass
class ShapleyEstimate:
    """Shapley values per player index; ``std_errors`` for the Monte-Carlo estimator (0 where exact)."""

    values: list[float]
    std_errors: list[float]
    evaluations: int
    samples: list[int] = field(default_factory=list)
    estimator: str = "exact"
    detail: dict[str, Any] = field(default_factory=dict)


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: off when ``progress`` is False, else automatic (quiet when not on a terminal)."""
    return True if progress is False else None


def _count(v: Callable) -> Callable[[], int]:
    """How many distinct evaluations ``v`` has made (``CoalitionValue`` and ``CountingValue`` count them)."""
    if not hasattr(v, "evaluations"):
        raise TypeError("the value function must count its evaluations; wrap a plain function in CountingValue")
    return lambda: int(v.evaluations)


class CountingValue:
    """Memoise a plain ``v(frozenset) -> float`` and count distinct evaluations (tests, synthetic games)."""

    def __init__(self, fn: Callable[[frozenset[int]], float]):
        self.fn, self.cache = fn, {}

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def __call__(self, coalition: Iterable[int]) -> float:
        key = frozenset(coalition)
        if key not in self.cache:
            self.cache[key] = float(self.fn(key))
        return self.cache[key]


def exact_shapley(v: Callable, n: int, *, progress: bool | None = None) -> ShapleyEstimate:
    """Shapley values from all ``2^n`` coalitions: ``phi_i = sum_S |S|!(n-|S|-1)!/n! (v(S+i) - v(S))``."""
    if n > MAX_EXACT_PLAYERS:
        raise ConfigError(f"exact Shapley needs 2^{n} evaluations; use it for at most {MAX_EXACT_PLAYERS} "
                          f"players, or estimator='permutation' / 'proximity'")
    count = _count(v)
    weight = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    values = {}
    for mask in tqdm(range(1 << n), desc="exact Shapley", disable=_quiet(progress), leave=False):
        values[mask] = v(frozenset(i for i in range(n) if mask >> i & 1))
    phi = [0.0] * n
    for mask, value in values.items():
        size = bin(mask).count("1")
        for i in range(n):
            if not mask >> i & 1:
                phi[i] += weight[size] * (values[mask | 1 << i] - value)
    return ShapleyEstimate(phi, [0.0] * n, count(), [1 << (n - 1)] * n, "exact")


def check_budget(budget: Any, n: int) -> int:
    """A permutation budget (model evaluations) large enough for one full permutation of ``n`` players."""
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ConfigError(f"Shapley budget must be an integer number of model evaluations, got {budget!r}")
    if budget < n + 1:
        raise ConfigError(f"Shapley budget of {budget} evaluations is too small: one permutation of {n} players "
                          f"needs {n + 1}; give a budget >= {n + 1} (about 10x that for useful error bars)")
    return budget


def permutation_shapley(v: Callable, n: int, budget: int, *, seed: int = 0, max_permutations: int | None = None,
                        progress: bool | None = None) -> ShapleyEstimate:
    """Monte-Carlo Shapley: average marginal contributions along random player orders.

    Whole permutations only (a truncated walk would over-sample small coalitions). A new permutation
    starts only if its worst-case cost (``n - 1`` new evaluations; ``n + 1`` for the first) still fits in
    ``budget``; memoised coalitions cost nothing, so small games need fewer evaluations per permutation.
    The standard error per player is the sample standard deviation of its marginals over sqrt(#samples).
    ``max_permutations`` caps the walks (default ``budget``: small games reuse memoised coalitions and
    would otherwise never exhaust the budget).
    """
    budget = check_budget(budget, n)
    count = _count(v)
    rng = random.Random(seed)
    marginals: list[list[float]] = [[] for _ in range(n)]
    full = v(frozenset(range(n)))
    empty = v(frozenset())
    bar = tqdm(total=budget, desc="Shapley (permutations)", disable=_quiet(progress), leave=False)
    permutations = 0
    cap = budget if max_permutations is None else max_permutations
    while count() + (n - 1) <= budget and permutations < cap:
        order = list(range(n))
        rng.shuffle(order)
        coalition: set[int] = set()
        previous = empty
        for i in order:
            coalition.add(i)
            value = full if len(coalition) == n else v(frozenset(coalition))
            marginals[i].append(value - previous)
            previous = value
        permutations += 1
        bar.update(count() - bar.n)
    bar.close()
    means = [sum(m) / len(m) for m in marginals]
    ses = [_std_error(m) for m in marginals]
    return ShapleyEstimate(means, ses, count(), [len(m) for m in marginals], "permutation",
                           {"permutations": permutations, "budget": budget, "seed": seed})


def _std_error(samples: list[float]) -> float:
    k = len(samples)
    if k < 2:
        return math.inf
    mean = sum(samples) / k
    var = sum((x - mean) ** 2 for x in samples) / (k - 1)
    return math.sqrt(var / k)


def proximity_shapley(v: Callable, n: int, level: int = 2, *, progress: bool | None = None) -> ShapleyEstimate:
    """Shapley restricted to coalitions near the full model (the cornerstone-layer paper's estimator).

    Exact Shapley averages, over coalition sizes ``s = 0..n-1`` with equal weight, the mean marginal
    ``v(S+i) - v(S)`` over coalitions ``S`` of size ``s``. Here only the sizes ``s >= n - level`` enter
    (``S + i`` misses at most ``level - 1`` other players), each size still weighted equally, every
    coalition of those sizes enumerated. ``level = n`` is exact; ``level = 1`` is leave-one-out
    ``v(N) - v(N - i)``. Cost: ``sum_{j <= level} C(n, j)`` evaluations.
    """
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= n:
        raise ConfigError(f"proximity level must be an integer in [1, {n}] (players missing), got {level!r}")
    count = _count(v)
    total = sum(math.comb(n, j) for j in range(level + 1))
    bar = tqdm(total=total, desc=f"Shapley (proximity, level {level})", disable=_quiet(progress),
               leave=False)
    phi = [0.0] * n
    everyone = frozenset(range(n))
    for i in range(n):
        others = [j for j in range(n) if j != i]
        per_size = []
        for r in range(level):  # r other players missing besides i
            diffs = []
            for missing in itertools.combinations(others, r):
                s = everyone - {i} - set(missing)
                diffs.append(v(s | {i}) - v(s))
            per_size.append(sum(diffs) / len(diffs))
            bar.update(count() - bar.n)
        phi[i] = sum(per_size) / len(per_size)
    bar.close()
    return ShapleyEstimate(phi, [0.0] * n, count(), [], "proximity", {"level": level})


# --- results ---------------------------------------------------------------------------------------

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


def _setup(model, batches, sparsifier, sites, players, ablation, value="neg_nll", blocks=None):
    batches = _first_blocks(batches, blocks)
    sitemap = SiteMap(model)
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
                blocks: int | None = None, progress: bool | None = None) -> ImportanceResult:
    """Relative PPL increase ``PPL(only player ablated) / PPL(nothing ablated) - 1`` per player.

    ``blocks``: use only the first that many calibration blocks (all by default).
    """
    start = time.perf_counter()
    v, sparse = _setup(model, batches, sparsifier, sites, players, ablation, blocks=blocks)
    base, nll = _single_ablations(v, progress)
    scores = {p: _exp(x - base) - 1.0 for p, x in nll.items()}
    meta = {"protocol": _protocol(v, sparsifier, sparse), "base_nll": base, "base_ppl": _exp(base),
            "ppl": {p: _exp(x) for p, x in nll.items()}, "score": "relative PPL increase"}
    return ImportanceResult("sensitivity", scores, None, None, v.evaluations, time.perf_counter() - start, meta)


def cornerstone(model: nn.Module, batches: Iterable, sparsifier: Sparsifier | None = None,
                sites: str | Iterable[str] | None = None, *, threshold: float = 0.5, players: str = "layers",
                blocks: int | None = None, progress: bool | None = None) -> ImportanceResult:
    """Layers whose removal alone raises PPL by more than ``threshold`` (relative; 0.5 = +50%).

    Scores are the relative PPL increase on removal; ``selected`` lists the cornerstone players.
    Sparsifier and sites are not used (removal is not sparsification) and may be omitted.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ConfigError(f"cornerstone threshold must be a relative PPL increase >= 0 (0.5 = +50%), got {threshold!r}")
    start = time.perf_counter()
    v, _ = _setup(model, batches, None, None, players, "remove", blocks=blocks)
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
            value: str = "neg_nll", blocks: int | None = None, progress: bool | None = None) -> ImportanceResult:
    """Shapley values of the players for ``v(S) = -NLL`` (or ``-PPL``) with the players outside ``S`` ablated.

    ``budget`` (permutation estimator): model evaluations; default ``10 * (n + 1)``. ``level``: proximity
    estimator's maximum number of missing players. Efficiency holds: the values sum to
    ``v(all intact) - v(all ablated)`` for the exact and permutation estimators.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {ESTIMATORS}, got '{estimator}'")
    start = time.perf_counter()
    v, sparse = _setup(model, batches, sparsifier, sites, players, ablation, value, blocks)
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


# --- caching -----------------------------------------------------------------------------------------

def hash_batches(batches: Iterable) -> str:
    """A short hash of the token ids (shapes and values) of the calibration blocks."""
    h = hashlib.sha256()
    for ids in iter_input_ids(batches):
        ids = ids.detach().to("cpu", torch.int64).contiguous()
        h.update(repr(tuple(ids.shape)).encode())
        h.update(ids.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}  # keep model order; keys sort in cache_key
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def cache_key(*, fingerprint: str, data_hash: str, method: str, options: Mapping[str, Any],
              sparsifier: Sparsifier | None, sites: Sequence[str]) -> str:
    """The cache key of one importance computation (a hex digest over everything that changes the result)."""
    payload = {
        "version": CACHE_VERSION, "fingerprint": fingerprint, "data": data_hash, "method": method,
        "options": _jsonable({k: v for k, v in options.items() if k != "progress"}),
        "sparsifier": _jsonable(sparsifier.state_dict()) if sparsifier is not None else None,
        "sites": list(sites),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _with_defaults(fn: Callable, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` completed with the method's keyword defaults, so that spelling out a default option
    and leaving it out give the same cache key."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(options)
    defaults = {p.name: p.default for p in params
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}
    return {**defaults, **options}


def default_cache_dir() -> Path:
    from .models import user_cache_dir

    return user_cache_dir() / "importance"


def compute_importance(method: str, model: nn.Module, batches: Iterable, sparsifier: Sparsifier | None = None,
                       sites: str | Iterable[str] | None = "down_proj", *, toolkit=None,
                       cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                       **options: Any) -> ImportanceResult:
    """Run importance method ``method`` (a plugin) with an on-disk cache.

    The cache key covers the model fingerprint, a hash of the token blocks, the method, its options, the
    sparsifier's state (thresholds included) and the resolved sites. ``meta["cache"]`` says ``"hit"`` or
    ``"miss"``; a hit keeps the wall time of the run that computed it.
    """
    from .models import model_fingerprint

    if toolkit is None:
        from .plugins import default_toolkit

        toolkit = default_toolkit()
    entry = toolkit.importance_methods.entry(method)
    batches = list(iter_input_ids(batches))
    resolved = SiteMap(model).resolve(sites) if sites else []
    path = None
    if use_cache:
        key = cache_key(fingerprint=model_fingerprint(model), data_hash=hash_batches(batches), method=method,
                        options=_with_defaults(entry.factory, options), sparsifier=sparsifier, sites=resolved)
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"{method}-{key[:24]}.json"
        if path.is_file():
            try:
                result = ImportanceResult.from_dict(json.loads(path.read_text()))
                result.meta["cache"] = "hit"
                return result
            except (OSError, ValueError, TypeError):
                pass  # a damaged cache entry is recomputed and overwritten
    result = entry.factory(model, batches, sparsifier, resolved, **options)
    if not isinstance(result, ImportanceResult):
        raise PluginError(f"importance method '{method}' (plugin '{entry.plugin}') returned "
                          f"{type(result).__name__}, not an ImportanceResult")
    result.meta["cache"] = "miss" if use_cache else "off"
    if path is not None:
        _atomic_write_json(path, result.to_dict())
    return result


def _atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=1))
