"""studies/findings.py: paired bootstrap of claim statistics on synthetic records with known answers."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("findings", Path(__file__).parents[1] / "studies" / "findings.py")
findings = importlib.util.module_from_spec(spec)
spec.loader.exec_module(findings)


def _records(gains: dict[str, float], seeds=(0, 1, 2), blocks=40, noise=0.01):
    """Per-block NLLs with dense log(20), TEAL log(22) and SPON log(22 - gain) plus block noise shared by
    configs (paired)."""
    rng = np.random.default_rng(0)
    out = []
    for seed in seeds:
        shared = rng.normal(0, noise, blocks)
        for config, g in gains.items():
            nll = {k: list(math.log(v) + shared) for k, v in (("dense", 20.0), ("sparse", 22.0), ("spon", 22.0 - g))}
            out.append({"config": config, "sparsity": 0.5, "seed": seed, "block_nll": nll})
    return out


def test_claims_recover_the_known_statistics_with_intervals_around_them():
    rows = {r["claim"].split(" at ")[0]: r for r in findings.claims(
        _records({"UNIF-ALL": 1.0, "TOP-50": 0.85, "BOTTOM-50": 0.5}))}
    rec = rows["SPON improves on TEAL"]
    assert rec["value"] == np.float64(rec["value"]) and abs(rec["value"] - 0.5) < 0.01  # 1 / (22 - 20)
    assert rec["ci_low"] < rec["value"] < rec["ci_high"] and rec["verdict"] == "holds"
    share = rows["TOP-50 gets about 85% of UNIF-ALL's gain"]
    assert abs(share["value"] - 0.85) < 0.01 and share["verdict"] == "consistent"
    ratio = rows["TOP-50 beats BOTTOM-50"]
    assert abs(ratio["value"] - 1.7) < 0.02 and ratio["verdict"] == "holds"


def test_undefined_damage_is_cannot_tell_not_a_number():
    recs = _records({"UNIF-ALL": 1.0, "ATTN-ONLY": 0.5})
    for r in recs:  # o_proj-only TEAL below dense: no damage to recover
        if r["config"] == "ATTN-ONLY":
            r["block_nll"]["sparse"] = [x - 0.2 for x in r["block_nll"]["dense"]]
    row = next(r for r in findings.claims(recs) if r["claim"].startswith("o_proj"))
    assert row["verdict"].startswith("cannot tell (undefined")


def _with_plans(records, params: dict[str, int], sites=("layers.0.down_proj",)):
    for r in records:
        r["spon_params"] = params[r["config"]]
        r["plan"] = {"sparse_sites": list(sites)}
    return records


def test_pareto_row_finds_the_frontier_of_the_means_and_how_often_each_config_is_on_it():
    recs = _with_plans(_records({"BASELINE-TEAL": 0.0, "TOP-50": 0.85, "BOTTOM-50": 0.5, "UNIF-ALL": 1.0}),
                       {"BASELINE-TEAL": 0, "TOP-50": 10, "BOTTOM-50": 10, "UNIF-ALL": 20})
    row = next(r for r in findings.claims(recs) if r["claim"].startswith("Pareto"))
    assert row["frontier"] == ["BASELINE-TEAL", "TOP-50", "UNIF-ALL"]  # BOTTOM-50: same params, higher PPL
    share = row["share_on_frontier"]
    assert share["TOP-50"] > 0.99 and share["BOTTOM-50"] < 0.01 and share["UNIF-ALL"] > 0.99
    assert "dominated: BOTTOM-50 (0%)" in row["text"]


def test_data_driven_config_is_compared_with_the_static_one_of_the_nearest_parameter_count():
    recs = _with_plans(_records({"UNIF-ALL": 1.0, "TOP-25": 0.4, "TOP-50": 0.85, "CRITICAL-ONLY": 0.9}),
                       {"UNIF-ALL": 30, "TOP-25": 8, "TOP-50": 15, "CRITICAL-ONLY": 14})
    row = next(r for r in findings.claims(recs) if r["claim"].startswith("CRITICAL-ONLY"))
    assert "beats TOP-50 (15)" in row["claim"] and "(14 params)" in row["claim"]
    assert abs(row["value"] - 0.05) < 0.01  # gain 0.9 - 0.85 PPL


def test_out_of_domain_column_pairs_rows_by_claim():
    rows = findings.claims(_records({"UNIF-ALL": 1.0, "TOP-50": 0.85, "BOTTOM-50": 0.5}))
    ood = findings.claims(_records({"UNIF-ALL": 0.5, "TOP-50": 0.2, "BOTTOM-50": 0.3}))
    text = findings.table(rows, ood)
    line = next(x for x in text.splitlines() if x.startswith("| TOP-50 beats BOTTOM-50"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-2] == "holds" and cells[-1] == "does not"  # 1.7x in domain, 0.67x out of domain
    assert text.splitlines()[1].count("---") == 7


def test_seed_learning_rate_row_is_its_damage_recovered():
    rows = findings.claims(_records({"UNIF-ALL": 1.0, "UNIF-ALL-lr1e-5": 0.02}))
    row = next(r for r in rows if r["claim"].startswith("the seed's lr 1e-5"))
    assert abs(row["value"] - 0.01) < 0.005 and row["verdict"] == "holds (< 15% recovered)"  # 0.02 / (22 - 20)
    moved = next(r for r in findings.claims(_records({"UNIF-ALL-lr1e-5": 1.0})) if r["claim"].startswith("the seed"))
    assert moved["verdict"] == "does not"
