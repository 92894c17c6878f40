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
