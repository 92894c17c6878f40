"""PCA alignment of a bias with the activations it is added to, and what a random direction gets."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


def top_components(acts: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The top-``k`` principal directions (rows, unit norm) of ``acts`` [n, d] and their explained-variance ratios."""
    from sklearn.decomposition import PCA

    acts = np.asarray(acts, dtype=np.float64)
    n, d = acts.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k={k} principal components need k <= min(samples, dimension) = {min(n, d)}")
    pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(acts)
    return pca.components_, pca.explained_variance_ratio_


def abs_cosines(vector: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """|cos| between ``vector`` [d] and each row of ``directions`` [k, d]."""
    v = np.asarray(vector, dtype=np.float64)
    u = np.asarray(directions, dtype=np.float64)
    norm = np.linalg.norm(v) * np.linalg.norm(u, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(u @ v) / norm


@functools.lru_cache(maxsize=16)
def random_max_cos(d: int, k: int, n_samples: int = 20000, seed: int = 0) -> np.ndarray:
    """Samples of ``max_j |cos(r, u_j)|`` for an isotropic random direction ``r`` in ``d`` dimensions and any ``k``
    orthonormal directions ``u_j``.

    Exact in distribution: by rotation invariance the projections of a uniform unit vector on ``k`` orthonormal
    directions are its first ``k`` coordinates, ``g_j / ||g||`` with ``g ~ N(0, I_d)``; ``||g||^2`` is the sum of
    ``g_1^2..g_k^2`` and an independent chi-square with ``d - k`` degrees of freedom.
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_samples, k))
    rest = rng.chisquare(d - k, n_samples) if d > k else np.zeros(n_samples)
    out = np.abs(g).max(axis=1) / np.sqrt((g ** 2).sum(axis=1) + rest)
    out.flags.writeable = False  # cached: shared between callers
    return out


def single_cos_null(d: int) -> dict[str, float]:
    """Exact null of ``|cos|`` between a random direction and ONE fixed direction in ``d`` dimensions:
    ``cos^2 ~ Beta(1/2, (d-1)/2)``; mean ``Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))`` (about ``sqrt(2/(pi d))``)."""
    from scipy import special, stats

    mean = float(np.exp(special.gammaln(d / 2) - special.gammaln((d + 1) / 2)) / np.sqrt(np.pi))
    p95 = float(np.sqrt(stats.beta.ppf(0.95, 0.5, (d - 1) / 2)))
    return {"mean": mean, "p95": p95}


def variance_ratio(vector: np.ndarray, cov: np.ndarray) -> float:
    """``v_hat^T C v_hat / (tr C / d)``: activation variance along ``v`` relative to the average direction (1 for a
    random direction in expectation)."""
    v = np.asarray(vector, dtype=np.float64)
    v = v / np.linalg.norm(v)
    c = np.asarray(cov, dtype=np.float64)
    return float(v @ c @ v / (np.trace(c) / c.shape[0]))


def random_variance_ratios(cov: np.ndarray, n_samples: int = 2000, seed: int = 0) -> np.ndarray:
    """:func:`variance_ratio` of ``n_samples`` isotropic random directions (the null of the variance ratio)."""
    rng = np.random.default_rng(seed)
    c = np.asarray(cov, dtype=np.float64)
    r = rng.standard_normal((n_samples, c.shape[0]))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    return ((r @ c) * r).sum(axis=1) / (np.trace(c) / c.shape[0])


def alignment(vector: np.ndarray, acts: np.ndarray, k: int = 10, *, n_null: int = 20000,
              seed: int = 0) -> dict[str, Any]:
    """Everything :mod:`pca_alignment` reports for one site: per-component |cos|, their max, the random-direction
    null of the max (mean, 95th percentile, p-value of the observed max), the variance ratio and its null."""
    acts = np.asarray(acts, dtype=np.float64)
    d = acts.shape[1]
    comps, evr = top_components(acts, k, seed)
    cos = abs_cosines(vector, comps)
    null = random_max_cos(d, k, n_null, seed)
    cov = np.cov(acts, rowvar=False)
    vr_null = random_variance_ratios(cov, min(n_null, 2000), seed)
    observed = float(np.max(cos))
    vr = variance_ratio(vector, cov)
    return {
        "dim": d, "k": k, "n_samples": int(acts.shape[0]),
        "abs_cos": [float(x) for x in cos], "explained_variance_ratio": [float(x) for x in evr],
        "max_abs_cos": observed, "argmax_component": int(np.argmax(cos)),
        "null_max_abs_cos_mean": float(null.mean()), "null_max_abs_cos_p95": float(np.quantile(null, 0.95)),
        "p_value": float((1 + np.sum(null >= observed)) / (1 + null.size)),
        "null_single_cos": single_cos_null(d),
        "variance_ratio": vr, "null_variance_ratio_mean": float(vr_null.mean()),
        "null_variance_ratio_p05": float(np.quantile(vr_null, 0.05)),
        "null_variance_ratio_p95": float(np.quantile(vr_null, 0.95)),
    }
