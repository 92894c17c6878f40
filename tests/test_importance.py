"""Layer importance: Shapley estimators on known games, layer removal, sensitivity/cornerstone, the cache."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spon_toolkit.errors import ConfigError
from spon_toolkit.importance import (
    CountingValue,
    compute_importance,
    cornerstone,
    exact_shapley,
    permutation_shapley,
    proximity_shapley,
    removed_layers,
    sensitivity,
    shapley,
)
from spon_toolkit.sparse import SparseModel
from spon_toolkit.sparsifiers import MagnitudeSparsifier
from spon_toolkit.testing.tiny import make_tiny_llama


def table_game(n: int, values: list[float]):
    """A game given by its value on each of the 2^n coalitions (bitmask order)."""
    return CountingValue(lambda s: values[sum(1 << i for i in s)])


games = st.integers(2, 5).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.floats(-10, 10), min_size=1 << n, max_size=1 << n)))


# --- estimators on known games -------------------------------------------------------------------------

def test_additive_game_is_recovered_exactly_by_every_estimator():
    w = [0.5, -1.0, 2.0, 0.25]
    v = CountingValue(lambda s: sum(w[i] for i in s))
    assert exact_shapley(v, 4).values == pytest.approx(w)
    mc = permutation_shapley(CountingValue(v.fn), 4, budget=40, seed=3)
    assert mc.values == pytest.approx(w) and max(mc.std_errors) == pytest.approx(0, abs=1e-12)
    assert proximity_shapley(CountingValue(v.fn), 4, level=1).values == pytest.approx(w)


def test_glove_game_hand_computed():
    # v(S) = 1 if S holds player 0 and at least one of players 1, 2: phi = (2/3, 1/6, 1/6)
    v = CountingValue(lambda s: float(0 in s and bool(s & {1, 2})))
    assert exact_shapley(v, 3).values == pytest.approx([2 / 3, 1 / 6, 1 / 6])


@given(games)
@settings(max_examples=40, deadline=None)
def test_exact_shapley_efficiency_and_symmetry(game):
    n, values = game
    v = table_game(n, values)
    phi = exact_shapley(v, n).values
    assert sum(phi) == pytest.approx(values[-1] - values[0], abs=1e-9)
    assert v.evaluations == 1 << n
    # the proximity estimator at level n is exact Shapley
    assert proximity_shapley(table_game(n, values), n, level=n).values == pytest.approx(phi, abs=1e-9)


@given(games, st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_permutation_estimates_are_efficient(game, seed):
    """Every whole permutation's marginals sum to v(N) - v(empty), so the estimate does too."""
    n, values = game
    est = permutation_shapley(table_game(n, values), n, budget=4 * (n + 1), seed=seed)
    assert sum(est.values) == pytest.approx(values[-1] - values[0], abs=1e-9)
    assert len(set(est.samples)) == 1 and est.detail["permutations"] == est.samples[0]


def test_proximity_level_one_is_leave_one_out():
    values = [float(i * i % 7) for i in range(16)]
    v = table_game(4, values)
    est = proximity_shapley(v, 4, level=1)
    full = values[15]
    assert est.values == pytest.approx([full - values[15 & ~(1 << i)] for i in range(4)])
    assert est.evaluations == 5  # N and the four N - i


def test_permutation_estimator_converges_with_honest_error_bars():
    n = 6
    values = [math.sin(3.0 * m) + bin(m).count("1") ** 1.5 for m in range(1 << n)]
    exact = exact_shapley(table_game(n, values), n).values
    est = permutation_shapley(table_game(n, values), n, budget=10_000, max_permutations=400, seed=0)
    errors = [abs(a - b) for a, b in zip(est.values, exact, strict=True)]
    assert all(e <= 4 * se for e, se in zip(errors, est.std_errors, strict=True))
    few = permutation_shapley(table_game(n, values), n, budget=10_000, max_permutations=4, seed=0)
    assert max(est.std_errors) < max(few.std_errors) / 5


def test_budget_counts_model_evaluations():
    v = CountingValue(lambda s: float(len(s) ** 2))
    est = permutation_shapley(v, 10, budget=50, seed=0)
    assert est.evaluations <= 50 and est.detail["permutations"] >= 4


@pytest.mark.parametrize("budget", [0, 5, -1, 2.5])
def test_bad_budget_is_one_line(budget):
    with pytest.raises(ConfigError, match="Shapley budget") as info:
        permutation_shapley(CountingValue(lambda s: 0.0), 6, budget=budget)
    assert "\n" not in str(info.value)


def test_exact_refuses_large_games_and_bad_levels():
    with pytest.raises(ConfigError, match="at most 16 players"):
        exact_shapley(CountingValue(lambda s: 0.0), 30)
    with pytest.raises(ConfigError, match="proximity level"):
        proximity_shapley(CountingValue(lambda s: 0.0), 4, level=0)


# --- on a tiny model -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model3():
    return make_tiny_llama(seed=0, num_layers=3)


@pytest.fixture(scope="module")
def blocks():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (2, 24), generator=g)]


def nll_of(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_removing_every_layer_leaves_embeddings_then_norm(model3, blocks):
    ids = blocks[0]
    with torch.no_grad():
        dense = model3(input_ids=ids).logits
        with removed_layers(model3, range(3)):
            skipped = model3(input_ids=ids).logits
        after = model3(input_ids=ids).logits
        expected = model3.lm_head(model3.model.norm(model3.model.embed_tokens(ids)))
    torch.testing.assert_close(skipped, expected)
    assert torch.equal(after, dense)  # the hooks are gone


def test_sensitivity_matches_the_sparse_engine(model3, blocks):
    sp = MagnitudeSparsifier(0.8)
    result = sensitivity(model3, blocks, sp, "down_proj")
    base = nll_of(model3, blocks[0])
    assert result.meta["base_ppl"] == pytest.approx(math.exp(base), rel=1e-5)
    for i in range(3):
        with SparseModel(model3, sp, f"layers.{i}.down_proj"):
            nll = nll_of(model3, blocks[0])
        assert result.scores[f"layers.{i}"] == pytest.approx(math.exp(nll - base) - 1, abs=1e-6)
    assert result.evaluations == 4 and result.meta["protocol"]["tokens_scored"] == 2 * 23


def test_sublayer_players(model3, blocks):
    sp = MagnitudeSparsifier(0.8)
    r = sensitivity(model3, blocks, sp, ["down_proj", "o_proj"], players="sublayers")
    assert list(r.scores) == [f"layers.{i}.{p}" for i in range(3) for p in ("attn", "mlp")]
    assert set(r.layer_scores()) == {0, 1, 2}
    only_mlp = sensitivity(model3, blocks, sp, "down_proj", players="sublayers")
    assert list(only_mlp.scores) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]


def test_shapley_on_a_model_is_efficient_and_estimators_agree(model3, blocks):
    sp = MagnitudeSparsifier(0.9)
    exact = shapley(model3, blocks, sp, "down_proj", estimator="exact")
    assert exact.evaluations == 8
    with SparseModel(model3, sp, "down_proj"):
        all_sparse = nll_of(model3, blocks[0])
    assert exact.meta["v_empty"] == pytest.approx(-all_sparse, rel=1e-5)
    assert sum(exact.scores.values()) == pytest.approx(exact.meta["v_full"] - exact.meta["v_empty"], abs=1e-6)
    prox = shapley(model3, blocks, sp, "down_proj", estimator="proximity", level=3)
    assert list(prox.scores.values()) == pytest.approx(list(exact.scores.values()), abs=1e-6)
    mc = shapley(model3, blocks, sp, "down_proj", budget=8, seed=1)
    assert mc.std_errors is not None and mc.evaluations <= 8
    with pytest.raises(ConfigError, match="Shapley budget of 0"):
        shapley(model3, blocks, sp, "down_proj", budget=0)


def test_cornerstone_selects_above_threshold(model3, blocks):
    r = cornerstone(model3, blocks, threshold=0.0)
    assert r.selected == [p for p, s in r.scores.items() if s > 0]
    with removed_layers(model3, [1]):
        nll = nll_of(model3, blocks[0])
    assert r.meta["ppl"]["layers.1"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert cornerstone(model3, blocks, threshold=1e9).selected == []
    with pytest.raises(ConfigError, match="threshold"):
        cornerstone(model3, blocks, threshold=-1)


def test_sparsify_ablation_needs_a_sparsifier(model3, blocks):
    with pytest.raises(ConfigError, match="needs a sparsifier"):
        sensitivity(model3, blocks, None, "down_proj")
    with pytest.raises(ConfigError, match="at least one calibration block"):
        sensitivity(model3, [], MagnitudeSparsifier(0.5), "down_proj")


def test_cache_hits_and_keys(model3, blocks, tmp_path, spon_make_toolkit):
    tk = spon_make_toolkit()
    sp = MagnitudeSparsifier(0.5)
    first = compute_importance("sensitivity", model3, blocks, sp, "down_proj", toolkit=tk, cache_dir=tmp_path)
    again = compute_importance("sensitivity", model3, blocks, sp, "down_proj", toolkit=tk, cache_dir=tmp_path)
    assert (first.meta["cache"], again.meta["cache"]) == ("miss", "hit")
    assert again.scores == pytest.approx(first.scores)
    # other data, options, sparsifier, model weights: other keys
    other = [blocks[0].flip(1)]
    assert compute_importance("sensitivity", model3, other, sp, "down_proj", toolkit=tk,
                              cache_dir=tmp_path).meta["cache"] == "miss"
    assert compute_importance("sensitivity", model3, blocks, MagnitudeSparsifier(0.6), "down_proj", toolkit=tk,
                              cache_dir=tmp_path).meta["cache"] == "miss"
    assert compute_importance("sensitivity", model3, blocks, sp, "down_proj", players="sublayers", toolkit=tk,
                              cache_dir=tmp_path).meta["cache"] == "miss"
    model_b = make_tiny_llama(seed=1, num_layers=3)
    assert compute_importance("sensitivity", model_b, blocks, sp, "down_proj", toolkit=tk,
                              cache_dir=tmp_path).meta["cache"] == "miss"
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 5
    assert not list(itertools.chain(tmp_path.glob("*.tmp"), tmp_path.glob(".*")))


def test_blocks_option_uses_the_first_blocks(model3, blocks):
    sp = MagnitudeSparsifier(0.8)
    first = sensitivity(model3, [blocks[0][:1]], sp, "down_proj")
    limited = sensitivity(model3, blocks, sp, "down_proj", blocks=1)
    assert limited.scores == pytest.approx(first.scores) and limited.meta["protocol"]["blocks"] == 1
    with pytest.raises(ConfigError, match="blocks must be a positive"):
        sensitivity(model3, blocks, sp, "down_proj", blocks=0)
