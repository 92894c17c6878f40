"""What an SAE says about a bias: reconstruction quality, sparse decomposition against random vectors,
feature restoration after sparsification, and the contexts that activate a feature."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..sites import SiteMap
from .spaces import BiasSpace, collect_activations, space_hooks
from .training import encode


@torch.no_grad()
def _nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-block mean next-token NLL ``[N]`` (float64)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        batch = ids[i:i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].to(torch.float32)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        out.append(loss.reshape(batch.shape[0], -1).mean(1).to("cpu", torch.float64))
    return torch.cat(out)


@torch.no_grad()
def sae_quality(sae, model: nn.Module, sitemap: SiteMap, space: BiasSpace, ids: torch.Tensor, *,
                skip_first: int = 1, batch_size: int = 8, acts: torch.Tensor | None = None,
                progress: bool | None = None) -> dict[str, Any]:
    """Quality of ``sae`` on held-out blocks ``ids``: FVU, L0, dead-feature fraction and the change in
    next-token loss when the reconstruction replaces the activation (positions >= ``skip_first``), with the
    same change for mean ablation (the activation replaced by its mean) as the reference.

    ``fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``; ``l0`` = mean active features per token;
    ``dead_fraction`` = share of features never active on these tokens;
    ``loss_recovered = (loss_mean_ablated - loss_spliced) / (loss_mean_ablated - loss_dense)``.
    """
    if acts is None:
        acts = collect_activations(model, sitemap, [space], ids, skip_first=skip_first, batch_size=batch_size,
                                   progress=progress)[space.name]
    x = acts.reshape(-1, acts.shape[-1]).to(torch.float32)
    f = encode(sae, x)
    x_hat = torch.cat([sae.decode(f[i:i + 4096]) for i in range(0, f.shape[0], 4096)]).to(torch.float32)
    mean = x.mean(0)
    fvu = float(((x - x_hat) ** 2).sum() / ((x - mean) ** 2).sum().clamp_min(1e-30))
    active = f != 0
    l0 = float(active.sum(1).to(torch.float64).mean())
    fired = active.any(0)
    dead = float(1.0 - fired.to(torch.float64).mean())

    def splice(replacement: Callable[[torch.Tensor], torch.Tensor]):
        def fn(sp: BiasSpace, h: torch.Tensor) -> torch.Tensor:
            new = h.clone()
            new[:, skip_first:] = replacement(h[:, skip_first:].to(torch.float32)).to(h.dtype)
            return new
        return fn

    def reconstruct(h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        return sae.decode(sae.encode(h.reshape(-1, shape[-1]))).reshape(shape)

    dense = _nll(model, ids, batch_size)
    with space_hooks(model, sitemap, [space], splice(reconstruct)):
        spliced = _nll(model, ids, batch_size)
    with space_hooks(model, sitemap, [space], splice(lambda h: mean.to(h.device).expand_as(h))):
        ablated = _nll(model, ids, batch_size)
    d_dense, d_spliced, d_ablated = float(dense.mean()), float(spliced.mean()), float(ablated.mean())
    diff = (spliced - dense).numpy()
    gap = d_ablated - d_dense
    return {
        "fvu": fvu, "l0": l0, "dead_fraction": dead, "n_features": int(f.shape[1]), "n_tokens": int(x.shape[0]),
        "loss_dense": d_dense, "loss_spliced": d_spliced, "loss_mean_ablated": d_ablated,
        "delta_loss": d_spliced - d_dense, "delta_loss_ci95": _t_interval(diff),
        "loss_recovered": (d_ablated - d_spliced) / gap if gap > 0 else float("nan"),
        "n_blocks": int(len(ids)), "skip_first": skip_first,
    }


def _t_interval(values) -> list[float]:
    """95% Student-t interval of the mean of ``values`` (NaNs when fewer than two)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return [float("nan"), float("nan")]
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return [float(v.mean() - half), float(v.mean() + half)]


def _omp(directions, targets, n: int):
    """Orthogonal matching pursuit (scikit-learn) of each column of ``targets`` ``[d, m]`` on
    ``directions`` ``[width, d]`` with ``n`` atoms: returns coefficients ``[m, width]``."""
    import numpy as np
    from sklearn.linear_model import OrthogonalMatchingPursuit

    X = np.asarray(directions, dtype=np.float64).T
    Y = np.asarray(targets, dtype=np.float64)
    n = min(n, X.shape[1], X.shape[0])
    omp = OrthogonalMatchingPursuit(n_nonzero_coefs=n, fit_intercept=False, precompute=True)
    omp.fit(X, Y)
    return np.atleast_2d(omp.coef_)


def explained_fractions(directions, vectors, ns: Sequence[int] = (1, 5, 20)) -> dict[int, Any]:
    """For each ``n``: ``1 - ||v - v_hat_n||^2 / ||v||^2`` per vector (rows of ``vectors`` ``[m, d]``), where
    ``v_hat_n`` is the OMP approximation with ``n`` decoder directions."""
    import numpy as np

    V = np.asarray(vectors, dtype=np.float64)
    D = np.asarray(directions, dtype=np.float64)
    out = {}
    for n in ns:
        coef = _omp(D, V.T, n)
        resid = V - coef @ D
        out[int(n)] = 1.0 - (resid ** 2).sum(1) / np.maximum((V ** 2).sum(1), 1e-300)
    return out


def decompose_bias(directions, bias, *, ns: Sequence[int] = (1, 5, 20), top: int = 10, n_null: int = 200,
                   null_cov=None, seed: int = 0) -> dict[str, Any]:
    """Sparse decomposition of ``bias`` on unit decoder directions ``[width, d]`` by OMP.

    Returns the ``top`` features of the ``max(ns)``-atom fit (index, weight, cosine with the bias, share of
    the squared norm of the weighted atom), the explained squared-norm fraction for each ``n`` and, as the
    null, the same fraction for ``n_null`` isotropic random vectors of equal norm (and for random vectors
    drawn from the activation covariance ``null_cov`` when given): mean, 95th percentile and the empirical
    p-value ``(1 + #null >= observed) / (1 + n_null)``.
    """
    import numpy as np

    D = np.asarray(directions, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(b))
    if norm == 0.0:
        return {"norm": 0.0, "top_features": [], "explained": {}, "note": "zero bias: nothing to decompose"}
    nmax = max(ns)
    coef = _omp(D, b[:, None], nmax)[0]
    order = [int(i) for i in np.argsort(-np.abs(coef)) if coef[i] != 0][:top]
    cos = D @ b / norm
    top_features = [{"feature": i, "weight": float(coef[i]), "cosine": float(cos[i]),
                     "share": float(coef[i] ** 2 / norm ** 2)} for i in order]
    observed = {n: float(v[0]) for n, v in explained_fractions(D, b[None, :], ns).items()}
    rng = np.random.default_rng([seed, 0x5AE])  # its own stream, never the caller's seed-0 stream
    nulls: dict[str, Any] = {}
    samples = {"isotropic": rng.standard_normal((n_null, b.size))}
    if null_cov is not None:
        C = np.asarray(null_cov, dtype=np.float64)
        w, U = np.linalg.eigh((C + C.T) / 2)
        samples["activation_covariance"] = rng.standard_normal((n_null, b.size)) @ (U * np.sqrt(np.clip(w, 0, None))).T
    explained: dict[str, Any] = {}
    for name, R in samples.items():
        R = R / np.linalg.norm(R, axis=1, keepdims=True) * norm
        fr = explained_fractions(D, R, ns)
        nulls[name] = {n: fr[n] for n in ns}
    for n in ns:
        row = {"observed": observed[n]}
        for name, fr in nulls.items():
            v = fr[n]
            row[f"null_{name}_mean"] = float(v.mean())
            row[f"null_{name}_p95"] = float(np.quantile(v, 0.95))
            row[f"null_{name}_p"] = float((1 + (v >= observed[n]).sum()) / (1 + v.size))
        explained[str(n)] = row
    max_cos = float(np.abs(cos).max())
    iso = np.abs(D @ (samples["isotropic"] / np.linalg.norm(samples["isotropic"], axis=1, keepdims=True)).T).max(0)
    return {"norm": norm, "n_atoms": nmax, "top_features": top_features, "explained": explained,
            "max_abs_cosine": max_cos, "max_abs_cosine_null_mean": float(iso.mean()),
            "max_abs_cosine_null_p95": float(np.quantile(iso, 0.95)), "n_null": int(n_null)}


def feature_restoration(dense, sparse, spon, *, null=None, top: int = 10, alpha: float = 0.05,
                        n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Which SAE features sparsification moves and how much of that the SPON biases undo.

    Inputs are per-block mean feature activations ``[n_blocks, width]`` under the dense, sparse and
    sparse+SPON models (and optionally sparse + random biases of equal norms, ``null``), on the same blocks.
    ``restoration_share = 1 - ||m_spon - m_dense|| / ||m_sparse - m_dense||`` over features (1 = SPON brings
    every feature's mean back to dense; 0 = no better than sparse; negative = further away), with a 95%
    bootstrap interval over blocks. A feature is *suppressed* / *created* when its sparse-minus-dense
    difference is significant in a paired t-test over blocks (Bonferroni over features at ``alpha``) and
    negative / positive; per feature ``restored = (m_sparse - m_spon) / (m_sparse - m_dense)``.
    """
    import numpy as np
    from scipy import stats

    D, S, B = (np.asarray(a, dtype=np.float64) for a in (dense, sparse, spon))
    md, ms, mb = D.mean(0), S.mean(0), B.mean(0)

    def share(idx=None):
        d, s, b = (D, S, B) if idx is None else (D[idx], S[idx], B[idx])
        gap = np.linalg.norm(s.mean(0) - d.mean(0))
        return 1.0 - np.linalg.norm(b.mean(0) - d.mean(0)) / gap if gap > 0 else float("nan")

    observed = share()
    rng = np.random.default_rng(seed)
    n = D.shape[0]
    boot = np.array([share(rng.integers(0, n, n)) for _ in range(n_boot)]) if n > 1 else np.array([np.nan])
    diff = S - D
    if n > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            _, p = stats.ttest_1samp(diff, 0.0, axis=0)
        p = np.where(np.isfinite(p), p, 1.0)
    else:
        p = np.ones(D.shape[1])
    sig = p < alpha / D.shape[1]
    change = ms - md
    with np.errstate(invalid="ignore", divide="ignore"):
        restored = np.where(change != 0, (ms - mb) / change, np.nan)

    def rows(idx):
        return [{"feature": int(i), "dense": float(md[i]), "sparse": float(ms[i]), "spon": float(mb[i]),
                 "change": float(change[i]), "restored": float(restored[i]), "p": float(p[i])} for i in idx]

    suppressed = [i for i in np.argsort(change) if sig[i] and change[i] < 0][:top]
    created = [i for i in np.argsort(-change) if sig[i] and change[i] > 0][:top]
    out = {
        "restoration_share": float(observed),
        "restoration_share_ci95": [float(np.nanquantile(boot, 0.025)), float(np.nanquantile(boot, 0.975))],
        "n_suppressed": int((sig & (change < 0)).sum()), "n_created": int((sig & (change > 0)).sum()),
        "n_features": int(D.shape[1]), "n_blocks": int(n),
        "sparse_change_norm": float(np.linalg.norm(change)), "spon_change_norm": float(np.linalg.norm(mb - md)),
        "suppressed": rows(suppressed), "created": rows(created),
    }
    if null is not None:
        N = np.asarray(null, dtype=np.float64)
        gap = np.linalg.norm(change)
        out["restoration_share_null"] = float(1.0 - np.linalg.norm(N.mean(0) - md) / gap) if gap > 0 else float("nan")
    return out


def feature_means(sae, acts: torch.Tensor) -> torch.Tensor:
    """Per-block mean activation of every feature: ``acts`` ``[N, T, d]`` -> ``[N, width]``."""
    return encode(sae, acts).mean(1)


def top_contexts(sae, acts: torch.Tensor, ids: torch.Tensor, tokenizer, features: Sequence[int], *,
                 skip_first: int = 1, n: int = 5, window: int = 8) -> dict[int, list[dict[str, Any]]]:
    """The ``n`` tokens of ``ids`` that activate each feature most, with ``window`` tokens before and
    ``window // 2`` after; ``acts`` ``[N, T - skip_first, d]`` are the activations of those blocks."""
    features = [int(f) for f in features]
    if not features:
        return {}
    N, T = acts.shape[0], acts.shape[1]
    f = encode(sae, acts)[..., features].reshape(N * T, len(features))
    out: dict[int, list[dict[str, Any]]] = {}
    for j, feat in enumerate(features):
        col = f[:, j]
        k = min(n, int((col > 0).sum()))
        rows = []
        for flat in torch.topk(col, k).indices.tolist() if k else []:
            b, t = divmod(flat, T)
            pos = t + skip_first
            before = ids[b, max(0, pos - window):pos].tolist()
            after = ids[b, pos + 1:pos + 1 + window // 2].tolist()
            token = tokenizer.decode([int(ids[b, pos])])
            rows.append({"activation": float(col[flat]), "block": int(b), "position": int(pos), "token": token,
                         "context": f"{tokenizer.decode(before)}[[{token}]]{tokenizer.decode(after)}"})
        out[feat] = rows
    return out
