"""Bias statistics and tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def excess_kurtosis(values: np.ndarray) -> float:
    """``E[(x - mu)^4] / sigma^4 - 3`` (scipy's Fisher definition, population moments); never below -2."""
    from scipy import stats

    return float(stats.kurtosis(np.asarray(values, dtype=np.float64), fisher=True, bias=True))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float("nan")


def gaussian_kurtosis_band(n: int, n_samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """2.5th and 97.5th percentile of the sample excess kurtosis of ``n`` i.i.d. Gaussian values (the null)."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    k = stats.kurtosis(rng.standard_normal((n_samples, n)), axis=1, fisher=True, bias=True)
    return float(np.quantile(k, 0.025)), float(np.quantile(k, 0.975))


def bias_statistics(bias: np.ndarray, init: np.ndarray | None = None) -> dict[str, Any]:
    """L2 norm, mean, std, max |value|, excess kurtosis, positive fraction and (with ``init``) the cosine with the
    initial bias and the relative distance travelled ``||b - b0|| / ||b0||``."""
    b = np.asarray(bias, dtype=np.float64)
    out = {
        "dim": int(b.size), "l2_norm": float(np.linalg.norm(b)), "mean": float(b.mean()), "std": float(b.std()),
        "max_abs": float(np.abs(b).max()), "excess_kurtosis": excess_kurtosis(b),
        "positive_fraction": float(np.mean(b > 0)),
    }
    if init is not None:
        b0 = np.asarray(init, dtype=np.float64)
        out["cos_to_init"] = cosine(b, b0)
        n0 = np.linalg.norm(b0)
        out["rel_change_from_init"] = float(np.linalg.norm(b - b0) / n0) if n0 > 0 else float("nan")
    return out


def permutation_test(values: Sequence[float], labels: Sequence[Any], n_resamples: int = 2000,
                     seed: int = 0) -> dict[str, Any]:
    """Do the groups of ``values`` differ? One-way ANOVA F statistic with a permutation p-value (labels shuffled),
    and each group against the rest (difference of means, two-sided permutation p-value)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    y = np.asarray(labels)
    keep = np.isfinite(x)
    x, y = x[keep], y[keep]
    groups = list(dict.fromkeys(y.tolist()))
    rng = np.random.default_rng(seed)
    if len(groups) < 2:
        return {"statistic": "anova_f", "f": float("nan"), "p_value": float("nan"), "per_group": {}}

    def f_stat(lbl):
        return stats.f_oneway(*[x[lbl == g] for g in groups]).statistic

    f_obs = float(f_stat(y))
    perms = [rng.permutation(y) for _ in range(n_resamples)]
    f_null = np.array([f_stat(p) for p in perms])
    per_group = {}
    for g in groups:
        d_obs = x[y == g].mean() - x[y != g].mean()
        d_null = np.array([x[p == g].mean() - x[p != g].mean() for p in perms])
        per_group[str(g)] = {"n": int(np.sum(y == g)), "mean": float(x[y == g].mean()),
                             "diff_vs_rest": float(d_obs),
                             "p_value": float((1 + np.sum(np.abs(d_null) >= abs(d_obs))) / (1 + n_resamples))}
    return {"statistic": "anova_f", "f": f_obs, "n_resamples": n_resamples,
            "p_value": float((1 + np.sum(f_null >= f_obs)) / (1 + n_resamples)), "per_group": per_group,
            "method": "labels permuted; per-group p-values two-sided, difference of means vs the rest, "
                      "not corrected for multiple comparisons"}
