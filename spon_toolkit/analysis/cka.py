"""Linear centred kernel alignment (Kornblith et al. 2019) and its shuffled-row null."""

from __future__ import annotations

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` of column-centred ``x`` [n, d1] and ``y`` [n, d2].

    1 for identical inputs; invariant to orthogonal transforms and isotropic scaling of either side.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same rows on both sides, got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    # with n < d the n x n Gram form is cheaper; both give the same value
    if x.shape[0] < min(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        num = float(np.sum(kx * ky))
        den = float(np.linalg.norm(kx) * np.linalg.norm(ky))
    else:
        num = float(np.linalg.norm(y.T @ x) ** 2)
        den = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return num / den if den > 0 else float("nan")


def shuffled_cka(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """CKA after permuting the rows of ``y``: what two representations with the same marginal statistics but no
    token-to-token correspondence give (the chance level of :func:`linear_cka` for these data)."""
    rng = np.random.default_rng(seed)
    return linear_cka(x, np.asarray(y)[rng.permutation(len(y))])
