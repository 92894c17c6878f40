"""Seed scope: ``training`` seeds change only batch order; ``data`` seeds also draw their own training and
calibration samples, with the eval blocks fixed so items stay paired."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_runner import write_spec

from spon_toolkit.errors import ConfigError
from spon_toolkit.expdata import data_sample_seeds
from spon_toolkit.experiment import load_experiment
from spon_toolkit.plugins import Toolkit
from spon_toolkit.runner import ExperimentRunner, run_experiment


@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_data_seeds_draw_distinct_samples_and_seed_zero_matches_the_training_scope(a, b):
    assert data_sample_seeds(a, "training") == (0, 1)
    assert data_sample_seeds(0, "data") == (0, 1)
    seeds_a, seeds_b = data_sample_seeds(a, "data"), data_sample_seeds(b, "data")
    assert len(set(seeds_a)) == 2 and (seeds_a == seeds_b) == (a == b)
    assert not set(seeds_a) & set(seeds_b) or a == b


def test_unknown_scope_is_a_config_error():
    with pytest.raises(ConfigError, match="seed scope must be one of training, data"):
        data_sample_seeds(0, "everything")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    toolkit = Toolkit(load_entrypoints=False)
    out = {}
    for scope in ("training", "data"):
        tmp = tmp_path_factory.mktemp(scope)
        replace = {"sparsifier: magnitude": "sparsifier: threshold", "allocations: [BASELINE-TEAL, UNIF-ALL, TOP-50]":
                   f"allocations: [BASELINE-TEAL, UNIF-ALL]\nseed_scope: {scope}"}
        exp = load_experiment(write_spec(tmp, expect="  []", replace=replace), toolkit)
        sweep = run_experiment(exp, toolkit=toolkit, output_dir=tmp / "out", progress=False)
        assert not sweep.errors
        out[scope] = (exp, sweep)
    return out


def test_data_scope_gives_each_seed_its_own_samples_and_keeps_eval_blocks_fixed(sweeps):
    exp, sweep = sweeps["data"]
    runner: ExperimentRunner = sweep.runner
    d0, d1 = (runner._item_data(exp.item("UNIF-ALL", 0.5, s)) for s in (0, 1))
    assert d0.train.protocol() != d1.train.protocol() and d0.calibration.protocol() != d1.calibration.protocol()
    assert d0.eval is d1.eval
    recs = {(o.record["config"], o.record["seed"]): o.record for o in sweep.outcomes}
    # the threshold sparsifier is calibrated on each seed's calibration sample: TEAL differs by seed,
    # the dense model's per-block NLLs (fixed eval blocks) do not
    assert recs["BASELINE-TEAL", 0]["sparse_ppl"] != recs["BASELINE-TEAL", 1]["sparse_ppl"]
    assert recs["UNIF-ALL", 0]["block_nll"]["dense"] == recs["UNIF-ALL", 1]["block_nll"]["dense"]
    stats = json.loads((runner.manager.run_dir.parents[1] / "analysis/statistics.json").read_text())
    assert stats["seed_scope"] == "data" and "training and calibration samples" in stats["seed_scope_meaning"]["data"]


def test_training_scope_shares_samples_and_seed_zero_is_the_same_under_both_scopes(sweeps):
    exp, sweep = sweeps["training"]
    runner = sweep.runner
    d0, d1 = (runner._item_data(exp.item("UNIF-ALL", 0.5, s)) for s in (0, 1))
    assert d0 is d1
    recs = {(o.record["config"], o.record["seed"]): o.record for o in sweep.outcomes}
    assert recs["BASELINE-TEAL", 0]["sparse_ppl"] == recs["BASELINE-TEAL", 1]["sparse_ppl"]
    data_recs = {(o.record["config"], o.record["seed"]): o.record for o in sweeps["data"][1].outcomes}
    for key in (("BASELINE-TEAL", 0), ("UNIF-ALL", 0)):
        assert recs[key]["ppl"] == data_recs[key]["ppl"]
    stats = json.loads((runner.manager.run_dir.parents[1] / "analysis/statistics.json").read_text())
    assert stats["seed_scope"] == "training"


def test_the_training_scope_leaves_item_and_spec_hashes_as_they_were(tmp_path):
    toolkit = Toolkit(load_entrypoints=False)
    plain = load_experiment(write_spec(tmp_path, expect="  []", name="exp_a.yaml"), toolkit)
    explicit = load_experiment(write_spec(tmp_path, expect="  []", name="exp_b.yaml",
                                          replace={"seeds: [0, 1]": "seeds: [0, 1]\nseed_scope: training"}), toolkit)
    data = load_experiment(write_spec(tmp_path, expect="  []", name="exp_c.yaml",
                                      replace={"seeds: [0, 1]": "seeds: [0, 1]\nseed_scope: data"}), toolkit)
    assert plain.spec_hash == explicit.spec_hash != data.spec_hash
    assert plain.items()[0].item_hash == explicit.items()[0].item_hash != data.items()[0].item_hash
