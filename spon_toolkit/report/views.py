"""Tables and figures of a report, computed from saved results only (called from notebook cells).

Each function takes a :class:`spon_toolkit.results.Results` (``load(results_dir)``) and returns a pandas
DataFrame or a matplotlib figure. Nothing here loads a model or evaluates anything: the numbers were
computed by the run and written to the results directory, so a report can be re-executed anywhere.
Figures are also saved as PNG under the run's ``figures/`` directory.
"""

from __future__ import annotations

import json
from typing import Any

from ..results import BASELINE, Results, load_results


def load(results_dir: str) -> Results:
    """Load the results directory and set the figure style."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return load_results(results_dir)


def _save(results: Results, fig, name: str):
    fig.tight_layout()
    out = results.run_dir / "figures"
    if out.is_dir():
        fig.savefig(out / f"{name}.png", dpi=110, metadata={"Software": None})
    return fig


def _config_order(results: Results) -> list[str]:
    order: list[str] = []
    for r in results.records:
        if r["config"] not in order:
            order.append(r["config"])
    return order


# --- protocol -------------------------------------------------------------------------------------

def protocol(results: Results):
    """One row per setting: model, data protocol, sparsifier, sites, trainer, seeds, environment."""
    import pandas as pd

    spec = results.config.get("spec", {})
    proto = next((r.get("protocol") for r in results.records if r.get("protocol")), {}) or {}
    model = results.config.get("model_info", {})
    rows: list[tuple[str, Any]] = [
        ("experiment", results.name),
        ("spec file", results.metadata.get("spec_file")),
        ("spec hash", results.config.get("spec_hash")),
        ("run", results.run_dir.name),
        ("model", spec.get("model", {}).get("loader")),
    ]
    rows += [(f"model {k}", v) for k, v in model.items()]
    rows += [(f"eval {k}", v if not isinstance(v, (dict, list)) else json.dumps(v)) for k, v in proto.items()]
    rows += [
        ("data", json.dumps(spec.get("data", {}))),
        ("sparsifier", json.dumps(spec.get("sparsifier", {}))),
        ("sparsified sites", json.dumps(spec.get("sites"))),
        ("sparsity levels", json.dumps(spec.get("sparsity"))),
        ("trainer", json.dumps(spec.get("trainer", {}))),
        ("seeds", json.dumps(spec.get("seeds"))),
    ]
    rows += [(f"env {k}", v) for k, v in results.metadata.get("environment", {}).items()]
    return pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting")


# --- tables ---------------------------------------------------------------------------------------

def ppl_table(results: Results):
    """Per (sparsity, config): dense / TEAL / SPON perplexity and damage recovered, mean +- std over seeds."""
    df = results.summary_frame()

    def pm(mean, std, scale=1.0, digits=2):
        if mean != mean:  # NaN
            return "-"
        text = f"{mean * scale:.{digits}f}"
        return text if std != std else f"{text} ± {std * scale:.{digits}f}"

    out = df[["sparsity", "config", "n_seeds", "spon_params"]].copy()
    out["dense PPL"] = df["dense_ppl"].map(lambda v: f"{v:.2f}")
    out["TEAL PPL (no bias)"] = [pm(m, s) for m, s in zip(df["sparse_ppl"], df["sparse_ppl_std"], strict=False)]
    out["SPON PPL"] = [pm(m, s) for m, s in zip(df["ppl_mean"], df["ppl_std"], strict=False)]
    out["95% CI"] = [("-" if lo != lo else f"[{lo:.2f}, {hi:.2f}]") for lo, hi in zip(df["ppl_ci_low"], df["ppl_ci_high"], strict=False)]
    out["damage recovered %"] = [pm(m, s, 100.0, 1) for m, s in
                                 zip(df["damage_recovered_mean"], df["damage_recovered_std"], strict=False)]
    return out.set_index(["sparsity", "config"])


def comparisons_table(results: Results):
    """Each config vs BASELINE-TEAL, paired over seeds and eval blocks (from analysis/comparisons.json)."""
    import pandas as pd

    def num(v, digits=4):
        return "-" if v is None else f"{v:.{digits}f}"

    rows = []
    for c in results.comparisons.get("comparisons", []):
        seeds = c["ppl_diff_over_seeds"]
        blocks = c.get("nll_diff_over_blocks") or {}
        same = c.get("same_sparsified_sites")
        rows.append({
            "sparsity": c["sparsity"], "config": c["config"], "seeds": len(c["seeds"]),
            "ΔPPL (mean)": num(seeds["mean"], 3), "ΔPPL std": num(seeds["std"], 3),
            "ΔNLL/token (blocks)": num(blocks.get("mean")),
            "95% CI (blocks)": ("-" if blocks.get("ci_low") is None
                                else f"[{blocks['ci_low']:.4f}, {blocks['ci_high']:.4f}]"),
            "p (paired t)": "-" if blocks.get("p_value") is None else f"{blocks['p_value']:.2g}",
            "blocks better": num(blocks.get("fraction_blocks_better"), 2),
            "eval blocks": blocks.get("n"),
            "same sparsified sites": {True: "yes", False: "no (own TEAL differs)", None: "?"}[same],
        })
    return pd.DataFrame(rows).set_index(["sparsity", "config"]) if rows else pd.DataFrame()


def latex_table(results: Results) -> str:
    return (results.experiment_dir / "aggregated" / "latex_tables" / "ppl.tex").read_text()


# --- figures --------------------------------------------------------------------------------------

def ppl_bars(results: Results):
    """SPON perplexity per config (bars: mean over seeds, error bars: std), TEAL and dense PPL as lines."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = results.records_frame()
    sparsities = sorted(df["sparsity"].unique())
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5.5 * len(sparsities), 4.2), squeeze=False)
    for ax, s in zip(axes[0], sparsities, strict=False):
        sub = df[df["sparsity"] == s]
        sns.barplot(data=sub, x="config", y="ppl", order=[c for c in _config_order(results) if c in set(sub.config)],
                    errorbar="sd", ax=ax, color=sns.color_palette()[0])
        order = [c for c in _config_order(results) if c in set(sub.config)]
        teal = sub.groupby("config")["sparse_ppl"].mean().reindex(order)
        ax.scatter(range(len(order)), teal.values, marker="_", s=900, color="C3", zorder=3,
                   label="TEAL, same sparsified sites")
        ax.axhline(sub["dense_ppl"].mean(), ls="--", color="k", lw=1, label="dense")
        lo = min(sub["dense_ppl"].min(), sub["ppl"].min(), sub["sparse_ppl"].min())
        ax.set_ylim(lo * 0.97, max(sub["ppl"].max(), sub["sparse_ppl"].max()) * 1.02)
        ax.set_title(f"sparsity {s:g}")
        ax.set_xlabel("")
        ax.set_ylabel("perplexity (lower is better)")
        ax.tick_params(axis="x", rotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        ax.legend(loc="upper right", fontsize=8)
    return _save(results, fig, "ppl_bars")


def damage_recovered(results: Results):
    """Damage recovered = (PPL_TEAL - PPL_SPON) / (PPL_TEAL - PPL_dense), in %, per config and sparsity."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = results.records_frame()
    df = df[df["config"] != BASELINE].copy()
    df["damage recovered (%)"] = 100.0 * df["damage_recovered"]
    df["sparsity"] = df["sparsity"].map(lambda s: f"{s:g}")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.barplot(data=df, x="config", y="damage recovered (%)", hue="sparsity", errorbar="sd", ax=ax,
                order=[c for c in _config_order(results) if c != BASELINE])
    ax.axhline(0, color="k", lw=0.8)
    order = [c for c in _config_order(results) if c != BASELINE]
    for i, c in enumerate(order):
        if df[df["config"] == c]["damage_recovered"].isna().all():
            ax.text(i, 0, "n/a: TEAL did not\nraise PPL", ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    return _save(results, fig, "damage_recovered")


def pareto(results: Results):
    """SPON parameter count vs mean PPL per config; the Pareto frontier (no cheaper config is better) joined."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    groups = results.pareto.get("by_sparsity", [])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    palette = sns.color_palette(n_colors=max(1, len(groups)))
    for gi, (color, g) in enumerate(zip(palette, groups, strict=False)):
        pts = [p for p in g["points"] if p["ppl"] is not None]
        ax.scatter([p["spon_params"] for p in pts], [p["ppl"] for p in pts], color=color, label=f"s={g['sparsity']:g}")
        for p in pts:
            ax.annotate(p["config"], (p["spon_params"], p["ppl"]), fontsize=7, xytext=(4, 3 - 9 * gi),
                        textcoords="offset points", color=color)
        front = [p for c in g["frontier"] for p in pts if p["config"] == c]
        ax.plot([p["spon_params"] for p in front], [p["ppl"] for p in front], color=color, lw=1.2, ls="--")
    ax.set_xlabel("SPON parameters")
    ax.set_ylabel("perplexity (mean over seeds)")
    ax.legend(title="frontier (dashed)")
    return _save(results, fig, "pareto")


def training_history(results: Results):
    """Long table of the training loss per step for every trained item (from the run's logs.json)."""
    import pandas as pd

    rows = []
    by_id = {r["id"]: r for r in results.records}
    for item_id, log in results.logs.items():
        rec = by_id.get(item_id)
        if rec is None:
            continue
        for point in (log or {}).get("train_history", []):
            rows.append({"config": rec["config"], "sparsity": rec["sparsity"], "seed": rec["seed"], **point})
    return pd.DataFrame(rows)


def training_curves(results: Results):
    """KL loss per training step, one line per config (band: spread over seeds), one panel per sparsity."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    hist = training_history(results)
    if hist.empty:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no trained items in this run", ha="center", va="center")
        ax.axis("off")
        return _save(results, fig, "training_curves")
    sparsities = sorted(hist["sparsity"].unique())
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5.5 * len(sparsities), 4), squeeze=False)
    for ax, s in zip(axes[0], sparsities, strict=False):
        sns.lineplot(data=hist[hist["sparsity"] == s], x="step", y="loss", hue="config", errorbar=("pi", 100), ax=ax,
                     marker="o", markersize=4)
        ax.set_yscale("log")
        ax.set_title(f"sparsity {s:g}")
        ax.legend(fontsize=7)
    return _save(results, fig, "training_curves")


def per_sparsity(results: Results):
    """Left: PPL against sparsity per config (needs two or more levels). Right: per eval block, the NLL
    difference to BASELINE-TEAL (same seed, same block; below 0 = better), one box per config and sparsity."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = results.records_frame()
    levels = sorted(df["sparsity"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), width_ratios=[1, 1.4])
    ax = axes[0]
    if len(levels) > 1:
        sns.lineplot(data=df, x="sparsity", y="ppl", hue="config", marker="o", errorbar="sd", ax=ax,
                     hue_order=_config_order(results))
        ax.axhline(df["dense_ppl"].mean(), ls="--", color="k", lw=1, label="dense")
        ax.set_xticks(levels)
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"one sparsity level ({levels[0]:g}) in this run:\nPPL vs sparsity needs two or more",
                ha="center", va="center", fontsize=9)
        ax.axis("off")
    base = {(r["sparsity"], r["seed"]): (r.get("block_nll") or {}).get("spon") for r in results.records
            if r["config"] == BASELINE}
    rows = []
    for r in results.records:
        b = base.get((r["sparsity"], r["seed"]))
        mine = (r.get("block_nll") or {}).get("spon")
        if r["config"] == BASELINE or not b or not mine or len(b) != len(mine):
            continue
        rows += [{"config": r["config"], "sparsity": f"{r['sparsity']:g}", "ΔNLL vs BASELINE-TEAL": x - y}
                 for x, y in zip(mine, b, strict=True)]
    ax = axes[1]
    if rows:
        sns.boxplot(data=pd.DataFrame(rows), x="config", y="ΔNLL vs BASELINE-TEAL", hue="sparsity", ax=ax,
                    order=[c for c in _config_order(results) if c != BASELINE], fliersize=2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30)
    else:
        ax.axis("off")
    return _save(results, fig, "per_sparsity")
