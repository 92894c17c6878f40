"""Results layout, atomic writes, statistics, comparisons and the Pareto frontier on known inputs."""

from __future__ import annotations

import json
import math
import os

import pytest

from spon_toolkit.errors import ConfigError
from spon_toolkit.results import (
    ExperimentManager,
    atomic_write_json,
    check_output_dir,
    compare_to_baseline,
    compute_pareto_frontier,
    load_results,
    summarize,
)


def record(config, s, seed, ppl, params, sparse=20.0, dense=10.0, blocks=None):
    return {
        "id": f"exp_t.yaml::{config}[s={s:g},seed={seed}]", "config": config, "allocation": config,
        "sparsity": s, "seed": seed, "dense_ppl": dense, "sparse_ppl": sparse, "ppl": ppl,
        "damage_recovered": (sparse - ppl) / (sparse - dense), "spon_params": params,
        "n_biased_sites": 0, "n_sparse_sites": 2, "achieved_sparsity": s,
        "block_nll": {"spon": blocks if blocks is not None else [math.log(ppl)] * 3},
        "timings": {"train": 1.0},
    }


def test_summarize_known_values():
    st = summarize([1.0, 2.0, 3.0])
    assert st["mean"] == pytest.approx(2.0) and st["std"] == pytest.approx(1.0)
    # t(0.975, 2) = 4.302653; half-width = 4.302653 * 1 / sqrt(3)
    assert st["ci_high"] - st["mean"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    one = summarize([5.0])
    assert one["mean"] == 5.0 and one["std"] is None and one["ci_low"] is None
    assert summarize([])["mean"] is None


def test_pareto_frontier_known_points():
    pts = [{"c": "A", "spon_params": 0, "ppl": 20.0}, {"c": "B", "spon_params": 100, "ppl": 15.0},
           {"c": "C", "spon_params": 200, "ppl": 16.0}, {"c": "D", "spon_params": 300, "ppl": 12.0},
           {"c": "E", "spon_params": 100, "ppl": 15.5}, {"c": "F", "spon_params": 50, "ppl": float("nan")}]
    assert [p["c"] for p in compute_pareto_frontier(pts)] == ["A", "B", "D"]
    assert compute_pareto_frontier([]) == []


def test_comparisons_paired_over_seeds_and_blocks():
    recs = [record("BASELINE-TEAL", 0.5, 0, 20.0, 0, blocks=[3.0, 3.0, 3.0, 3.0]),
            record("BASELINE-TEAL", 0.5, 1, 20.0, 0, blocks=[3.0, 3.0, 3.0, 3.0]),
            record("UNIF-ALL", 0.5, 0, 15.0, 10, blocks=[2.9, 2.8, 3.1, 2.7]),
            record("UNIF-ALL", 0.5, 1, 17.0, 10, blocks=[2.9, 2.8, 3.1, 2.9])]
    (cmp,) = compare_to_baseline(recs)
    assert cmp["config"] == "UNIF-ALL" and cmp["seeds"] == [0, 1]
    assert cmp["ppl_diff_over_seeds"]["mean"] == pytest.approx(-4.0)
    assert cmp["ppl_diff_over_seeds"]["std"] == pytest.approx(math.sqrt(2.0))
    blocks = cmp["nll_diff_over_blocks"]
    assert blocks["n"] == 4
    assert blocks["mean"] == pytest.approx((-0.1 - 0.2 + 0.1 - 0.2) / 4)
    assert blocks["fraction_blocks_better"] == pytest.approx(0.75)
    assert 0 < blocks["p_value"] < 1


def make_run(out, records, item_ids=None, spec_hash="h1"):
    mgr = ExperimentManager(out, "t")
    ids = item_ids or [r["id"] for r in records]
    mgr.start_run(spec_hash, {"spec": {}}, ids, metadata={"spec_file": "exp_t.yaml"})
    for r in records:
        mgr.record(r["id"], r, logs={"history": [1.0, 0.5]})
    mgr.aggregate()
    return mgr


RECS = [record(c, s, seed, ppl, p) for (c, p, base) in
        [("BASELINE-TEAL", 0, 20.0), ("UNIF-ALL", 10, 14.0), ("TOP-50", 5, 16.0)]
        for s in (0.5, 0.6) for seed, ppl in ((0, base + 10 * (s - 0.5)), (1, base + 10 * (s - 0.5) + 1.0))]


def test_layout_and_aggregated_files(tmp_path):
    mgr = make_run(tmp_path, RECS)
    d = tmp_path / "t"
    run = mgr.run_dir
    for rel in ("metadata.json", "aggregated/summary.csv", "aggregated/pareto.json", "aggregated/latex_tables/ppl.tex",
                "analysis/statistics.json", "analysis/comparisons.json"):
        assert (d / rel).is_file(), rel
    for rel in ("summary.json", "results.json", "metrics.csv", "config.json", "logs.json"):
        assert (run / rel).is_file(), rel
    assert (run / "checkpoints").is_dir() and (run / "figures").is_dir()
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    res = load_results(d)
    df = res.summary_frame()
    row = df[(df.config == "UNIF-ALL") & (df.sparsity == 0.5)].iloc[0]
    assert row.ppl_mean == pytest.approx(14.5) and row.n_seeds == 2
    assert row.damage_recovered_mean == pytest.approx(((20 - 14) / 10 + (20 - 15) / 10) / 2)
    pareto = res.pareto["by_sparsity"][0]
    assert pareto["frontier"] == ["BASELINE-TEAL", "TOP-50", "UNIF-ALL"]
    tex = (d / "aggregated/latex_tables/ppl.tex").read_text()
    assert r"\toprule" in tex and "UNIF-ALL & 10 & 14.50 $\\pm$ 0.71" in tex
    assert not list(d.rglob("*.tmp"))


def test_resume_continues_same_run_and_aggregates_identically(tmp_path):
    full = make_run(tmp_path / "a", RECS)
    ids = [r["id"] for r in RECS]
    part = make_run(tmp_path / "b", RECS[:5], item_ids=ids)  # "crash" after 5 items
    assert json.loads((part.run_dir / "summary.json").read_text())["status"] == "partial"
    again = ExperimentManager(tmp_path / "b", "t")
    again.start_run("h1", {"spec": {}}, ids)
    assert again.run_dir == part.run_dir and set(again.finished()) == set(ids[:5])
    for r in RECS[5:]:
        again.record(r["id"], r)
    again.aggregate()
    for rel in ("aggregated/summary.csv", "aggregated/pareto.json", "aggregated/latex_tables/ppl.tex",
                "analysis/statistics.json", "analysis/comparisons.json"):
        assert (tmp_path / "a/t" / rel).read_bytes() == (tmp_path / "b/t" / rel).read_bytes(), rel
    # a different spec starts a new run
    other = ExperimentManager(tmp_path / "b", "t")
    other.start_run("h2", {"spec": {}}, ids)
    assert other.run_dir != part.run_dir and other.finished() == {}
    assert full.run_dir.name.startswith("run_")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    atomic_write_json(path, {"a": float("nan"), "b": float("-inf")})
    assert json.loads(path.read_text()) == {"a": "nan", "b": "-inf"}  # the one JSON policy (fileio)


def test_bad_output_dirs(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="names a file"):
        check_output_dir(f)
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            check_output_dir(ro)


def test_load_results_missing_files_name_the_file(tmp_path):
    make_run(tmp_path, RECS)
    (tmp_path / "t/analysis/comparisons.json").unlink()
    with pytest.raises(ConfigError) as info:
        load_results(tmp_path / "t")
    assert "analysis/comparisons.json" in str(info.value) and "\n" not in str(info.value)


def test_pareto_json_has_one_frontier_per_set_of_sparsified_sites(tmp_path):
    down, o_proj = ["layers.0.down_proj", "layers.1.down_proj"], ["layers.0.o_proj", "layers.1.o_proj"]
    recs = [record("BASELINE-TEAL", 0.5, 0, 20.0, 0), record("UNIF-ALL", 0.5, 0, 15.0, 10),
            record("ATTN-ONLY", 0.5, 0, 11.0, 10, sparse=12.0)]  # lower PPL, but on other sites
    for r in recs:
        r["plan"] = {"sparse_sites": o_proj if r["config"] == "ATTN-ONLY" else down}
    pareto = load_results(make_run(tmp_path / "out", recs).experiment_dir).pareto["by_sparsity"]
    assert [(g["main"], g["frontier"]) for g in pareto] == [(True, ["BASELINE-TEAL", "UNIF-ALL"]),
                                                             (False, ["TEAL", "ATTN-ONLY"])]
    assert pareto[1]["teal_ppl"] == 12.0 and pareto[1]["sites"] == o_proj
