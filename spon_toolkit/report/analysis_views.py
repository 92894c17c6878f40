"""Tables and figures of the analyzer answers, read from ``analysis/<analyzer>.json`` (no model, no compute).

``bundle(R)`` accepts a loaded experiment (:class:`spon_toolkit.results.Results`) or the output directory of
``spon analyze``; both hold ``analysis/<analyzer>.json`` (``{"scope": "item", "items": {id: answer}}`` or
``{"scope": "sweep", "result": answer}``). Figures are also saved as PNG under the matching ``figures/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Bundle:
    analyses: dict[str, Any]
    figures_dir: Path | None

    def items(self, name: str) -> dict[str, Any]:
        payload = self.analyses.get(name) or {}
        return {k: v for k, v in (payload.get("items") or {}).items() if not v.get("skipped")}

    def result(self, name: str) -> dict[str, Any]:
        return (self.analyses.get(name) or {}).get("result") or {}


def bundle(R) -> Bundle:
    if isinstance(R, (str, Path)):
        root, figures = Path(R), Path(R) / "figures"
    else:
        root, figures = R.experiment_dir, R.run_dir / "figures"
    analyses = {}
    for path in sorted((root / "analysis").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("scope") in ("item", "sweep"):
            analyses[path.stem] = data
    return Bundle(analyses, figures if figures.is_dir() else None)


def has(R, name: str) -> bool:
    return name in bundle(R).analyses


def _short(item_id: str) -> str:
    return item_id.split("::", 1)[-1]


def _save(A: Bundle, fig, name: str):
    fig.tight_layout()
    if A.figures_dir is not None:
        fig.savefig(A.figures_dir / f"{name}.png", dpi=110, metadata={"Software": None})
    return fig


def _f(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


# --- pca_alignment ----------------------------------------------------------------------------------------

def pca_table(A: Bundle):
    import pandas as pd

    rows = []
    for item, a in A.items("pca_alignment").items():
        s = a["summary"]
        rows.append({"item": _short(item), "mean max|cos|": s["mean_max_abs_cos"], "largest max|cos|": s["max_max_abs_cos"],
                     "null mean": s["null_max_abs_cos_mean"], "null p95": s["null_max_abs_cos_p95"],
                     "sites above null p95": s["fraction_above_null_p95"],
                     "variance ratio (null 1)": s["mean_variance_ratio"], "k": a["protocol"]["k"],
                     "tokens": a["protocol"]["tokens"]})
    return pd.DataFrame(rows).set_index("item") if rows else pd.DataFrame()


def pca_heatmap(A: Bundle):
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    items = A.items("pca_alignment")
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 5), squeeze=False)
    for ax, (item, a) in zip(axes[0], items.items(), strict=True):
        sites = sorted(a["sites"], key=lambda s: a["sites"][s]["layer"])
        mat = np.array([a["sites"][s]["abs_cos"] for s in sites])
        p95 = np.mean([a["sites"][s]["null_single_cos"]["p95"] for s in sites])
        sns.heatmap(mat, ax=ax, cmap="viridis", vmin=0, vmax=max(0.2, float(mat.max())),
                    yticklabels=[a["sites"][s]["layer"] for s in sites], cbar_kws={"label": "|cos|"})
        ax.set(title=f"{_short(item)}\n(one-direction null p95 {p95:.3f})", xlabel="principal component",
               ylabel="layer")
    return _save(A, fig, "pca_alignment")


# --- bias_statistics --------------------------------------------------------------------------------------

def bias_table(A: Bundle):
    import pandas as pd

    rows = []
    for item, a in A.items("bias_statistics").items():
        for site, v in a["sites"].items():
            rows.append({"item": _short(item), "site": site, "layer": v["layer"], "L2": v["l2_norm"],
                         "mean": v["mean"], "std": v["std"], "max|b|": v["max_abs"],
                         "excess kurtosis": v["excess_kurtosis"],
                         "Gaussian band": f"[{v['null_kurtosis_gaussian_p025']:.2f}, {v['null_kurtosis_gaussian_p975']:.2f}]",
                         "positive": v["positive_fraction"], "cos to init": v.get("cos_to_init"),
                         "rel. change from init": v.get("rel_change_from_init")})
    return pd.DataFrame(rows)


def bias_summary(A: Bundle):
    import pandas as pd

    rows = [{"item": _short(i), **a["summary"]} for i, a in A.items("bias_statistics").items()]
    return pd.DataFrame(rows).set_index("item") if rows else pd.DataFrame()


def bias_trend(A: Bundle):
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = bias_table(A)
    cols = [c for c in ("L2", "excess kurtosis", "cos to init") if c in df and df[c].notna().any()]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.5 * len(cols), 3.6), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        sns.lineplot(df, x="layer", y=col, hue="item", marker="o", ax=ax)
        ax.set_title(f"{col} over depth")
        if ax.get_legend() is not None and col != cols[-1]:
            ax.get_legend().remove()
    return _save(A, fig, "bias_statistics")


# --- hidden_state_shift -----------------------------------------------------------------------------------

def shift_table(A: Bundle):
    import pandas as pd

    rows = []
    for item, a in A.items("hidden_state_shift").items():
        o = a["output"]
        rows.append({"item": _short(item), "KL sparse": o["kl_sparse"]["mean"], "KL sparse+SPON": o["kl_spon"]["mean"],
                     "KL recovery": o["kl_recovery"],
                     "KL recovery 95% CI": f"[{_f(o['kl_recovery_ci']['ci_low'])}, {_f(o['kl_recovery_ci']['ci_high'])}]",
                     "top-1 sparse": o["top1_sparse"]["mean"], "top-1 sparse+SPON": o["top1_spon"]["mean"],
                     "mean layer recovery": a["summary"]["mean_recovery"],
                     "layers further from dense": a["summary"]["n_layers_further_from_dense"],
                     "blocks": a["protocol"]["blocks"]})
    return pd.DataFrame(rows).set_index("item") if rows else pd.DataFrame()


def shift_plot(A: Bundle):
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = []
    for item, a in A.items("hidden_state_shift").items():
        for lay in a["layers"]:
            for mode, key in (("sparse", "shift_sparse"), ("sparse+SPON", "shift_spon")):
                rows.append({"item": _short(item), "layer": lay["layer"], "model": mode, "shift": lay[key]["mean"]})
            rows.append({"item": _short(item), "layer": lay["layer"], "model": "recovery", "shift": lay["recovery"]})
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(df[df.model != "recovery"], x="layer", y="shift", hue="item", style="model", ax=axes[0])
    axes[0].set(title="||h - h_dense|| / ||h_dense||", ylabel="relative distance")
    sns.lineplot(df[df.model == "recovery"], x="layer", y="shift", hue="item", marker="o", ax=axes[1])
    axes[1].axhline(0, color="k", lw=0.8, ls="--")
    axes[1].set(title="recovery 1 - shift(SPON) / shift(sparse)  (0 = biases change nothing)", ylabel="recovery")
    return _save(A, fig, "hidden_state_shift")


# --- category_probes --------------------------------------------------------------------------------------

def category_table(A: Bundle):
    import pandas as pd

    rows = []
    for item, a in A.items("category_probes").items():
        test = a["kl_recovery_test"]
        for cat, c in a["categories"].items():
            g = test.get("per_group", {}).get(cat, {})
            rows.append({"item": _short(item), "category": cat, "prompts": c["n_prompts"],
                         "PPL dense": c["ppl_dense"], "PPL sparse": c["ppl_sparse"], "PPL sparse+SPON": c["ppl_spon"],
                         "KL sparse": c["kl_sparse"], "KL sparse+SPON": c["kl_spon"],
                         "mean KL recovery": g.get("mean"), "p (vs rest)": g.get("p_value"),
                         "min CKA sparse": c["min_cka_sparse"], "min CKA sparse+SPON": c["min_cka_spon"],
                         "CKA null (shuffled)": min(r["cka_null"] for r in c["layers"])})
    return pd.DataFrame(rows)


def category_test(A: Bundle):
    import pandas as pd

    rows = [{"item": _short(i), "ANOVA F": a["kl_recovery_test"]["f"], "permutation p": a["kl_recovery_test"]["p_value"],
             "resamples": a["kl_recovery_test"].get("n_resamples")} for i, a in A.items("category_probes").items()]
    return pd.DataFrame(rows).set_index("item") if rows else pd.DataFrame()


def probe_table(A: Bundle):
    import pandas as pd

    rows = []
    for item, a in A.items("category_probes").items():
        for p in a["probes"]:
            row = {"item": _short(item), "layer": p["layer"]}
            for m, label in (("dense", "dense"), ("sparse", "sparse"), ("spon", "sparse+SPON")):
                row[f"acc {label}"] = p[m]["accuracy"]
            row["shuffled labels"] = p["dense"]["shuffled_accuracy_mean"]
            row["majority class"] = p["dense"]["chance"]
            rows.append(row)
    return pd.DataFrame(rows)


def cka_plot(A: Bundle):
    import pandas as pd
    import seaborn as sns

    rows = []
    for item, a in A.items("category_probes").items():
        for cat, c in a["categories"].items():
            for r in c["layers"]:
                rows += [{"item": _short(item), "category": cat, "layer": r["layer"], "model": "sparse",
                          "1 - CKA": 1 - r["cka_sparse"]},
                         {"item": _short(item), "category": cat, "layer": r["layer"], "model": "sparse+SPON",
                          "1 - CKA": 1 - r["cka_spon"]}]
    df = pd.DataFrame(rows)
    g = sns.relplot(df, x="layer", y="1 - CKA", hue="category", style="model", col="item", kind="line",
                    height=3.4, aspect=1.2, facet_kws={"sharey": True})
    g.set(yscale="log")
    g.figure.suptitle("1 - linear CKA to dense, per category (log scale)", y=1.03)
    return _save(A, g.figure, "category_cka")


# --- cross_config -----------------------------------------------------------------------------------------

def cross_table(A: Bundle):
    import pandas as pd

    rows = []
    for p in A.result("cross_config").get("pairs", []):
        rows.append({"a": _short(p["a"]), "b": _short(p["b"]), "kind": p["kind"], "shared sites": p["n_shared_sites"],
                     "mean cos": p["mean_cos"], "noise floor cos": p.get("noise_floor_cos"),
                     "mean cos of updates": p.get("mean_cos_update"),
                     "noise floor (updates)": p.get("noise_floor_cos_update"),
                     "rel. L2 diff": p["mean_rel_l2_diff"],
                     "sites below floor": p.get("fraction_sites_below_floor_cos")})
    return pd.DataFrame(rows)
