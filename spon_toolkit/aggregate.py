"""Aggregating item records: per-config statistics over seeds, paired comparisons with the TEAL baseline,
the Pareto frontier of SPON parameters vs perplexity, and the CSV / LaTeX summaries built from them.

Pure functions of records (dicts as :class:`spon_toolkit.results.ExperimentManager` stores them): no model, no
files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, csv_text  # noqa: F401  (re-exported)

BASELINE = "BASELINE-TEAL"
CONFIDENCE = 0.95

# --- statistics ----------------------------------------------------------------------------------

def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample std and a two-sided Student-t confidence interval of ``values``.

    With one value the std and interval are ``None``: one seed says nothing about seed variance.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    out: dict[str, Any] = {"n": n, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    if n == 0:
        return out
    mean = math.fsum(xs) / n
    out["mean"] = mean
    if n >= 2:
        from scipy import stats

        std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return out


def compute_pareto_frontier(
    points: Iterable[Mapping[str, Any]], x: str = "spon_params", y: str = "ppl"
) -> list[dict[str, Any]]:
    """The points not dominated in (``x``, ``y``), both minimised, sorted by ``x`` then ``y``.

    A point is dominated when another is no worse on both axes and better on one. With the defaults
    this is the SPON-parameter-count vs perplexity frontier: no cheaper config reaches a lower PPL.
    Points lacking a finite ``x`` or ``y`` are ignored.
    """
    pts = [dict(p) for p in points
           if p.get(x) is not None and p.get(y) is not None and math.isfinite(p[x]) and math.isfinite(p[y])]
    pts.sort(key=lambda p: (p[x], p[y]))
    frontier: list[dict[str, Any]] = []
    best_y = math.inf
    for p in pts:
        if p[y] < best_y:
            frontier.append(p)
            best_y = p[y]
    return frontier


def _group(records: Iterable[Mapping[str, Any]]) -> dict[tuple[float, str], list[Mapping[str, Any]]]:
    groups: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["sparsity"], r["config"]), []).append(r)
    return groups


STAT_METRICS = ("ppl", "sparse_ppl", "dense_ppl", "damage_recovered", "achieved_sparsity")


def aggregate_statistics(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (sparsity, config): statistics over seeds of each metric of :data:`STAT_METRICS`."""
    rows = []
    for (s, config), group in _group(records).items():
        row: dict[str, Any] = {"config": config, "sparsity": s, "seeds": [r["seed"] for r in group],
                               "spon_params": group[0].get("spon_params")}
        for metric in STAT_METRICS:
            row[metric] = summarize(r.get(metric) for r in group)
        rows.append(row)
    return rows


def _block_means(r: Mapping[str, Any]) -> list[float] | None:
    blocks = r.get("block_nll") or {}
    return blocks.get("spon")


def compare_to_baseline(records: Sequence[Mapping[str, Any]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Each config vs ``baseline`` at the same sparsity, paired over seeds and over eval blocks.

    - over seeds: ``ppl(config) - ppl(baseline)`` per seed (same seed, same data), then mean/std/CI;
    - over blocks: per eval block the NLL difference (config minus baseline) averaged over the shared
      seeds, then mean, t-interval, paired t-test p-value and the fraction of blocks the config wins.
    Negative differences mean the config has the lower perplexity.
    """
    from scipy import stats

    out = []
    groups = _group(records)
    for (s, config), group in groups.items():
        if config == baseline or (s, baseline) not in groups:
            continue
        base = {r["seed"]: r for r in groups[(s, baseline)]}
        pairs = [(r, base[r["seed"]]) for r in group if r["seed"] in base]
        if not pairs:
            continue
        sites = [((r.get("plan") or {}).get("sparse_sites"), (b.get("plan") or {}).get("sparse_sites")) for r, b in pairs]
        same_sites = None if any(a is None or b is None for a, b in sites) else all(a == b for a, b in sites)
        entry: dict[str, Any] = {
            "config": config, "baseline": baseline, "sparsity": s, "seeds": [r["seed"] for r, _ in pairs],
            "same_sparsified_sites": same_sites,
            "ppl_diff_over_seeds": summarize(r["ppl"] - b["ppl"] for r, b in pairs),
            "ppl_ratio_over_seeds": summarize(r["ppl"] / b["ppl"] for r, b in pairs),
        }
        blocks = [(_block_means(r), _block_means(b)) for r, b in pairs]
        if all(a is not None and b is not None and len(a) == len(b) for a, b in blocks):
            n_blocks = len(blocks[0][0])
            diff = [math.fsum(a[i] - b[i] for a, b in blocks) / len(blocks) for i in range(n_blocks)]
            block_stats = summarize(diff)
            if n_blocks >= 2 and any(d != diff[0] for d in diff):
                block_stats["p_value"] = float(stats.ttest_1samp(diff, 0.0).pvalue)
            else:
                block_stats["p_value"] = None
            block_stats["fraction_blocks_better"] = sum(d < 0 for d in diff) / n_blocks if n_blocks else None
            entry["nll_diff_over_blocks"] = block_stats
        out.append(entry)
    return out


def _latex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def latex_ppl_table(stat_rows: Sequence[Mapping[str, Any]], caption: str = "") -> str:
    """A booktabs table: one row per config, per sparsity the PPL (mean +- std over seeds) and the
    damage recovered."""
    sparsities = sorted({r["sparsity"] for r in stat_rows})
    configs: list[str] = []
    for r in stat_rows:
        if r["config"] not in configs:
            configs.append(r["config"])
    cell = {(r["config"], r["sparsity"]): r for r in stat_rows}

    def fmt(stat: Mapping[str, Any] | None, pct: bool = False) -> str:
        if not stat or stat.get("mean") is None:
            return "--"
        scale = 100.0 if pct else 1.0
        text = f"{stat['mean'] * scale:.1f}" if pct else f"{stat['mean']:.2f}"
        if stat.get("std") is not None:
            text += f" $\\pm$ {stat['std'] * scale:.1f}" if pct else f" $\\pm$ {stat['std']:.2f}"
        return text

    cols = "l r " + " ".join("r r" for _ in sparsities)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{cols}}}", r"\toprule"]
    head = ["Config", "SPON params"] + [rf"\multicolumn{{2}}{{c}}{{$s={s:g}$}}" for s in sparsities]
    lines.append(" & ".join(head) + r" \\")
    lines.append(" & & " + " & ".join("PPL & Rec. (\\%)" for _ in sparsities) + r" \\")
    lines.append(r"\midrule")
    for c in configs:
        params = next((cell[(c, s)]["spon_params"] for s in sparsities if (c, s) in cell), None)
        row = [_latex_escape(c), f"{params:,}" if params is not None else "--"]
        for s in sparsities:
            r = cell.get((c, s))
            row += [fmt(r["ppl"] if r else None), fmt(r["damage_recovered"] if r else None, pct=True)]
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{_latex_escape(caption)}}}")
    lines += [r"\end{table}", ""]
    return "\n".join(lines)


SUMMARY_COLUMNS = ["config", "sparsity", "n_seeds", "spon_params", "dense_ppl", "sparse_ppl", "sparse_ppl_std",
                   "ppl_mean", "ppl_std", "ppl_ci_low", "ppl_ci_high", "damage_recovered_mean",
                   "damage_recovered_std", "damage_recovered_ci_low", "damage_recovered_ci_high",
                   "achieved_sparsity"]


def _summary_rows(stat_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in stat_rows:
        rows.append({
            "config": r["config"], "sparsity": r["sparsity"], "n_seeds": r["ppl"]["n"],
            "spon_params": r["spon_params"], "dense_ppl": r["dense_ppl"]["mean"],
            "sparse_ppl": r["sparse_ppl"]["mean"], "sparse_ppl_std": r["sparse_ppl"]["std"],
            "ppl_mean": r["ppl"]["mean"], "ppl_std": r["ppl"]["std"], "ppl_ci_low": r["ppl"]["ci_low"],
            "ppl_ci_high": r["ppl"]["ci_high"],
            "damage_recovered_mean": r["damage_recovered"]["mean"],
            "damage_recovered_std": r["damage_recovered"]["std"],
            "damage_recovered_ci_low": r["damage_recovered"]["ci_low"],
            "damage_recovered_ci_high": r["damage_recovered"]["ci_high"],
            "achieved_sparsity": r["achieved_sparsity"]["mean"],
        })
    return rows


