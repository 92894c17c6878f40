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

Layout: :mod:`.players` (players, ablation, coalition value), :mod:`.shapley` (pure estimators),
:mod:`.methods` (the built-in methods), :mod:`.cache` (registry call and disk cache).
"""

from .cache import CACHE_VERSION, cache_key, compute_importance, default_cache_dir, hash_batches
from .methods import ImportanceResult, cornerstone, sensitivity, shapley
from .players import (
    ABLATIONS,
    PLAYER_KINDS,
    VALUES,
    CoalitionValue,
    Player,
    ablated,
    make_players,
    mean_nll,
    removed,
    removed_layers,
)
from .shapley import (
    ESTIMATORS,
    MAX_EXACT_PLAYERS,
    CountingValue,
    ShapleyEstimate,
    check_budget,
    exact_shapley,
    permutation_shapley,
    proximity_shapley,
)

__all__ = [
    "ABLATIONS",
    "CoalitionValue",
    "PLAYER_KINDS",
    "Player",
    "VALUES",
    "ablated",
    "make_players",
    "mean_nll",
    "removed",
    "removed_layers",
    "CountingValue",
    "ESTIMATORS",
    "MAX_EXACT_PLAYERS",
    "ShapleyEstimate",
    "check_budget",
    "exact_shapley",
    "permutation_shapley",
    "proximity_shapley",
    "ImportanceResult",
    "cornerstone",
    "sensitivity",
    "shapley",
    "CACHE_VERSION",
    "cache_key",
    "compute_importance",
    "default_cache_dir",
    "hash_batches",
]
