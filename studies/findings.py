"""The seed's claims re-tested on a sweep's results: one number per claim with a paired bootstrap interval.

Every statistic is computed from the per-block NLLs the records keep (dense, TEAL on the config's sparsified
sites, sparse+SPON): a replicate resamples the eval blocks (the same draw for every config and sparsity: the
blocks are shared, so comparisons are paired) and, with two or more seeds, the seeds (the same draw for
every config: paired by seed); PPLs are taken on the resampled blocks, averaged over the resampled seeds, and
the statistic is computed from those means. Intervals: 95% percentiles of 2,000 replicates (seeded).

Statistics (gain = PPL_TEAL - PPL_SPON on the config's own sparsified sites):

- ``recovered[C, s]`` = gain / (PPL_TEAL - PPL_dense);
- ``gain_growth[C]`` = gain at the highest sparsity minus gain at the lowest;
- ``gain_ratio[A/B, s]`` = gain of A / gain of B (TOP-50 vs UNIF-ALL, TOP-50 vs BOTTOM-50, ...);
- ``gain_difference[D - S, s]`` = gain of a data-driven config D minus that of the static config S with the
  nearest parameter count among those sparsifying the same sites (both counts are in the claim);
- ``on_frontier[C, s]`` = the share of replicates in which C is on the Pareto frontier of SPON parameters vs
  PPL among the configs sparsifying the same sites as UNIF-ALL (TEAL at zero parameters included); the
  point estimate says whether it is on the frontier of the means. This statistic has no interval.

Run: ``python studies/findings.py RESULTS/EXPERIMENT [--ood RESULTS/OTHER] [--extra RESULTS/MORE]
[--json OUT.json]``; prints a Markdown table, with an out-of-domain column when ``--ood`` names an
evaluate-only sweep of the same items on another text, then a per-config table.
"""

from __future__ import annotations

import argparse
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


def replicates(arrays: Mapping[tuple[str, float], np.ndarray], keys: list[tuple[str, float]],
               stat: Callable[[dict], np.ndarray]) -> tuple[float, np.ndarray, int, int]:
    """``stat`` on the means and on paired block (and seed) resamples: (point, R values, seeds, blocks).

    ``stat`` gets ``{key: ppl}`` with ``ppl`` of shape [3, R] (dense, TEAL, SPON; seed-mean PPLs of R
    replicates) and returns R values. Every call draws the same resamples (one seeded generator per call)."""
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
        reps = stat({k: ppl(arrays[k], blocks, seeds) for k in keys})
    return float(point), reps, int(n_seeds), int(n_blocks)


def bootstrap(arrays: Mapping[tuple[str, float], np.ndarray], keys: list[tuple[str, float]],
              stat: Callable[[dict], np.ndarray]) -> dict:
    """Point estimate and 95% percentile interval of ``stat`` (see :func:`replicates`)."""
    point, reps, n_seeds, n_blocks = replicates(arrays, keys, stat)
    finite = np.isfinite(reps)
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = (np.quantile(reps[finite], [alpha, 1 - alpha]) if finite.mean() > 0.95 else (np.nan, np.nan))
    return {"value": point, "ci_low": float(lo), "ci_high": float(hi), "n_seeds": n_seeds, "n_blocks": n_blocks}


def on_frontier(params: Mapping[str, float], ppl: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per config, whether it is Pareto-optimal (fewer parameters, lower PPL) in each replicate column."""
    out = {}
    for c in params:
        dominated = np.zeros_like(ppl[c], dtype=bool)
        for o in params:
            if o != c and params[o] <= params[c]:
                strictly = (params[o] < params[c]) | (ppl[o] < ppl[c])
                dominated |= (ppl[o] <= ppl[c]) & strictly
        out[c] = ~dominated
    return out


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


def config_info(records: list[Mapping]) -> dict[tuple[str, float], dict]:
    """(config, sparsity) -> mean SPON parameters over seeds and the sparsified sites (from the plan)."""
    info: dict[tuple[str, float], dict] = {}
    for r in records:
        if "spon_params" not in r or "plan" not in r:
            continue
        entry = info.setdefault((r["config"], r["sparsity"]), {"params": [], "sites": tuple(r["plan"]["sparse_sites"])})
        entry["params"].append(float(r["spon_params"]))
    return {k: {"params": float(np.mean(v["params"])), "sites": v["sites"]} for k, v in info.items()}


STATIC = ("TOP-25", "TOP-50", "TOP-75", "BOTTOM-50", "UNIF-ALL")
DATA_DRIVEN = ("CRITICAL-ONLY", "SHAPLEY-GUIDED", "CORNERSTONE")


def _ratio_verdict(r) -> str:
    return "holds" if r["ci_low"] > 1 else ("does not" if r["ci_high"] < 1 else "cannot tell (CI spans 1)")


def pareto_row(arrays, info, s: float) -> dict | None:
    """The Pareto set at sparsity ``s`` among the configs sparsifying UNIF-ALL's sites (see the docstring)."""
    if ("UNIF-ALL", s) not in info:
        return None
    sites = info["UNIF-ALL", s]["sites"]
    group = [c for (c, lvl), i in info.items() if lvl == s and i["sites"] == sites and (c, lvl) in arrays]
    params = {c: info[c, s]["params"] for c in group}
    keys = [(c, s) for c in group]
    teal = "TEAL" if "BASELINE-TEAL" not in group else None
    if teal:
        params[teal] = 0.0

    def frontier_of(c):
        def stat(d):
            ppl = {k: d[k, s][2] for k in group}
            if teal:
                ppl[teal] = d["UNIF-ALL", s][1]
            return on_frontier(params, ppl)[c].astype(float)
        return stat

    share = {c: replicates(arrays, keys, frontier_of(c)) for c in params}
    on = [c for c in sorted(params, key=params.get) if share[c][0] == 1.0]
    off = [c for c in sorted(params, key=params.get) if share[c][0] != 1.0]
    fmt = lambda c: f"{c} ({share[c][1].mean():.0%})"  # noqa: E731
    text = ("on the frontier of the means: " + ", ".join(map(fmt, on)) + "; dominated: " + (", ".join(map(fmt, off)) or "none")
            + " (share of replicates on the frontier)")
    n_seeds, n_blocks = share[on[0]][2], share[on[0]][3]
    return {"claim": f"Pareto set (SPON parameters vs PPL) at {s:g}", "seed": "a frontier", "text": text,
            "frontier": on, "share_on_frontier": {c: float(share[c][1].mean()) for c in params},
            "value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
            "n_seeds": n_seeds, "n_blocks": n_blocks, "verdict": "see the frontier"}


def claims(records: list[Mapping]) -> list[dict]:
    arrays, seeds = nll_arrays(records)
    info = config_info(records)
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
            lambda d, s=s: gain(d["TOP-50", s]) / gain(d["BOTTOM-50", s]), _ratio_verdict)
        add(f"o_proj (ATTN-ONLY) recovers far more than down_proj (UNIF-ALL) at {s:g}: difference of damage "
            f"recovered", "80% vs 23%", [("ATTN-ONLY", s), ("UNIF-ALL", s)],
            lambda d, s=s: recovered(d["ATTN-ONLY", s]) - recovered(d["UNIF-ALL", s]), _sign_verdict)
        add(f"ATTN-ONLY's biases improve on its own (o_proj-only) TEAL at {s:g} (gain, PPL; defined where the "
            f"share is not)", "gain > 0", [("ATTN-ONLY", s)], lambda d, s=s: gain(d["ATTN-ONLY", s]), _sign_verdict)
        for dd in DATA_DRIVEN:
            if (dd, s) not in info or dd not in have:
                continue
            same = [c for c in STATIC if (c, s) in info and info[c, s]["sites"] == info[dd, s]["sites"]]
            if not same:
                continue
            static = min(same, key=lambda c: abs(info[c, s]["params"] - info[dd, s]["params"]))
            add(f"{dd} ({info[dd, s]['params']:,.0f} params) beats {static} ({info[static, s]['params']:,.0f}) "
                f"at {s:g} (gain difference, PPL)", "data-driven better",
                [(dd, s), (static, s)], lambda d, s=s, a=dd, b=static: gain(d[a, s]) - gain(d[b, s]),
                _sign_verdict)
        add(f"the seed's lr 1e-5 (zero init) barely moves the biases at {s:g}: UNIF-ALL-lr1e-5 damage recovered",
            "barely moves", [("UNIF-ALL-lr1e-5", s)], lambda d, s=s: recovered(d["UNIF-ALL-lr1e-5", s]),
            lambda r: "holds (< 15% recovered)" if r["ci_high"] < 0.15 else "does not")
        row = pareto_row(arrays, info, s)
        if row is not None:
            rows.append(row)
    if len(levels) >= 2:
        lo, hi = levels[0], levels[-1]
        add(f"the gain grows with sparsity (UNIF-ALL gain at {hi:g} minus at {lo:g}, PPL)", "grows",
            [("UNIF-ALL", lo), ("UNIF-ALL", hi)], lambda d: gain(d["UNIF-ALL", hi]) - gain(d["UNIF-ALL", lo]),
            _sign_verdict)
    return rows


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "text" in r:
        return r["text"]
    return f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def table(rows: list[dict], ood: list[dict] | None = None) -> str:
    other = {r["claim"]: r for r in ood or []}
    head = "| claim | seed's number | ours [95% CI] | seeds x blocks | verdict |"
    if ood is not None:
        head = "| claim | seed's number | ours [95% CI] | out-of-domain [95% CI] | seeds x blocks | verdict | verdict out of domain |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        o = other.get(r["claim"])
        if ood is None:
            lines.append(f"| {r['claim']} | {r['seed']} | {_cell(r)} | {r['n_seeds']} x {r['n_blocks']} | {r['verdict']} |")
        else:
            lines.append(f"| {r['claim']} | {r['seed']} | {_cell(r)} | {_cell(o)} | {r['n_seeds']} x {r['n_blocks']} | "
                         f"{r['verdict']} | {'-' if o is None else o['verdict']} |")
    return "\n".join(lines)


def config_table(records: list[Mapping], ood: list[Mapping] | None = None) -> str:
    """Per sparsity and config: PPL and damage recovered (seed mean, bootstrap interval over eval blocks and
    seeds; the report's numbers, from ``spon_toolkit.report.summary.vs_own_teal``), in and out of domain."""
    from spon_toolkit.report.summary import vs_own_teal

    def cells(row):
        if row is None:
            return ["-", "-"]
        lo, hi = row["damage_ci"]
        dr = row["damage_recovered"]
        share = "-" if dr is None or not row["spon_params"] else (
            f"{dr:.0%}" + ("" if lo is None else f" [{lo:.0%}, {hi:.0%}]"))
        return [f"{row['ppl']:.3f} (TEAL {row['teal_ppl']:.3f})", share]

    other = {(r["sparsity"], r["config"]): r for r in vs_own_teal(ood)} if ood is not None else {}
    head = ["sparsity", "config", "sparsified", "params", "PPL in domain", "recovered in domain"]
    if ood is not None:
        head += ["PPL out of domain", "recovered out of domain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in vs_own_teal(records):
        row = [f"{r['sparsity']:g}", r["config"], r["sites"], f"{r['spon_params']:,}", *cells(r)]
        if ood is not None:
            row += cells(other.get((r["sparsity"], r["config"])))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="an experiment's results directory (<output-dir>/<experiment>)")
    parser.add_argument("--ood", help="the results directory of an evaluate-only sweep of the same items on "
                                      "another text (adds an out-of-domain column)")
    parser.add_argument("--extra", action="append", default=[], metavar="RESULTS",
                        help="results of another sweep on the same eval blocks and seeds whose configs join the "
                             "claims (e.g. results/seed_lr: UNIF-ALL-lr1e-5); repeatable")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    from spon_toolkit.errors import SponError
    from spon_toolkit.fileio import atomic_write_json
    from spon_toolkit.results import load_results

    try:
        records = [r for d in [args.results, *args.extra] for r in load_results(d).records]
        ood_records = load_results(args.ood).records if args.ood else None
    except SponError as exc:
        raise SystemExit(f"error: {exc}") from None
    rows = claims(records)
    ood = claims(ood_records) if ood_records is not None else None
    if args.json:
        atomic_write_json(args.json, {"method": __doc__.split("\n\n")[1], "rows": rows,
                                      **({"out_of_domain": ood} if ood is not None else {})})
    print(table(rows, ood))
    print()
    print(config_table(records, ood_records))


if __name__ == "__main__":
    main()
