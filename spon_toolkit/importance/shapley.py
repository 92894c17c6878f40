"""Shapley-value estimators over an abstract value function ``v(coalition)``: exact, permutation sampling
with standard errors, and the proximity estimator. Pure: no model, no torch."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError

ESTIMATORS = ("permutation", "proximity", "exact")


MAX_EXACT_PLAYERS = 16


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


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
