"""Tables and figures of a report, computed from saved results only (called from notebook cells).

Each function takes a :class:`spon_toolkit.results.Results` (``load(results_dir)``) and returns a pandas
DataFrame or a matplotlib figure. Nothing here loads a model or evaluates anything: the numbers were
computed by the run and written to the results directory, so a report can be re-executed anywhere.
Figures are also saved as PNG under the run's ``figures/`` directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..results import BASELINE, Results, load_results
from . import summary as _summary


def _short_warning(message, category, filename, lineno, line=None) -> str:
    return f"{os.path.basename(filename)}:{lineno}: {category.__name__}: {message}\n"


def load(results_dir: str) -> Results:
    """Load the results directory and set the figure style (called by a report's setup cell).

    Also makes warnings in the report name their file without its directory: a warning stays visible but
    does not print a path of the machine that built the report."""
    import warnings

    import seaborn as sns

    warnings.formatwarning = _short_warning
    sns.set_theme(style="whitegrid", context="notebook")
    return load_results(results_dir)


def _save(results: Results, fig, name: str):
    if fig.get_layout_engine() is None:  # figures built with layout="constrained" keep their engine
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


def _xticks(ax, labels: list[str]) -> None:
    """Config names under bars/boxes: horizontal when few, else slanted and right-aligned."""
    ax.set_xticks(range(len(labels)), labels)
    width = sum(max(len(line) for line in str(label).splitlines() or [""]) for label in labels)
    if len(labels) <= 5 and width <= 40:  # about 40 characters fit under a 5.5-inch panel
        ax.tick_params(axis="x", rotation=0, labelsize=9)
    else:
        ax.tick_params(axis="x", rotation=35, labelsize=9)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")


def _config_sites(results: Results) -> dict[tuple[float, str], dict[str, Any]]:
    """(sparsity, config) -> its site group (label, main or not)."""
    return {(g["sparsity"], c): g for g in _summary.site_groups(results.records) for c in g["configs"]}


def relative_paths(value: Any, results: Results) -> Any:
    """``value`` with every absolute path (a string starting with the path separator, also inside lists and
    dicts) rewritten relative to the results directory, so a report shows no path of the machine that ran it."""
    if isinstance(value, str):
        if os.path.isabs(value):
            return os.path.relpath(value, results.experiment_dir.resolve())
        return value
    if isinstance(value, dict):
        return {k: relative_paths(v, results) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, results) for v in value]
    return value


# --- summary --------------------------------------------------------------------------------------

def headline_table(results: Results):
    """Per sparsity and set of sparsified sites: dense and TEAL PPL, the config with the lowest SPON PPL,
    its damage recovered with a 95% bootstrap interval, the block-paired test against TEAL, its parameters."""
    import pandas as pd

    rows = _summary.headline_rows(results.records)
    return pd.DataFrame(rows, columns=list(_summary.HEADLINE_COLUMNS.values())).style.hide(
        axis="index").set_uuid("headline")


def summary_markdown(results: Results) -> str:
    """The generated sentences (a bullet each) followed by the one-line protocol, as Markdown."""
    source = next((r.get("protocol", {}).get("text_source") for r in results.records if r.get("protocol")), None)
    split = next((r.get("protocol", {}).get("split") for r in results.records if r.get("protocol")), None)
    if source is not None:
        source = f"`{relative_paths(source, results)}`" + (f" ({split} split)" if split else "")
    text = _summary.sentences(results.records, text_source=source)
    return "\n".join(f"- {s}" for s in text["sentences"]) + f"\n\n<small><i>{text['protocol']}</i></small>"


# --- protocol -------------------------------------------------------------------------------------

def protocol(results: Results):
    """One row per setting: model, data protocol, sparsifier, sites, trainer, seeds, environment."""
    import pandas as pd

    spec = results.config.get("spec", {})
    proto = next((r.get("protocol") for r in results.records if r.get("protocol")), {}) or {}
    model = results.config.get("model_info", {})
    spec, proto = relative_paths(spec, results), relative_paths(proto, results)
    rows: list[tuple[str, Any]] = [
        ("experiment", results.name),
        ("spec file", relative_paths(results.metadata.get("spec_file"), results)),
        ("spec hash", results.config.get("spec_hash")),
        ("run", results.run_dir.name),
        ("model", spec.get("model", {}).get("loader")),
    ]
    rows += [(f"model {k}", v) for k, v in model.items()]
    proto = {**proto, "sites": _summary.sites_label(proto.get("sites") or [])} if isinstance(
        proto.get("sites"), list) else proto
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
    frame = pd.DataFrame([(k, "-" if v is None else str(v)) for k, v in rows], columns=["setting", "value"])
    return frame.style.hide(axis="index").set_uuid("protocol").set_properties(**{"text-align": "left"}).set_table_styles(
        [{"selector": "th", "props": [("text-align", "left")]}])


# --- tables ---------------------------------------------------------------------------------------

def ppl_table(results: Results):
    """Per (sparsity, config): sparsified sites, dense / TEAL / SPON perplexity (mean ± std over seeds, 95%
    Student-t interval), damage recovered (mean ± std, 95% bootstrap interval) and the block-paired test
    against TEAL on the same sparsified sites."""
    df = results.summary_frame()
    own = {(r["sparsity"], r["config"]): r for r in _summary.vs_own_teal(results.records)}
    fp, fpct = _summary.fmt_ppl, _summary.fmt_pct

    def pm(mean, std, f):
        if mean != mean:  # NaN
            return "-"
        return f(mean) if std != std else f"{f(mean)} ± {f(std)}"

    def own_of(s, c):
        return own.get((s, c)) or {"sites": "?", "damage_ci": (None, None), "test": {}}

    keys = list(zip(df["sparsity"], df["config"], strict=True))
    out = df[["sparsity", "config"]].copy()
    out["sparsified sites"] = [own_of(s, c)["sites"] for s, c in keys]
    out["seeds"] = df["n_seeds"]
    out["SPON params"] = df["spon_params"].map(_summary.fmt_params)
    out["dense PPL"] = df["dense_ppl"].map(fp)
    out["TEAL PPL"] = df["sparse_ppl"].map(fp)  # no seed dependence: calibration and eval are shared
    out["SPON PPL"] = [pm(m, s, fp) for m, s in zip(df["ppl_mean"], df["ppl_std"], strict=True)]
    out["SPON 95% CI"] = [_summary.fmt_interval(None if lo != lo else lo, None if hi != hi else hi)
                     for lo, hi in zip(df["ppl_ci_low"], df["ppl_ci_high"], strict=True)]
    out["damage recovered %"] = [pm(m, s, fpct) for m, s in
                                 zip(df["damage_recovered_mean"], df["damage_recovered_std"], strict=True)]
    out["damage 95% interval"] = [_summary.fmt_interval(*own_of(s, c)["damage_ci"], pct=True) for s, c in keys]
    out["p vs TEAL"] = [_summary.fmt_p(own_of(s, c)["test"].get("p_value")) if c != BASELINE else "-"
                        for s, c in keys]
    out["sparsity"] = out["sparsity"].map(_summary.fmt_sparsity)
    if (out["SPON 95% CI"] == "-").all():  # one seed: no seed interval to show
        out = out.drop(columns="SPON 95% CI")
    return out.set_index(["sparsity", "config"])


def comparisons_table(results: Results):
    """Each config vs BASELINE-TEAL, paired over seeds and eval blocks (from analysis/comparisons.json)."""
    import pandas as pd

    def num(v, digits=4):
        return "-" if v is None else f"{v:.{digits}f}"

    rows = []
    for c in results.comparisons.get("comparisons", []):
        if c.get("same_sparsified_sites") is False:  # compared with its own TEAL in the PPL table instead
            continue
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
            "same sparsified sites": {True: "yes", None: "?"}[same],
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
        _xticks(ax, [_labels(results).get(c, c) for c in order])
        top = max(sub["ppl"].max(), sub["sparse_ppl"].max())
        ax.set_ylim(lo * 0.97, top + 0.35 * (top - lo * 0.97))  # head room for the legend
        ax.legend(loc="upper left", fontsize=8, ncol=2, markerscale=0.3)
    return _save(results, fig, "ppl_bars")


def damage_recovered(results: Results):
    """Damage recovered = (PPL_TEAL - PPL_SPON) / (PPL_TEAL - PPL_dense), in %, per config and sparsity,
    each against TEAL on its own sparsified sites; error bars: the 95% bootstrap interval of the summary."""
    import matplotlib.pyplot as plt

    rows = {(r["sparsity"], r["config"]): r for r in _summary.vs_own_teal(results.records) if r["spon_params"]}
    configs = [c for c in _config_order(results) if any(k[1] == c for k in rows)]
    levels = sorted({k[0] for k in rows})
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.text(0.5, 0.5, "no config with biases in this run", ha="center", va="center")
        ax.axis("off")
        return _save(results, fig, "damage_recovered")
    width = 0.8 / len(levels)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(configs) * len(levels) + 1.5), 4.2))
    for k, level in enumerate(levels):
        for i, config in enumerate(configs):
            row = rows.get((level, config))
            x = i - 0.4 + width * (k + 0.5)
            if row is None:
                continue
            dr = row["damage_recovered"]
            if dr is None:
                ax.text(x, 0, "n/a: TEAL did not\nraise PPL", ha="center", va="bottom", fontsize=7)
                continue
            ax.bar(x, 100 * dr, width * 0.9, color=f"C{k}")
            lo, hi = row["damage_ci"]
            if lo is not None:
                ax.errorbar(x, 100 * dr, yerr=[[100 * (dr - lo)], [100 * (hi - dr)]], fmt="none", color="k",
                            capsize=4, lw=1)
            ax.annotate(f"{_summary.fmt_pct(dr)}%", (x, 100 * dr), xytext=(4, 3 if dr >= 0 else -12),
                        textcoords="offset points", ha="left", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlim(-0.6, len(configs) - 0.4)
    ax.set_ylabel("damage recovered (%)")
    _xticks(ax, [_labels(results).get(c, c) for c in configs])
    if len(levels) > 1:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=f"C{k}", label=f"sparsity {level:g}") for k, level in enumerate(levels)],
                  fontsize=8)
    return _save(results, fig, "damage_recovered")


def _grid(n: int, width: float, height: float, cols: int = 3):
    """``n`` panels, at most ``cols`` per row; panels beyond ``n`` are removed (no empty panel)."""
    import matplotlib.pyplot as plt

    ncols = min(n, cols)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        fig.delaxes(ax)
    return fig, flat[:n]


def pareto(results: Results):
    """SPON parameter count vs mean PPL, one panel per sparsity and set of sparsified sites; the dashed line
    joins the frontier (no cheaper config does better). Configs that sparsify other sites get their own
    panel with their own TEAL point at zero parameters."""
    groups = [g for g in _summary.pareto_groups(results.records)
              if any(p["ppl"] is not None for p in g["points"])]
    fig, axes = _grid(max(1, len(groups)), 5.6, 4.2, cols=2)
    for ax, g in zip(axes, groups, strict=False):
        pts = [p for p in g["points"] if p["ppl"] is not None]
        front = [p for c in g["frontier"] for p in pts if p["config"] == c]
        ax.plot([p["spon_params"] for p in front], [p["ppl"] for p in front], color="C0", lw=1.2, ls="--",
                zorder=1, label="frontier")
        xmax = max(p["spon_params"] for p in pts) or 1
        for p in pts:
            on = p["config"] in g["frontier"]
            ax.scatter([p["spon_params"]], [p["ppl"]], color="C0" if on else "0.55", zorder=2,
                       marker="o" if p["spon_params"] else "s")
            right = p["spon_params"] > 0.6 * xmax  # labels of right-hand points go to their left
            ax.annotate(p["config"], (p["spon_params"], p["ppl"]), fontsize=8, xytext=(-6 if right else 6, 4),
                        textcoords="offset points", ha="right" if right else "left",
                        color="0.15" if on else "0.45")
        if g["dense_ppl"] is not None:
            ax.axhline(g["dense_ppl"], ls=":", color="k", lw=1, label="dense")
        ax.set_title(f"sparsity {g['sparsity']:g}: {g['label']} sparsified", fontsize=10)
        ax.set_xlabel("SPON parameters")
        ax.set_ylabel("perplexity (mean over seeds)")
        ax.set_xlim(-0.08 * xmax, 1.08 * xmax)
        ax.margins(y=0.15)
        ax.legend(fontsize=8, loc="best")
    if not groups:
        axes[0].text(0.5, 0.5, "no finished configs", ha="center", va="center")
        axes[0].axis("off")
    return _save(results, fig, "pareto")


def pareto_table(results: Results):
    """The points of every frontier group: config, SPON parameters, mean PPL and whether it is on the
    frontier of its (sparsity, sparsified sites) group."""
    import pandas as pd

    rows = []
    for g in _summary.pareto_groups(results.records):
        for p in g["points"]:
            rows.append({"sparsity": _summary.fmt_sparsity(g["sparsity"]), "sparsified sites": g["label"],
                         "config": p["config"], "SPON params": _summary.fmt_params(p["spon_params"]),
                         "PPL": _summary.fmt_ppl(p["ppl"]),
                         "on frontier": "yes" if p["config"] in g["frontier"] else "no"})
    return pd.DataFrame(rows).style.hide(axis="index").set_uuid("pareto") if rows else pd.DataFrame()


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
        losses = hist[hist["sparsity"] == s]["loss"]
        if losses.min() > 0 and losses.max() / losses.min() > 10:  # log scale only where it spans decades
            ax.set_yscale("log")
        ax.set_title(f"sparsity {s:g}")
        ax.legend(fontsize=7)
    return _save(results, fig, "training_curves")


def per_sparsity(results: Results):
    """Per eval block, the NLL difference of each config to TEAL on the same sparsified sites (same seed,
    same block, averaged over seeds; below 0 = the biases help), one box per config and sparsity; with two
    or more sparsity levels, a first panel of PPL against sparsity (one line per config)."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = results.records_frame()
    levels = sorted(df["sparsity"].unique())
    labels = _labels(results)
    rows = []
    for r in results.records:
        mine, teal = (r.get("block_nll") or {}).get("spon"), (r.get("block_nll") or {}).get("sparse")
        if not r.get("spon_params") or not mine or not teal or len(mine) != len(teal):
            continue
        rows += [{"config": labels.get(r["config"], r["config"]), "sparsity": f"{r['sparsity']:g}", "seed": r["seed"],
                  "block": i, "ΔNLL vs own TEAL": x - y} for i, (x, y) in enumerate(zip(mine, teal, strict=True))]
    blocks = pd.DataFrame(rows)
    if not blocks.empty:  # paired by block: average over seeds first (the blocks are shared by seeds)
        blocks = blocks.groupby(["config", "sparsity", "block"], as_index=False, sort=False)["ΔNLL vs own TEAL"].mean()
    panels = (len(levels) > 1) + (not blocks.empty)
    if panels == 0:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.text(0.5, 0.5, "one sparsity level and no config with biases: nothing to compare", ha="center",
                va="center")
        ax.axis("off")
        return _save(results, fig, "per_sparsity")
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.4), squeeze=False, layout="constrained")
    axes = list(axes[0])
    if len(levels) > 1:
        ax = axes.pop(0)
        groups = _config_sites(results)
        lines = df.assign(**{"sparsified sites": [groups[(s_, c)]["label"] for s_, c in zip(df["sparsity"], df["config"],
                                                                                             strict=True)]})
        # configs that sparsify other sites are dashed and named with their sites: not on the same footing
        sns.lineplot(data=lines, x="sparsity", y="ppl", hue="config", style="sparsified sites", marker="o",
                     errorbar="sd", err_style="bars", ax=ax, hue_order=_config_order(results))
        ax.axhline(df["dense_ppl"].mean(), ls=":", color="k", lw=1, label="dense")
        ax.set_xticks(levels)
        ax.set_ylabel("SPON perplexity")
        ax.set_title("perplexity against sparsity", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if not blocks.empty:
        ax = axes.pop(0)
        order = [labels.get(c, c) for c in _config_order(results) if labels.get(c, c) in set(blocks["config"])]
        sns.boxplot(data=blocks, x="config", y="ΔNLL vs own TEAL", hue="sparsity" if len(levels) > 1 else None,
                    ax=ax, order=order, fliersize=2, width=0.5 if len(levels) == 1 else 0.8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("")
        ax.set_ylabel("ΔNLL per token vs TEAL, same sites")
        ax.set_title("per eval block (mean over seeds); below 0 = biases help", fontsize=10)
        _xticks(ax, order)
    return _save(results, fig, "per_sparsity")


def _labels(results: Results) -> dict[str, str]:
    """Config name -> axis label; configs that sparsify other sites than the main set say which."""
    out: dict[str, str] = {}
    for (_, config), g in _config_sites(results).items():
        if not g["main"]:
            out[config] = f"{config}\n({g['label']} sparsified)"
    return out
