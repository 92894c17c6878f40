"""The answer of a run, computed from its saved records: headline rows, Pareto groups, generated sentences.

Everything here is a pure function of the item records in ``results.json`` (no model, no evaluation), so
the summary at the top of a report and its tables come from one computation:

- :func:`site_groups` splits the configs of each sparsity level by the set of sites they *sparsify*:
  a config that sparsifies other sites (ATTN-ONLY with ``sparsify: biased`` sparsifies o_proj only) is
  only comparable with the TEAL baseline of those sites, never with configs of another set;
- :func:`pareto_groups` builds the SPON-parameters vs perplexity frontier per (sparsity, sparsified
  sites), each group with its own TEAL point at zero parameters;
- :func:`vs_own_teal` compares each config with TEAL on its own sparsified sites, paired by eval block
  (t-test) and with a bootstrap interval of the damage recovered;
- :func:`headline` picks, per group, the config with the lowest perplexity and formats its numbers once;
  :func:`sentences` writes the summary from those same formatted strings, so a number in a sentence is
  the number in the table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..expdata import SEED_SCOPE_MEANING
from ..results import BASELINE, compute_pareto_frontier

#: bootstrap resamples of the damage-recovered interval, and the generator seed (deterministic reports)
BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


# --- formatting: one place, used by tables and sentences alike -------------------------------------------

def fmt_ppl(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def fmt_pct(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100.0 * v:.1f}"


def fmt_interval(lo: float | None, hi: float | None, pct: bool = False) -> str:
    f = fmt_pct if pct else fmt_ppl
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "-"
    return f"[{f(lo)}, {f(hi)}]"


def fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{int(n):,}"


def fmt_sparsity(s: float) -> str:
    return f"{s:g}"


# --- sparsified-site sets ------------------------------------------------------------------------------

_SITE = re.compile(r"^layers\.(\d+)\.(\w+)$")


def sparse_sites(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The sites a record's config sparsified (from its allocation plan), as a sorted tuple."""
    sites = (record.get("plan") or {}).get("sparse_sites")
    if sites is None:  # an old record without a plan: fall back on the protocol
        sites = (record.get("protocol") or {}).get("sites") or []
    return tuple(sorted(sites))


def sites_label(sites: Sequence[str]) -> str:
    """``down_proj (30 layers)``; several modules joined with '+' when they cover the same layers."""
    by_module: dict[str, set[int]] = {}
    other: list[str] = []
    for site in sites:
        m = _SITE.match(site)
        if m:
            by_module.setdefault(m.group(2), set()).add(int(m.group(1)))
        else:
            other.append(site)
    if not by_module and not other:
        return "no sites"
    parts: dict[frozenset[int], list[str]] = {}
    for module, layers in by_module.items():
        parts.setdefault(frozenset(layers), []).append(module)
    out = [f"{'+'.join(mods)} ({len(layers)} layer{'s' if len(layers) != 1 else ''})"
           for layers, mods in parts.items()]
    return ", ".join(out + other)


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return math.fsum(vals) / len(vals) if vals else None


def _config_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    order: list[str] = []
    for r in records:
        if r["config"] not in order:
            order.append(r["config"])
    return order


def site_groups(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per sparsity, the configs grouped by the set of sites they sparsify.

    Each group: ``sparsity``, ``sites`` (tuple), ``label``, ``main`` (the set BASELINE-TEAL sparsifies,
    else the set with the most configs), ``configs`` (in spec order) and ``records``. Groups are ordered by
    sparsity, the main group first.
    """
    order = _config_order(records)
    out: list[dict[str, Any]] = []
    for s in sorted({r["sparsity"] for r in records}):
        at = [r for r in records if r["sparsity"] == s]
        sets: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for r in at:
            sets.setdefault(sparse_sites(r), []).append(r)
        base = next((sparse_sites(r) for r in at if r["config"] == BASELINE), None)
        if base is None:
            base = max(sets, key=lambda k: (len({r["config"] for r in sets[k]}), -min(
                order.index(r["config"]) for r in sets[k])))
        for key in sorted(sets, key=lambda k: (k != base, min(order.index(r["config"]) for r in sets[k]))):
            recs = sets[key]
            configs = [c for c in order if any(r["config"] == c for r in recs)]
            out.append({"sparsity": s, "sites": key, "label": sites_label(key), "main": key == base,
                        "configs": configs, "records": recs})
    return out


# --- per-config statistics against its own TEAL ----------------------------------------------------------

def _blocks(r: Mapping[str, Any], which: str) -> list[float] | None:
    b = (r.get("block_nll") or {}).get(which)
    return list(b) if b else None


def _bootstrap_damage(recs: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """Percentile interval of the seed-mean damage recovered, resampling eval blocks (shared by all seeds,
    so one index draw per replicate) and, with two or more seeds, seeds. ``(None, None)`` when the blocks
    are missing or the damage (TEAL minus dense) is not positive in more than 5% of the resamples."""
    import numpy as np

    arrays = []
    for r in recs:
        d, t, s = _blocks(r, "dense"), _blocks(r, "sparse"), _blocks(r, "spon")
        if not d or not t or not s or not len(d) == len(t) == len(s):
            return None, None
        arrays.append(np.array([d, t, s], dtype=np.float64))
    if not arrays or len({a.shape for a in arrays}) != 1:
        return None, None
    nll = np.stack(arrays)  # seeds x (dense, TEAL, SPON) x blocks
    n_seeds, _, n_blocks = nll.shape
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    blocks = rng.integers(0, n_blocks, size=(BOOTSTRAP, n_blocks))
    seeds = rng.integers(0, n_seeds, size=(BOOTSTRAP, n_seeds)) if n_seeds > 1 else np.zeros((BOOTSTRAP, 1), int)
    ppl = np.exp(nll[:, :, blocks].mean(axis=-1))  # seeds x 3 x B  (blocks of one record hold equal tokens)
    gap = ppl[:, 1] - ppl[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        dr = np.where(gap > 0, (ppl[:, 1] - ppl[:, 2]) / gap, np.nan)  # seeds x B
    reps = dr[seeds.T, np.arange(BOOTSTRAP)].mean(axis=0)  # resampled seeds, mean per replicate
    if np.isnan(reps).mean() > 0.05:
        return None, None
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.nanquantile(reps, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _paired_test(recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """SPON vs TEAL on the same sites, per eval block: NLL difference averaged over seeds, one-sample
    t-test against 0 (negative = SPON better)."""
    from scipy import stats

    from ..results import summarize

    pairs = [(_blocks(r, "spon"), _blocks(r, "sparse")) for r in recs]
    out: dict[str, Any] = {"n_blocks": None, "mean": None, "ci_low": None, "ci_high": None, "p_value": None,
                           "fraction_blocks_better": None}
    if not pairs or any(a is None or b is None or len(a) != len(b) for a, b in pairs) \
            or len({len(a) for a, _ in pairs}) != 1:
        return out
    n = len(pairs[0][0])
    diff = [math.fsum(a[i] - b[i] for a, b in pairs) / len(pairs) for i in range(n)]
    st = summarize(diff)
    out.update(n_blocks=n, mean=st["mean"], ci_low=st["ci_low"], ci_high=st["ci_high"],
               fraction_blocks_better=sum(d < 0 for d in diff) / n if n else None)
    if n >= 2 and any(d != diff[0] for d in diff):
        out["p_value"] = float(stats.ttest_1samp(diff, 0.0).pvalue)
    return out


def vs_own_teal(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (sparsity, config): mean PPLs over seeds, damage recovered (mean over seeds, as in the PPL table)
    with a bootstrap interval, and the block-paired test of SPON against TEAL on the same sparsified sites."""
    rows = []
    for g in site_groups(records):
        for config in g["configs"]:
            recs = [r for r in g["records"] if r["config"] == config]
            dense = _mean([r.get("dense_ppl") for r in recs])
            teal = _mean([r.get("sparse_ppl") for r in recs])
            damage = [r.get("damage_recovered") for r in recs]
            row = {"sparsity": g["sparsity"], "config": config, "sites": g["label"], "main": g["main"],
                   "n_seeds": len(recs), "spon_params": recs[0].get("spon_params"),
                   "dense_ppl": dense, "teal_ppl": teal, "ppl": _mean([r.get("ppl") for r in recs]),
                   "damage_recovered": _mean(damage),  # over finite values, as results.summarize does
                   "damage_ci": (None, None), "test": _paired_test(recs)}
            if row["damage_recovered"] is not None and row["spon_params"]:
                row["damage_ci"] = _bootstrap_damage(recs)
            rows.append(row)
    return rows


# --- Pareto frontier per sparsity and sparsified sites --------------------------------------------------

TEAL_POINT = "TEAL"


def pareto_groups(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """SPON parameters vs mean PPL, one frontier per (sparsity, set of sparsified sites).

    Configs that sparsify different sites never share a frontier. Each group has its own TEAL point at
    zero parameters: BASELINE-TEAL where the group has it, else a point named ``TEAL`` holding the TEAL
    perplexity of the group's sites (the ``sparse_ppl`` of its records).
    """
    out = []
    for g in site_groups(records):
        points = []
        for config in g["configs"]:
            recs = [r for r in g["records"] if r["config"] == config]
            points.append({"config": config, "spon_params": recs[0].get("spon_params"),
                           "ppl": _mean([r.get("ppl") for r in recs])})
        teal = _mean([r.get("sparse_ppl") for r in g["records"]])
        if not any(p["spon_params"] == 0 for p in points) and teal is not None:
            points.insert(0, {"config": TEAL_POINT, "spon_params": 0, "ppl": teal})
        frontier = [p["config"] for p in compute_pareto_frontier(points)]
        out.append({"sparsity": g["sparsity"], "sites": list(g["sites"]), "label": g["label"], "main": g["main"],
                    "teal_ppl": teal, "dense_ppl": _mean([r.get("dense_ppl") for r in g["records"]]),
                    "points": points, "frontier": frontier})
    return out


# --- headline and sentences -----------------------------------------------------------------------------

def headline(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (sparsity, sparsified sites) that has a config with biases: dense and TEAL PPL, the
    config with the lowest SPON PPL, its damage recovered with interval and test, its parameters.

    Each row holds the numbers and, under ``text``, their formatted strings (used by the table and the
    sentences alike)."""
    by_key = {(r["sparsity"], r["config"]): r for r in vs_own_teal(records)}
    rows = []
    for g in site_groups(records):
        cands = [by_key[(g["sparsity"], c)] for c in g["configs"]]
        cands = [c for c in cands if c["spon_params"] and c["ppl"] is not None]
        if not cands:
            continue
        best = min(cands, key=lambda c: (c["ppl"], c["spon_params"]))
        test = best["test"]
        lo, hi = best["damage_ci"]
        row = {**best, "label": g["label"], "n_configs": len(cands), "configs": [c["config"] for c in cands]}
        row["text"] = {
            "sparsity": fmt_sparsity(g["sparsity"]), "sites": g["label"], "dense": fmt_ppl(best["dense_ppl"]),
            "teal": fmt_ppl(best["teal_ppl"]), "config": best["config"], "ppl": fmt_ppl(best["ppl"]),
            "damage": fmt_pct(best["damage_recovered"]), "damage_ci": fmt_interval(lo, hi, pct=True),
            "p": fmt_p(test["p_value"]), "blocks": "-" if test["n_blocks"] is None else str(test["n_blocks"]),
            "params": fmt_params(best["spon_params"]),
        }
        rows.append(row)
    return rows


HEADLINE_COLUMNS = {
    "sparsity": "sparsity", "sites": "sparsified sites", "dense": "dense PPL", "teal": "TEAL PPL",
    "config": "best config", "ppl": "its SPON PPL", "damage": "damage recovered %",
    "damage_ci": "95% interval", "p": "p vs TEAL", "params": "SPON params",
}


def headline_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The headline table as strings (column titles of :data:`HEADLINE_COLUMNS`)."""
    return [{title: row["text"][key] for key, title in HEADLINE_COLUMNS.items()} for row in headline(records)]


def _protocol_line(records: Sequence[Mapping[str, Any]], results_meta: Mapping[str, Any]) -> str:
    proto = next((r.get("protocol") for r in records if r.get("protocol")), {}) or {}
    seeds = sorted({r["seed"] for r in records})
    n_blocks, size = proto.get("n_blocks"), proto.get("block_size")
    source = results_meta.get("text_source") or "the eval text"
    model = proto.get("model") or "the model"
    sparsifier = re.sub(r"\(.*\)$", "", str(proto.get("sparsifier") or "")) or "the"
    scope = next((r.get("seed_scope") for r in records if r.get("seed_scope")), "training")
    meaning = SEED_SCOPE_MEANING.get(scope)
    kind = f"{scope} seeds" + (f" ({meaning})" if meaning else "")
    seed_part = (f"{len(seeds)} {kind}" if len(seeds) > 1 else "one seed (intervals cover eval "
                 "blocks only, not training variance)")
    resample = "eval blocks and seeds" if len(seeds) > 1 else "eval blocks"
    return (f"Protocol: {model} ({proto.get('dtype', '?')}), {sparsifier} sparsification; perplexity on "
            f"{n_blocks} eval blocks of {size} tokens ({proto.get('predicted_tokens', '?')} predicted tokens) "
            f"of {source}, the same blocks for every config; {seed_part}. Damage recovered = "
            "(PPL_TEAL − PPL_SPON) / (PPL_TEAL − PPL_dense), mean over seeds, with a 95% percentile bootstrap "
            f"interval over {resample} ({BOOTSTRAP:,} resamples); p: paired t-test over eval blocks of the "
            "SPON against the TEAL NLL on the same sparsified sites.")


def _frontier_sentence(groups: Sequence[Mapping[str, Any]]) -> str | None:
    parts = []
    for g in groups:
        if not g["main"] or len(g["points"]) < 2:
            continue
        pts = {p["config"]: p for p in g["points"]}
        chain = " → ".join(f"{c} ({fmt_params(pts[c]['spon_params'])} params, PPL {fmt_ppl(pts[c]['ppl'])})"
                           for c in g["frontier"])
        dominated = [p["config"] for p in g["points"] if p["config"] not in g["frontier"]]
        tail = f"; dominated: {', '.join(dominated)}" if dominated else ""
        parts.append(f"at sparsity {fmt_sparsity(g['sparsity'])}: {chain}{tail}")
    if not parts:
        return None
    return ("On the Pareto frontier of SPON parameters against perplexity (configs sparsifying the same "
            f"sites, no cheaper config does better), {'; '.join(parts)}.")


def _versus(row: Mapping[str, Any], teal: str = "TEAL") -> str:
    """``p = 0.003`` with the direction of the block-paired difference, or why there is no test."""
    t, mean = row["text"], row["test"].get("mean")
    if t["p"] == "-" or mean is None:
        return f"no block test against {teal}"
    side = "below" if mean < 0 else "above"
    return f"{side} {teal} per eval block, p = {t['p']}"


def _main_sentence(row: Mapping[str, Any]) -> str:
    t = row["text"]
    where = f"At sparsity {t['sparsity']} on {t['sites']}"
    if row["damage_recovered"] is None:
        return (f"{where}, TEAL does not raise perplexity (dense {t['dense']}, TEAL {t['teal']}), so there is "
                f"no damage to recover; the config with biases and the lowest perplexity, {t['config']} "
                f"({t['params']} SPON parameters), reaches {t['ppl']} ({_versus(row)}).")
    ci = f"95% interval {t['damage_ci']}" if t["damage_ci"] != "-" else "no interval: the damage is too small"
    if row["damage_recovered"] > 0:
        verdict = f"brings it to {t['ppl']}: {t['damage']}% of the damage recovered ({ci}; {_versus(row)})"
    else:
        verdict = (f"reaches {t['ppl']}, no better than TEAL: {t['damage']}% of the damage recovered ({ci}; "
                   f"{_versus(row)})")
    return (f"{where}, TEAL raises perplexity from {t['dense']} (dense) to {t['teal']}; the best config with "
            f"biases, {t['config']} ({t['params']} SPON parameters), {verdict}.")


def _other_sentence(row: Mapping[str, Any], main_label: str | None) -> str:
    t = row["text"]
    if row["damage_recovered"] is None:
        result = (f"TEAL on those sites does not raise perplexity (dense {t['dense']}, TEAL {t['teal']}); "
                  f"{t['config']} reaches {t['ppl']} ({_versus(row, 'that TEAL')})")
    else:
        ci = f"95% interval {t['damage_ci']}" if t["damage_ci"] != "-" else "no interval"
        result = (f"against TEAL on those sites ({t['teal']}; dense {t['dense']}) {t['config']} reaches "
                  f"{t['ppl']}, {t['damage']}% of the damage recovered ({ci}; {_versus(row, 'that TEAL')})")
    names = ", ".join(row["configs"])
    cmp = f"; its perplexity is not comparable with the {main_label} configs" if main_label else ""
    return f"At sparsity {t['sparsity']}, {names} sparsif{'ies' if len(row['configs']) == 1 else 'y'} " \
           f"other sites ({t['sites']}): {result}{cmp}."


def sentences(records: Sequence[Mapping[str, Any]], text_source: str | None = None) -> dict[str, Any]:
    """The generated summary: ``{"protocol": str, "sentences": [str, ...]}`` (main results per sparsity,
    the frontier, configs with other sparsified sites)."""
    rows = headline(records)
    groups = pareto_groups(records)
    main_labels = {g["sparsity"]: g["label"] for g in groups if g["main"]}
    out = [_main_sentence(r) for r in rows if r["main"]]
    frontier = _frontier_sentence(groups)
    if frontier:
        out.append(frontier)
    out += [_other_sentence(r, main_labels.get(r["sparsity"])) for r in rows if not r["main"]]
    if not rows:
        out.append("No config with SPON biases finished in this run: there is nothing to compare with TEAL.")
    return {"protocol": _protocol_line(records, {"text_source": text_source}), "sentences": out}
