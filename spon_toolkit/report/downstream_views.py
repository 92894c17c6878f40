"""Report tables of the downstream (lm-eval) numbers stored in item records: no model, no lm-eval needed."""

from __future__ import annotations

from pathlib import Path

from ..lmeval import CONDITIONS


def downstream_frame(results_dir: str | Path):
    """A table of every item's downstream numbers (task, metric, dense, sparse, SPON, stderrs) for reports."""
    import pandas as pd

    from ..results import load_results

    rows = []
    for rec in load_results(results_dir).records:
        ds = rec.get("downstream") or {}
        for r in ds.get("table", []):
            rows.append({"config": rec.get("config"), "sparsity": rec.get("sparsity"), "seed": rec.get("seed"),
                         "task": r["task"], "metric": r["metric"], "n": r.get("n"),
                         **{c: r.get(c) for c in CONDITIONS}, **{f"{c} stderr": r.get(f"{c}_stderr") for c in CONDITIONS},
                         "stderr source": r.get("stderr_source")})
    return pd.DataFrame(rows)


def downstream_paired_frame(results_dir: str | Path):
    """Paired differences between conditions (same documents) for every item."""
    import pandas as pd

    from ..results import load_results

    rows = []
    for rec in load_results(results_dir).records:
        for p in (rec.get("downstream") or {}).get("paired", []):
            rows.append({"config": rec.get("config"), "sparsity": rec.get("sparsity"), "seed": rec.get("seed"), **p})
    return pd.DataFrame(rows)
