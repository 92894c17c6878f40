"""The seed's claims re-tested on a sweep's results: one number per claim with a paired bootstrap interval.

Every statistic is computed from the per-block NLLs the records keep (dense, TEAL on the config's sparsified
sites, sparse+SPON): a replicate resamples the eval blocks (the same draw for every config and sparsity: the
blocks are shared, so comparisons are paired) and, with two or more seeds, the seeds (the same draw for
every config: paired by seed); PPLs are taken on the resampled blocks, averaged over the resampled seeds, and
the statistic is computed from those means. Intervals: 95% percentiles of 2,000 replicates (seeded).

Statistics (gain = PPL_TEAL - PPL_SPON on the config's own sparsified sites):

- ``recovered[C, s]`` = gain / (PPL_TEAL - PPL_dense);
- ``gain_growth[C]`` = gain at the highest sparsity minus gain at the lowest;
- ``gain_ratio[A/B, s]`` = gain of A / gain of B (TOP-50 vs UNIF-ALL, TOP-50 vs BOTTOM-50, ...).

Run: ``python studies/findings.py RESULTS/EXPERIMENT [--json OUT.json]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping

import numpy as np

REPLICATES, SEED, CONFIDENCE = 2000, 0, 0.95
KINDS = ("dense", "sparse", "spon")


def nll_arrays(records: list[Mapping]) -> tuple[dict[tuple[str, float], np.ndarray], list[int]]:
    """(config, sparsity) -> NLLs [seeds, 3 (dense, TEAL, SPON), blocks], seeds in a common order."""
    seeds = sorted({r["seed"] for r in records})
    by_key: dict[tuple[str, float], dict[int, Mapping]] = {}
    for r in records:
        by_key.setdefault((r["config"], r["sparsity"]), {})[r["seed"]] = r
    out = {}
    for key, recs in by_key.items():
        if sorted(recs) != seeds:
            continue  # a config missing a seed cannot be paired by seed
        out[key] = np.array([[recs[s]["block_nll"][k] for k in KINDS] for s in seeds], dtype=np.float64)
    return out, seeds


def bootstrap(arrays: Mapping[tuple[str, float], np.ndarray], keys: list[tuple[str, float]],
              stat: Callable[[dict], np.ndarray]) -> dict:
    """Point estimate and percentile interval of ``stat`` over paired block (and seed) resamples.

    ``stat`` gets ``{key: ppl}`` with ``ppl`` of shape [3, R] (dense, TEAL, SPON; seed-mean PPLs of R
    replicates) and returns R values."""
    first = arrays[keys[0]]
    n_seeds, _, n_blocks = first.shape
    rng = np.random.default_rng(SEED)
    blocks = rng.integers(0, n_blocks, size=(REPLICATES, n_blocks))
    seeds = (rng.integers(0, n_seeds, size=(REPLICATES, n_seeds)) if n_seeds > 1
             else np.zeros((REPLICATES, 1), int))

    def ppl(nll, b, s):  # nll [seeds, 3, blocks] -> [3, R]
        per_seed = np.exp(nll[:, :, b].mean(axis=-1))  # seeds x 3 x R
        return per_seed[s.T, :, np.arange(per_seed.shape[-1])].mean(axis=0).T  # [seeds, R, 3] -> [3, R]

    with np.errstate(divide="ignore", invalid="ignore"):
        point = stat({k: np.exp(arrays[k].mean(axis=-1)).mean(axis=0)[:, None] for k in keys})[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = stat({k: ppl(arrays[k], blocks, seeds) for k in keys})
    finite = np.isfinite(reps)
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = (np.quantile(reps[finite], [alpha, 1 - alpha]) if finite.mean() > 0.95 else (np.nan, np.nan))
    return {"value": float(point), "ci_low": float(lo), "ci_high": float(hi), "n_seeds": int(n_seeds),
            "n_blocks": int(n_blocks)}


def gain(p):
    return p[1] - p[2]


def recovered(p):
    """Damage recovered; NaN where TEAL did not raise the PPL (there is no damage to recover)."""
    damage = p[1] - p[0]
    return np.where(damage > 0, gain(p) / np.where(damage > 0, damage, 1.0), np.nan)


def _sign_verdict(r) -> str:
    if not np.isfinite(r["value"]) or not np.isfinite(r["ci_low"]):
        return "cannot tell (undefined: TEAL did not raise the PPL)"
    return "holds" if r["ci_low"] > 0 else ("does not" if r["ci_high"] < 0 else "cannot tell")


def claims(records: list[Mapping]) -> list[dict]:
    arrays, seeds = nll_arrays(records)
    levels = sorted({s for _, s in arrays})
    have = {c for c, _ in arrays}
    rows = []

    def add(claim, seed_value, keys, stat, verdict):
        if all(k in arrays for k in keys):
            r = bootstrap(arrays, keys, stat)
            rows.append({"claim": claim, "seed": seed_value, **r, "verdict": verdict(r)})

    for s in levels:
        add(f"SPON improves on TEAL at {s:g} (UNIF-ALL damage recovered)", "gain > 0", [("UNIF-ALL", s)],
            lambda d, s=s: recovered(d["UNIF-ALL", s]), _sign_verdict)
        add(f"TOP-50 gets about 85% of UNIF-ALL's gain at {s:g}", "0.85", [("TOP-50", s), ("UNIF-ALL", s)],
            lambda d, s=s: gain(d["TOP-50", s]) / gain(d["UNIF-ALL", s]),
            lambda r: "consistent" if r["ci_low"] <= 0.85 <= r["ci_high"] else "does not")
        add(f"TOP-50 beats BOTTOM-50 at {s:g} (gain ratio)", "1.39x / 1.54x", [("TOP-50", s), ("BOTTOM-50", s)],
            lambda d, s=s: gain(d["TOP-50", s]) / gain(d["BOTTOM-50", s]),
            lambda r: "holds" if r["ci_low"] > 1 else ("does not" if r["ci_high"] < 1 else "cannot tell (CI spans 1)"))
        add(f"o_proj (ATTN-ONLY) recovers far more than down_proj (UNIF-ALL) at {s:g}: difference of damage "
            f"recovered", "80% vs 23%", [("ATTN-ONLY", s), ("UNIF-ALL", s)],
            lambda d, s=s: recovered(d["ATTN-ONLY", s]) - recovered(d["UNIF-ALL", s]), _sign_verdict)
        for dd, static in (("CRITICAL-ONLY", "TOP-25"), ("SHAPLEY-GUIDED", "TOP-50"), ("CORNERSTONE", "TOP-25")):
            if dd in have and static in have:
                add(f"{dd} beats {static} at {s:g} (gain difference, PPL)", "data-driven better",
                    [(dd, s), (static, s)], lambda d, s=s, a=dd, b=static: gain(d[a, s]) - gain(d[b, s]),
                    _sign_verdict)
    if len(levels) >= 2:
        lo, hi = levels[0], levels[-1]
        add(f"the gain grows with sparsity (UNIF-ALL gain at {hi:g} minus at {lo:g}, PPL)", "grows",
            [("UNIF-ALL", lo), ("UNIF-ALL", hi)], lambda d: gain(d["UNIF-ALL", hi]) - gain(d["UNIF-ALL", lo]),
            _sign_verdict)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| claim | seed's number | ours [95% CI] | seeds x blocks | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['seed']} | {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['n_seeds']} x {r['n_blocks']} | {r['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="an experiment's results directory (<output-dir>/<experiment>)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    from spon_toolkit.fileio import atomic_write_json
    from spon_toolkit.results import load_results

    rows = claims(load_results(args.results).records)
    if args.json:
        atomic_write_json(args.json, {"method": __doc__.split("\n\n")[1], "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
