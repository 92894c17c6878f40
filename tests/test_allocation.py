"""Allocation strategies: static and data-driven plans, parameter accounting, plan validation, override files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spon_toolkit.allocation import AllocationContext, allocate, layer_count, load_overrides
from spon_toolkit.errors import ConfigError, PluginError, SponError
from spon_toolkit.hookspecs import hookimpl
from spon_toolkit.sites import MODULES

# SmolLM2-135M's shapes (in, out): hidden 576, MLP 1536, 3 KV heads of 64.
SMOLLM2_SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
                  "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def smollm2_context(sparse_modules=("down_proj",), n_layers=30, **kwargs) -> AllocationContext:
    shapes = {f"layers.{i}.{m}": SMOLLM2_SHAPES[m] for i in range(n_layers) for m in MODULES}
    sparse = tuple(f"layers.{i}.{m}" for i in range(n_layers) for m in MODULES if m in sparse_modules)
    return AllocationContext(n_layers, shapes, sparse, **kwargs)


@pytest.fixture
def toolkit(spon_make_toolkit):
    return spon_make_toolkit()


def layers(plan):
    return plan.biased_layers


# --- rounding ---------------------------------------------------------------------------------------

def test_layer_fraction_rounding_is_half_up():
    assert [layer_count(f, 30) for f in (0.25, 0.5, 0.75)] == [8, 15, 23]
    assert [layer_count(f, 32) for f in (0.25, 0.5, 0.75)] == [8, 16, 24]
    assert layer_count(0.25, 2) == 1 and layer_count(0.01, 30) == 1 and layer_count(0.0, 30) == 0


@given(st.floats(0, 1), st.floats(0, 1), st.integers(1, 200))
def test_layer_count_is_monotone_and_bounded(f1, f2, n):
    lo, hi = sorted((f1, f2))
    assert 0 <= layer_count(lo, n) <= layer_count(hi, n) <= n
    assert (layer_count(lo, n) == 0) == (lo == 0)
    assert abs(layer_count(hi, n) - hi * n) <= 1


# --- static strategies ---------------------------------------------------------------------------------

def test_static_layer_masks(toolkit):
    ctx = smollm2_context()
    assert allocate(toolkit, "BASELINE-TEAL", ctx).biased_sites == ()
    assert layers(allocate(toolkit, "UNIF-ALL", ctx)) == list(range(30))
    assert layers(allocate(toolkit, "TOP-25", ctx)) == list(range(8))
    assert layers(allocate(toolkit, "TOP-50", ctx)) == list(range(15))
    assert layers(allocate(toolkit, "TOP-75", ctx)) == list(range(23))
    assert layers(allocate(toolkit, "BOTTOM-50", ctx)) == list(range(15, 30))
    assert layers(allocate(toolkit, "TOP", ctx, fraction=0.1)) == [0, 1, 2]
    plan = allocate(toolkit, "TOP-50", ctx)
    assert plan.sparse_sites == ctx.sparse_sites and all(s.endswith("down_proj") for s in plan.biased_sites)
    assert plan.ratio == pytest.approx(0.5) and plan.n_params == 15 * 576


def test_parameter_accounting_is_honest(toolkit):
    """An o_proj bias has hidden-size entries like a down_proj bias: ATTN-ONLY is 1.0x UNIF-ALL (all down_proj)."""
    ctx = smollm2_context()
    unif = allocate(toolkit, "UNIF-ALL", ctx)
    assert unif.n_params == 30 * 576 and unif.ratio == 1.0
    attn = allocate(toolkit, "ATTN-ONLY", ctx)
    assert [s.split(".")[-1] for s in attn.biased_sites] == ["o_proj"] * 30
    assert attn.n_params == unif.n_params and attn.ratio == pytest.approx(1.0)
    assert allocate(toolkit, "HYBRID-OD", ctx).ratio == pytest.approx(2.0)
    qd = allocate(toolkit, "HYBRID-QD", ctx)
    assert qd.ratio == pytest.approx(2.0) and {s.split(".")[-1] for s in qd.biased_sites} == {"q_proj", "down_proj"}
    # input-space alpha: a down_proj alpha has 1536 entries, an o_proj alpha 576
    ictx = smollm2_context(parametrisation="input")
    assert allocate(toolkit, "ATTN-ONLY", ictx).ratio == pytest.approx(576 / 1536)
    # all 7 modules sparsified: per-layer cost 576+192+192+576+1536+1536+576
    actx = smollm2_context(sparse_modules=MODULES)
    assert actx.unif_all_params == 30 * 5184


def test_sparsified_and_biased_sites_are_separate_choices(toolkit):
    ctx = smollm2_context()
    attn = allocate(toolkit, "ATTN-ONLY", ctx)  # biases on o_proj, down_proj stays sparsified
    assert attn.sparse_sites == ctx.sparse_sites and len(attn.unsparsified_biased_sites) == 30
    assert any("not sparsified" in n for n in attn.notes)
    seed_like = allocate(toolkit, "ATTN-ONLY", ctx, sparsify="biased")  # the seed: sparsify o_proj only
    assert seed_like.sparse_sites == seed_like.biased_sites and all(s.endswith("o_proj") for s in seed_like.sparse_sites)
    assert any("changes what is sparsified" in n for n in seed_like.notes)
    # the module-matched baseline: TEAL on o_proj only, no biases
    matched = allocate(toolkit, "BASELINE-TEAL", smollm2_context(sparse_modules=("o_proj",)))
    assert matched.sparse_sites == seed_like.sparse_sites and matched.biased_sites == ()
    # restricting modules: only down_proj of HYBRID-OD
    assert allocate(toolkit, "HYBRID-OD", ctx, modules=["down_proj"]).biased_sites == ctx.sparse_sites


def test_adaptive_capacity_is_a_parameter_budget(toolkit):
    ctx = smollm2_context()
    assert allocate(toolkit, "ADAPTIVE", ctx, capacity=1.0).biased_sites == ctx.sparse_sites
    assert allocate(toolkit, "ADAPTIVE", ctx, capacity=0.0).biased_sites == ()
    # without scores: the seed's prior, earliest layers first
    assert layers(allocate(toolkit, "ADAPTIVE", ctx, capacity=0.5)) == list(range(15))
    # with scores the budget goes to the most important layers
    scores = {f"layers.{i}": float(i % 7) for i in range(30)}
    sctx = smollm2_context(importance={"sensitivity": scores})
    plan = allocate(toolkit, "ADAPTIVE", sctx, capacity=0.2)
    assert plan.n_params <= 0.2 * sctx.unif_all_params and len(plan.biased_sites) == 6
    assert all(scores[f"layers.{i}"] >= 5 for i in plan.biased_layers)
    # mixed site sizes: the budget is in parameters, never exceeded
    mixed = smollm2_context(sparse_modules=MODULES)
    for capacity in (0.1, 0.33, 0.75):
        p = allocate(toolkit, "ADAPTIVE", mixed, capacity=capacity)
        assert capacity * mixed.unif_all_params - 1536 < p.n_params <= capacity * mixed.unif_all_params


# --- data-driven strategies ----------------------------------------------------------------------------

def test_data_driven_allocations_follow_the_scores(toolkit):
    sens = {f"layers.{i}": float(v) for i, v in enumerate([5, 1, 4, 2, 3, 0])}
    shap = {f"layers.{i}": float(v) for i, v in enumerate([0.1, 0.6, 0.2, 0.5, 0.3, 0.4])}
    corner = {f"layers.{i}": float(v) for i, v in enumerate([9.0, 0.2, 0.51, 0.5, 0.0, 0.7])}
    ctx = smollm2_context(n_layers=6, importance={"sensitivity": sens, "shapley": shap, "cornerstone": corner})
    assert layers(allocate(toolkit, "CRITICAL-ONLY", ctx)) == [0, 2, 4]  # median 2.5
    assert layers(allocate(toolkit, "SHAPLEY-GUIDED", ctx)) == [1, 3, 5]
    assert layers(allocate(toolkit, "SHAPLEY-GUIDED", ctx, fraction=1 / 6)) == [1]
    assert layers(allocate(toolkit, "CORNERSTONE", ctx)) == [0, 2, 5]  # > 50%
    assert layers(allocate(toolkit, "CORNERSTONE", ctx, threshold=1.0)) == [0]
    assert layers(allocate(toolkit, "CRITICAL-ONLY", ctx, layers=[3])) == [3]  # explicit override


def test_sublayer_scores_are_summed_per_layer(toolkit):
    scores = {"layers.0.attn": 1.0, "layers.0.mlp": 0.0, "layers.1.attn": 0.2, "layers.1.mlp": 0.2,
              "layers.2.attn": 0.0, "layers.2.mlp": 3.0, "layers.3.attn": 0.0, "layers.3.mlp": 0.0}
    ctx = smollm2_context(n_layers=4, importance={"sensitivity": scores})
    assert layers(allocate(toolkit, "CRITICAL-ONLY", ctx)) == [0, 2]
    assert ctx.site_score("sensitivity", "layers.2.down_proj") == 3.0


def test_data_driven_without_scores_says_how_to_get_them(toolkit):
    with pytest.raises(ConfigError, match=r"spon importance --method shapley"):
        allocate(toolkit, "SHAPLEY-GUIDED", smollm2_context())


# --- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options", [("TOP", {"fraction": 1.5}), ("TOP", {"fraction": -0.1}),
                                          ("ADAPTIVE", {"capacity": 2.0}), ("SHAPLEY-GUIDED", {"fraction": 7})])
def test_fractions_outside_unit_interval(toolkit, name, options):
    ctx = smollm2_context(importance={"shapley": {f"layers.{i}": 0.0 for i in range(30)}})
    with pytest.raises(ConfigError) as info:
        allocate(toolkit, name, ctx, **options)
    msg = str(info.value)
    assert "\n" not in msg and f"allocation '{name}'" in msg and "[0, 1]" in msg


def test_unknown_option_and_unknown_allocation(toolkit):
    with pytest.raises(ConfigError, match=r"allocation 'TOP-50'.*fraction"):
        allocate(toolkit, "TOP-50", smollm2_context(), fraction=0.3)
    with pytest.raises(SponError, match=r"unknown allocation strategy 'TOP-05'.*Did you mean"):
        allocate(toolkit, "TOP-05", smollm2_context())


class BadPlugins:
    """Strategies that return wrong plans; the toolkit must name them and their plugin."""

    @hookimpl
    def spon_register_allocations(self, register):
        register("MISSING", lambda ctx: ["layers.0.down_proj", "layers.99.down_proj"])
        register("TWICE", lambda ctx: ["layers.1.down_proj", "layers.1.down_proj"])
        register("STRING", lambda ctx: "layers.0.down_proj")
        register("NOT-A-NAME", lambda ctx: [3])
        register("BAD-KEYS", lambda ctx: {"biased": []})
        register("CRASH", lambda ctx: 1 / 0)


@pytest.mark.parametrize("name,pattern", [
    ("MISSING", r"returned biased site 'layers.99.down_proj', which this model does not have"),
    ("TWICE", r"returned biased site 'layers.1.down_proj' twice"),
    ("STRING", r"returned str for its biased sites"),
    ("NOT-A-NAME", r"returned 3 among its biased sites"),
    ("BAD-KEYS", r"'biased_sites'"),
    ("CRASH", r"failed: ZeroDivisionError"),
])
def test_wrong_plans_name_the_plugin(spon_make_toolkit, spon_allocation_context, name, pattern):
    toolkit = spon_make_toolkit(BadPlugins())
    with pytest.raises(PluginError, match=pattern) as info:
        allocate(toolkit, name, spon_allocation_context)
    assert f"allocation '{name}' (plugin 'extra-0')" in str(info.value) and "\n" not in str(info.value)


# --- context from a real (tiny) model --------------------------------------------------------------------

def test_context_from_model(spon_make_context, toolkit):
    ctx = spon_make_context(num_layers=4, sparse_sites=["down_proj", "o_proj"])
    assert ctx.n_layers == 4 and len(ctx.sparse_sites) == 8
    assert ctx.bias_params("layers.0.down_proj") == 64 and ctx.unif_all_params == 8 * 64
    plan = allocate(toolkit, "TOP-50", ctx, modules=["o_proj"])
    assert plan.biased_sites == ("layers.0.o_proj", "layers.1.o_proj")
    assert plan.as_dict()["ratio_vs_unif_all"] == pytest.approx(0.25)


# --- override files -----------------------------------------------------------------------------------

def test_override_file_round_trip(tmp_path, toolkit):
    path = tmp_path / "overrides.yaml"
    path.write_text("method: sensitivity\nn_layers: 6\nallocations:\n  CRITICAL-ONLY: {layers: [4, 1]}\n"
                    "  CORNERSTONE: [0]\nscores:\n  sensitivity: {layers.0: 0.5, layers.1: 0.1}\n")
    ov = load_overrides(path, n_layers=6)
    assert ov.options_for("CRITICAL-ONLY") == {"layers": [1, 4]} and ov.options_for("CORNERSTONE") == {"layers": [0]}
    assert ov.options_for("UNIF-ALL") == {} and ov.scores["sensitivity"]["layers.0"] == 0.5
    ctx = smollm2_context(n_layers=6)
    assert layers(allocate(toolkit, "CRITICAL-ONLY", ctx, **ov.options_for("CRITICAL-ONLY"))) == [1, 4]


@pytest.mark.parametrize("content,pattern", [
    ("allocations:\n  CRITICAL-ONLY: [1, 31]\n", r"allocations.CRITICAL-ONLY names layer 31, which the model lacks"),
    ("n_layers: 32\nallocations: {}\n", r"written for a model with 32 layers; this model has 30"),
    ("allocations:\n  CRITICAL-ONLY: {layers: [1, 1]}\n", r"names a layer twice"),
    ("allocations:\n  CRITICAL-ONLY: {layers: one}\n", r"must be a list of layer indices"),
    ("allocations: {}\nscores:\n  shapley: {layers.40: 1.0}\n", r"scores.shapley names layer 40"),
    ("just text\n", r"needs a mapping 'allocations"),
    ("allocations: [\n", r"cannot be read"),
])
def test_bad_override_files_name_the_file(tmp_path, content, pattern):
    path = tmp_path / "ov.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_overrides(path, n_layers=30)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_overrides(tmp_path / "missing.yaml")


# --- the sweep reads override files ----------------------------------------------------------------------

SWEEP_SPEC = """
model: tiny-random
data: {calibration_source: calib.txt, eval_source: eval.txt, block_size: 32, calibration_blocks: 2,
       eval_blocks: 2, batch_size: 2}
sites: down_proj
sparsity: [0.5]
allocations: [CRITICAL-ONLY]
trainer: {name: kl, options: {epochs: 1, progress: false}}
data_driven_overrides: OVERRIDES
report: false
"""


@pytest.mark.parametrize("layers,error", [([1], None), ([5], "names layer 5, which the model lacks")])
def test_sweep_takes_layers_from_the_override_file(tmp_path, toolkit, layers, error):
    from spon_toolkit.runner import ExperimentRunner, StageError

    (tmp_path / "calib.txt").write_text(" ".join(["the nation and the people of the state"] * 200))
    (tmp_path / "eval.txt").write_text(" ".join(["a year of the congress and the people"] * 100))
    (tmp_path / "ov.yaml").write_text(f"allocations:\n  CRITICAL-ONLY: {{layers: {layers}}}\n")
    spec = tmp_path / "exp_ov.yaml"
    spec.write_text(SWEEP_SPEC.replace("OVERRIDES", "ov.yaml"))
    runner = ExperimentRunner.from_path(spec, toolkit=toolkit, output_dir=tmp_path / "out", progress=False)
    item = runner.experiment.items()[0]
    if error is None:
        record = runner.run_item(item).record
        assert record["plan"]["biased_layers"] == [1] and record["n_biased_sites"] == 1
    else:
        with pytest.raises(StageError, match=error) as info:
            runner.run_item(item)
        assert "ov.yaml" in str(info.value) and "'allocate'" in str(info.value)
