"""Linear probes: can a category be read off a representation, and what do shuffled labels give?"""

from __future__ import annotations

from typing import Any

import numpy as np


def probe_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, *, folds: int = 5,
                   n_shuffles: int = 3, seed: int = 0, max_iter: int = 200) -> dict[str, Any]:
    """Cross-validated accuracy of a standardised multinomial logistic regression predicting ``y`` from ``x``.

    ``groups`` (e.g. the prompt of each token) keep all rows of one group in the same fold, so tokens of a test
    prompt are never seen in training. The null is the same procedure on shuffled labels (shuffled per group when
    ``groups`` is given), ``n_shuffles`` times; ``chance`` is the majority-class rate.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    min_class = min(np.unique(y, return_counts=True)[1]) if groups is None else min(
        len(np.unique(groups[y == c])) for c in np.unique(y))
    k = max(2, min(folds, int(min_class)))

    def score(labels):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the cost; accuracy is what counts
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, tol=1e-3))
        if groups is None:
            cv = StratifiedKFold(k, shuffle=True, random_state=seed)
            return float(cross_val_score(model, x, labels, cv=cv).mean())
        cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
        return float(cross_val_score(model, x, labels, cv=cv, groups=groups).mean())

    acc = score(y)
    null = []
    for _ in range(n_shuffles):
        if groups is None:
            null.append(score(rng.permutation(y)))
        else:
            ug = np.unique(groups)
            first = {g: y[groups == g][0] for g in ug}
            perm = dict(zip(ug, rng.permutation([first[g] for g in ug]), strict=True))
            null.append(score(np.array([perm[g] for g in groups])))
    _, counts = np.unique(y, return_counts=True)
    return {"accuracy": acc, "shuffled_accuracy_mean": float(np.mean(null)) if null else float("nan"),
            "shuffled_accuracy_max": float(np.max(null)) if null else float("nan"),
            "chance": float(counts.max() / counts.sum()), "folds": k, "n_rows": int(len(y)),
            "n_shuffles": n_shuffles}
